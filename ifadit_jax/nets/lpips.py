"""LPIPS (richzhang/PerceptualSimilarity, `lpips.LPIPS`) with the AlexNet or VGG16 trunk, in Flax.

d(x0, x1) = sum_l mean_{h,w} w_l . (n(F_l(s(x0))) - n(F_l(s(x1))))^2, where
  s(x) = (x - shift) / scale   the v0.1 ScalingLayer, shift (-.030, -.088, -.188),
                               scale (.458, .448, .450) (v0.0 skips it: the original release's bug);
  F_l                          the ReLU output after trunk stage l (5 stages, torchvision layout:
                               alex slices features[0:2], [2:5], [5:8], [8:10], [10:12];
                               vgg16 [0:4], [4:9], [9:16], [16:23], [23:30]);
  n(f) = f / (sqrt(sum_c f^2) + 1e-10)   unit length over channels, eps outside the sqrt;
  w_l                          the non-negative 1x1 conv `lin{l}` (no bias; its dropout is off in
                               eval).
Inputs are RGB in [-1, 1]. Dropout, `lpips=False` (baseline) and the squeezenet trunk are not
ported. iFADIT uses LPIPS in L_Img and Table 3 (the `lpips` package defaults to alex).

Gradients: the channel norm's sqrt gets a zero-safe derivative. Where sum_c f^2 is 0 the literal
formula's gradient is NaN (inf * 0) or inf; after a ReLU the NaN at f == 0 is dropped by the
ReLU's own gradient, but not the inf where f^2 underflows in float32 while f > 0. Forward values
are identical.

Parameter tree: params/features_{i}/{kernel [k,k,I,O], bias} (i = torchvision `features` index),
params/lin{l}/kernel [1,1,C_l,1].
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ifadit_jax.errors import InputError
from ifadit_jax.nets import base

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10

# Trunk stages in torchvision `features` layout: "M" is a max pool, (index, kernel, stride, pad) a
# conv followed by ReLU. LPIPS taps the ReLU output at the end of every stage.
STAGES = {
    "alex": (((0, 11, 4, 2),),
             ("M", (3, 5, 1, 2)),
             ("M", (6, 3, 1, 1)),
             ((8, 3, 1, 1),),
             ((10, 3, 1, 1),)),
    "vgg": (((0, 3, 1, 1), (2, 3, 1, 1)),
            ("M", (5, 3, 1, 1), (7, 3, 1, 1)),
            ("M", (10, 3, 1, 1), (12, 3, 1, 1), (14, 3, 1, 1)),
            ("M", (17, 3, 1, 1), (19, 3, 1, 1), (21, 3, 1, 1)),
            ("M", (24, 3, 1, 1), (26, 3, 1, 1), (28, 3, 1, 1))),
}
POOL = {"alex": (3, 2), "vgg": (2, 2)}  # (window, stride); torch floor mode == VALID
VERSIONS = ("0.1", "0.0")


def conv_indices(net: str) -> list[int]:
    """torchvision `features` indices of the trunk's convolutions, in order."""
    return [item[0] for stage in STAGES[net] for item in stage if item != "M"]


def _channel_normalize(f: jax.Array) -> jax.Array:
    """f / (||f||_channels + 1e-10) over the last axis, with a finite gradient where ||f|| == 0."""
    sq = jnp.sum(f * f, axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return f / (norm + NORM_EPS)


class LPIPS(nn.Module):
    """LPIPS with a torchvision AlexNet/VGG16 trunk.

    net: "alex" or "vgg". widths: output channels of every trunk conv, in order (5 for alex,
    13 for vgg; read from the checkpoint, e.g. the width-reduced test trunks). version: "0.1"
    (scaling layer) or "0.0".
    """

    net: str = "alex"
    widths: tuple[int, ...] = (64, 192, 384, 256, 256)
    version: str = "0.1"

    def setup(self):
        if self.version not in VERSIONS:
            raise InputError(f"LPIPS version must be one of {VERSIONS}, got {self.version!r}")
        indices = conv_indices(self.net)
        if len(self.widths) != len(indices):
            raise InputError(f"LPIPS-{self.net} has {len(indices)} convolutions, got "
                             f"{len(self.widths)} widths")
        kernels = {item[0]: item[1:] for stage in STAGES[self.net] for item in stage if item != "M"}
        # Attribute names are the parameter paths: features_{torchvision index}, lin{l}.
        for i, width in zip(indices, self.widths):
            k, s, p = kernels[i]
            setattr(self, f"features_{i}", nn.Conv(width, (k, k), strides=s, padding=((p, p), (p, p))))
        for l in range(len(STAGES[self.net])):
            setattr(self, f"lin{l}", nn.Conv(1, (1, 1), use_bias=False))

    def features(self, x: jax.Array) -> list[jax.Array]:
        """x [N, H, W, 3] (after the scaling layer) -> the 5 tapped ReLU maps, NHWC."""
        window, stride = POOL[self.net]
        taps = []
        for stage in STAGES[self.net]:
            for item in stage:
                if item == "M":
                    x = nn.max_pool(x, (window, window), (stride, stride), padding="VALID")
                else:
                    x = nn.relu(getattr(self, f"features_{item[0]}")(x))
            taps.append(x)
        return taps

    def __call__(self, in0: jax.Array, in1: jax.Array, per_layer: bool = False,
                 spatial: bool = False):
        """in0, in1: [B, H, W, 3] RGB in [-1, 1].

        Returns the distance [B]; with `per_layer`, (distance, [5 x [B]]) whose terms sum to it;
        with `spatial`, the map [B, H, W] (each layer's map upsampled bilinearly, half-pixel
        centres, to H x W, then summed: the official `spatial=True`) instead of the distance.
        """
        if in0.shape != in1.shape or in0.ndim != 4 or in0.shape[-1] != 3:
            raise InputError(f"LPIPS expects two [B, H, W, 3] images of the same shape, got "
                             f"{tuple(in0.shape)} and {tuple(in1.shape)}")
        b, h, w, _ = in0.shape
        x = jnp.concatenate([in0, in1], axis=0)  # one trunk pass for both images
        if self.version == "0.1":
            x = (x - jnp.asarray(SHIFT, x.dtype)) / jnp.asarray(SCALE, x.dtype)
        terms, maps = [], []
        for l, f in enumerate(self.features(x)):
            f = _channel_normalize(f)
            diff = jnp.square(f[:b] - f[b:])
            m = getattr(self, f"lin{l}")(diff)[..., 0]  # [B, h_l, w_l]
            if spatial:
                maps.append(jax.image.resize(m, (b, h, w), method="linear", antialias=False))
            else:
                terms.append(jnp.mean(m, axis=(1, 2)))
        if spatial:
            return sum(maps[1:], maps[0])
        dist = sum(terms[1:], terms[0])
        return (dist, terms) if per_layer else dist


@base.netconfig
class LPIPSConfig(base.NetConfig):
    """What `ports/convert_lpips.py` writes (see `LPIPS` for the fields)."""

    KIND: ClassVar[str] = "lpips"
    OPTIONAL: ClassVar[frozenset] = frozenset({"version"})
    SCHEMA: ClassVar[dict] = {"net": base.Choice(tuple(STAGES)), "widths": base.List(base.Int()),
                              "version": base.Choice(VERSIONS)}

    net: str = "alex"
    widths: tuple[int, ...] = (64, 192, 384, 256, 256)
    version: str = "0.1"

    def check(self) -> None:
        if len(self.widths) != len(conv_indices(self.net)):
            raise base.ConfigError(f"config field 'widths' must have {len(conv_indices(self.net))} "
                                   f"entries for LPIPS-{self.net}, got {len(self.widths)}")

    def module(self) -> LPIPS:
        return LPIPS(net=self.net, widths=self.widths, version=self.version)

    def init_inputs(self) -> tuple:
        return base.spec(1, 64, 64, 3), base.spec(1, 64, 64, 3)


class LoadedLPIPS(base.Loaded):
    """A converted LPIPS: `net(a, b)` -> distances [B] for NHWC RGB images in [-1, 1].

    `net.layers(a, b)` -> the 5 per-layer terms (each [B]; they sum to `net(a, b)`);
    `net.spatial(a, b)` -> the per-pixel map [B, H, W]. `normalize=True` takes images in [0, 1]
    (as the official flag). Inside your own jit use `net.module.apply(net.variables, a, b)`.
    """

    CONFIG = LPIPSConfig

    @staticmethod
    def _inputs(a, b, normalize):
        a, b = base.f32(a), base.f32(b)
        return (2 * a - 1, 2 * b - 1) if normalize else (a, b)

    def __call__(self, a, b, normalize: bool = False) -> jax.Array:
        return self._run(None, *self._inputs(a, b, normalize), per_layer=True)[0]

    def layers(self, a, b, normalize: bool = False) -> list[jax.Array]:
        return self._run(None, *self._inputs(a, b, normalize), per_layer=True)[1]

    def spatial(self, a, b, normalize: bool = False) -> jax.Array:
        return self._run(None, *self._inputs(a, b, normalize), spatial=True)


from_weights = LoadedLPIPS.from_weights


def load(path) -> LoadedLPIPS:
    """Loads a file written by ports/convert_lpips.py."""
    from ifadit_jax import weights

    variables, meta = weights.read(path, kind="lpips")
    return from_weights(variables, meta)


__all__: Sequence[str] = ("LPIPS", "LoadedLPIPS", "from_weights", "load", "conv_indices")
