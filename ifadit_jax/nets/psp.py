"""E_Attr: the pixel2style2pixel GradualStyleEncoder (IR-SE50 body), in Flax.

`psp_encoders.GradualStyleEncoder(50, 'ir_se', opts)` of eladrich/pixel2style2pixel, which iFADIT
uses unchanged as its attribute encoder (`models/attr_encoder/psp_encoders.py`):

  body = the IR-SE50 body of `irse.py`; taps c1 = unit 6 (H/4), c2 = unit 20 (H/8), c3 = unit 23 (H/16)
  styles 0-2  from c3                               (GradualStyleBlock, spatial 16: 4 convs)
  styles 3-6  from p2 = up(c3) + latlayer1(c2)      (spatial 32: 5 convs)
  styles 7+   from p1 = up(p2) + latlayer2(c1)      (spatial 64: 6 convs)
  up = bilinear resize with align_corners=True (`bilinear_align_corners`, exact interpolation
       matrices); latlayer1/2 = 1x1 convs with bias to the last stage width.
  GradualStyleBlock = [conv3x3 stride 2 pad 1 (bias) -> LeakyReLU(0.01)] * log2(spatial), then the
       1x1 map flattened and EqualLinear(c, w_dim, lr_mul=1): x @ (W / sqrt(c)) + b.
  Output: W+ codes [B, n_styles, w_dim], stacked in style order, *without* latent_avg.

pSp adds `latent_avg` ([n_styles, w_dim], from the checkpoint) when trained with
`start_from_latent_avg` (pSp's FFHQ encoders); iFADIT's attribute encoder does not (its config
flag is False): `LoadedPSPEncoder.wplus` follows the converted file's flag.

Input range. Every image network here takes NHWC images in [-1, 1]. The encoder weights, though,
expect what they were trained on: pSp feeds [-1, 1]; the official iFADIT code feeds its [0, 1]
images unchanged. `input_range` (config, default [-1, 1]) says which; `to_encoder_range` maps the
[-1, 1] input there as the network's first step, so one image tensor serves E_ID and E_Attr alike.

Widths (stage widths, style conv width, w_dim, n_styles) come from the checkpoint. iFADIT's
width-reduced fixtures decouple the style conv width c from w_dim (EqualLinear(c, w_dim)); the
official model has c = w_dim = 512, which is the same code.

Parameter tree: params/body/... (`irse.py`), params/latlayer{1,2}/{kernel,bias},
params/style_{i}/conv_{j}/{kernel,bias} (official `styles.i.convs.{2j}`),
params/style_{i}/linear/{weight [c, w_dim] (the official weight transposed, unscaled), bias}.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ifadit_jax import weights
from ifadit_jax.errors import InputError
from ifadit_jax.nets import base, irse, resample, stylegan2

TAPS = (6, 20, 23)  # body units feeding c1, c2, c3 (hard-coded in the official forward)


def tap_units(units: Sequence[int]) -> tuple[int, int, int]:
    """The units feeding c1, c2, c3: the last units of stages 2, 3 and 4 (TAPS for IR-SE50)."""
    return units[0] + units[1] - 1, units[0] + units[1] + units[2] - 1, sum(units) - 1
COARSE, MIDDLE = 3, 7  # styles [0, 3) from c3, [3, 7) from p2, the rest from p1
LEAKY_SLOPE = 0.01  # nn.LeakyReLU() default inside GradualStyleBlock (not StyleGAN's 0.2)
SIGNED, UNIT = (-1.0, 1.0), (0.0, 1.0)


def style_convs(i: int) -> int:
    """Number of stride-2 convs of style block i: log2 of its official `spatial` (16, 32, 64)."""
    return 4 if i < COARSE else 5 if i < MIDDLE else 6


def to_encoder_range(x: jax.Array, input_range: Sequence[float]) -> jax.Array:
    """Maps images in [-1, 1] linearly to `input_range` = (lo, hi), what the weights expect.

    (-1, 1) (pSp) returns x itself; (0, 1) (official iFADIT) gives (x + 1) / 2, exact for the
    [0, 1] images iFADIT works on when x = image * 2 - 1.
    """
    lo, hi = (float(v) for v in input_range)
    if (lo, hi) == SIGNED:
        return x
    return lo + (x + 1.0) * ((hi - lo) / 2.0)


# The fine style blocks' first convolutions (7 of the 14 blocks, 3x3 stride 2 from the 64x64x512
# map p1: 34 of E_Attr's 115 GFLOP per image) run as matmuls over the 9 shifted strided views of
# their shared input, which XLA builds once for all seven: XLA's CPU convolution ran them at 81-93
# GFLOP/s at batch 4 (the batch's 32 MiB input outgrows the cache), the matmuls at 142-157
# (batch 4: 1463-1673 -> 863-954 ms for the seven, batch 1: 249 -> 212 ms; 2-core EPYC, real
# widths). Smaller maps stay convolutions: there the matmul form measured as fast or slower.
PATCHES_FROM = 64


class StridedConv3x3(nn.Module):
    """torch Conv2d(3x3, stride 2, padding 1, bias) with `irse.conv`'s parameters (kernel
    [3, 3, in, out], bias [out]); as one matmul over the strided views when the input is at
    least PATCHES_FROM pixels high."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        if x.shape[1] < PATCHES_FROM:
            y = jax.lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return y + bias
        h, w = -(-x.shape[1] // 2), -(-x.shape[2] // 2)  # torch: floor((n + 2 - 3) / 2) + 1
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        views = [padded[:, i:i + 2 * h:2, j:j + 2 * w:2] for i in range(3) for j in range(3)]
        return jnp.einsum("bhwk,ko->bhwo", jnp.concatenate(views, axis=-1),
                          kernel.reshape(-1, self.features)) + bias


class GradualStyleBlock(nn.Module):
    """[conv3x3/2 + LeakyReLU(0.01)] * n_convs down to 1x1, then EqualLinear(width, w_dim)."""

    width: int
    w_dim: int
    n_convs: int

    @nn.compact
    def __call__(self, x):
        for j in range(self.n_convs):
            x = nn.leaky_relu(StridedConv3x3(self.width, name=f"conv_{j}")(x), LEAKY_SLOPE)
        if x.shape[1:3] != (1, 1):
            raise InputError(f"pSp encoder: a style block ended at {x.shape[1]}x{x.shape[2]}, not "
                             "1x1; the encoder takes 256x256 images")
        # pSp's EqualLinear(lr_mul=1) is StyleGAN2's; its parameter is called "weight" here.
        return stylegan2.EqualDense(self.w_dim, kernel_name="weight", name="linear")(
            x.reshape(x.shape[0], self.width))


class GradualStyleEncoder(nn.Module):
    """pSp GradualStyleEncoder(50, 'ir_se'); NHWC images in [-1, 1] -> W+ [B, n_styles, w_dim].

    widths: the 4 IR-SE50 stage widths (official 64, 128, 256, 512); style_width: GradualStyleBlock
    conv width (official 512); w_dim: style width (512); n_styles: 2*log2(output_size) - 2
    (14 for 256 px, 18 for 1024 px); in_channels: opts.input_nc; input_range: see module doc.
    Inputs other than 256x256 work where the official code works (style blocks must end at 1x1).
    """

    widths: Sequence[int]
    style_width: int
    w_dim: int
    n_styles: int
    in_channels: int = 3
    se: bool = True
    input_range: Sequence[float] = SIGNED
    units: Sequence[int] = irse.STAGE_UNITS[50]  # official: IR-SE50; fewer for tiny test nets
    bn_axis_name: str | None = None  # training under pmap: BatchNorm statistics over this axis

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: [B, 256, 256, in_channels] in [-1, 1] -> codes [B, n_styles, w_dim] (no latent_avg).

        `train=True` runs BatchNorm on batch statistics (apply with mutable=["batch_stats"]),
        averaged over the devices of `bn_axis_name` when it is set.
        """
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise InputError(f"pSp encoder expects [B, 256, 256, {self.in_channels}] images in [-1, 1], "
                             f"got {tuple(x.shape)}")
        x = to_encoder_range(x, self.input_range)
        feats = irse.IRBody(self.widths, tuple(self.units), self.se, self.bn_axis_name,
                            name="body")(x, train)
        c1, c2, c3 = (feats[i] for i in tap_units(self.units))
        top = self.widths[-1]
        p2 = resample.bilinear_align_corners(c3, c2.shape[1:3]) + irse.conv(top, 1, 1, "latlayer1", bias=True)(c2)
        p1 = resample.bilinear_align_corners(p2, c1.shape[1:3]) + irse.conv(top, 1, 1, "latlayer2", bias=True)(c1)
        codes = []
        for i in range(self.n_styles):
            src = c3 if i < COARSE else p2 if i < MIDDLE else p1
            codes.append(GradualStyleBlock(self.style_width, self.w_dim, style_convs(i),
                                           name=f"style_{i}")(src))
        return jnp.stack(codes, axis=1)


@base.netconfig
class PSPEncoderConfig(base.NetConfig):
    """What `ports/convert_psp.py` infers (see `GradualStyleEncoder` for the fields);
    `start_from_latent_avg`: `wplus` adds the file's latent_avg (pSp's opts)."""

    KIND: ClassVar[str] = "psp_encoder"
    OPTIONAL: ClassVar[frozenset] = frozenset({"units", "start_from_latent_avg"})
    SCHEMA: ClassVar[dict] = {
        "in_channels": base.Int(1, 16), "widths": base.List(base.Int(), 4, 4),
        "units": base.List(base.Int(1, base.MAX_DEPTH), 4, 4), "se": base.Bool(),
        "n_styles": base.Int(1, 18), "style_width": base.Int(), "w_dim": base.Int(),
        "input_range": base.List(base.Float(-1e3, 1e3), 2, 2), "start_from_latent_avg": base.Bool()}

    widths: tuple[int, ...]
    style_width: int
    w_dim: int
    n_styles: int
    in_channels: int = 3
    se: bool = True
    input_range: tuple[float, ...] = SIGNED
    units: tuple[int, ...] = irse.STAGE_UNITS[50]
    start_from_latent_avg: bool = False

    def check(self) -> None:
        if not self.input_range[0] < self.input_range[1]:
            raise base.ConfigError(f"config field 'input_range' must be [lo, hi] with lo < hi, "
                                   f"got {list(self.input_range)}")

    def module(self) -> GradualStyleEncoder:
        return GradualStyleEncoder(widths=self.widths, style_width=self.style_width, w_dim=self.w_dim,
                                   n_styles=self.n_styles, in_channels=self.in_channels, se=self.se,
                                   input_range=self.input_range, units=self.units)

    def init_inputs(self) -> tuple:
        return (base.spec(1, 256, 256, self.in_channels),)

    def optional_variables(self) -> dict:
        if self.start_from_latent_avg:
            return {}
        return {"consts/latent_avg": base.spec(self.n_styles, self.w_dim)}

    def variable_shapes(self) -> dict:
        shapes = dict(super().variable_shapes())
        if self.start_from_latent_avg:  # then the file must hold it
            shapes["consts"] = {"latent_avg": base.spec(self.n_styles, self.w_dim)}
        return shapes


def module_from_config(config) -> GradualStyleEncoder:
    """The module of a config (a `PSPEncoderConfig` or its JSON dict)."""
    return base.parse_config(PSPEncoderConfig, config, "pSp encoder config").module()


def init_from_irse50(psp_variables: dict, arcface_variables: dict,
                     include_input_layer: bool = True) -> dict:
    """pSp's initialization of the encoder body from IR-SE50 ArcFace weights (`pSp.load_weights`
    without a checkpoint: `encoder.load_state_dict(ir_se50, strict=False)`).

    Copies the IR body (params and batch_stats under `body`) of `arcface_variables` (e.g.
    `ifadit_jax.load("model_ir_se50.safetensors").variables`) into a copy of `psp_variables`
    (e.g. a fresh `module.init`); the ArcFace output layer has no counterpart and is left out, as
    are the pSp style blocks and lateral layers. `include_input_layer=False` also keeps the
    encoder's own input layer, as pSp does when the input is not RGB (`label_nc != 0`).
    Raises WeightsError if the bodies differ in any width or shape (torch raises there too).
    """
    def copied(tree: dict) -> dict:
        return {k: v for k, v in tree.items() if include_input_layer or not k.startswith("input_")}

    out = {col: dict(tree) for col, tree in psp_variables.items()}
    for col in ("params", "batch_stats"):
        body = dict(out[col]["body"])
        src = copied(arcface_variables[col]["body"])
        weights.check_tree(copied(body), src,
                           f"init_from_irse50: IR-SE50 {col} do not fit the encoder body")
        body.update(src)
        out[col]["body"] = body
    return out


class LoadedPSPEncoder(base.Loaded):
    """A converted pSp encoder: `net(x)` -> W+ codes [B, n_styles, w_dim] for x [B, 256, 256, 3] in
    [-1, 1] (mapped to the weights' `input_range` inside), without latent_avg.

    `net.latent_avg`: [n_styles, w_dim] from the checkpoint, or None. `net.wplus(x)`: what pSp
    feeds its decoder, codes + latent_avg if the file says `start_from_latent_avg`, else codes.
    Inside your own jit use the pure function `net.module.apply(net.variables, x)` (`variables`
    holds no latent_avg: it is not the module's).
    """

    CONFIG = PSPEncoderConfig

    def __init__(self, config: Any, variables: dict[str, Any], meta: Any = None):
        super().__init__(config, variables, meta)
        consts = self.variables.pop("consts", {})
        self.latent_avg = consts.get("latent_avg")
        self.start_from_latent_avg = self.config.start_from_latent_avg

    def __call__(self, x) -> jax.Array:
        return self._run(None, base.f32(x))

    def wplus(self, x) -> jax.Array:
        codes = self(x)
        return codes + self.latent_avg if self.start_from_latent_avg else codes


from_weights = LoadedPSPEncoder.from_weights
