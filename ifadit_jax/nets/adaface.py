"""AdaFace IR-50 / IR-101 face recognition backbone (mk-minchul/AdaFace `net.py`), in Flax.

The evaluation identity network of paper Tables 1 and 3 (cosine and L1 between AdaFace embeddings).
`net.build_model('ir_50')` = `Backbone((112, 112), 50, 'ir')` (`ir_101`: 100 layers; IR-18 and
IR-34 load too). Layers:

  input layer: conv3x3 (stride 1, pad 1, no bias) -> BatchNorm -> PReLU(C)
  body: `irse.IRBody(se=False, mid_bn=True)`, 4 stages of `BasicBlockIR` units (50: 3, 4, 14,
    3; 100: 3, 13, 30, 3), the first unit of every stage with stride 2. Unlike pSp's
    `bottleneck_IR` there is a BatchNorm between the first conv and the PReLU:
      res      = BN -> conv3x3 (stride 1) -> BN -> PReLU -> conv3x3 (**stride here**) -> BN
      shortcut = MaxPool2d(1, stride) (plain subsampling) if in == depth,
                 else conv1x1 (stride, no bias) -> BN
  output layer: BatchNorm2d -> Dropout(0.4) (inactive: only evaluated) -> flatten in **NCHW order**
    -> Linear(C*7*7, 512) -> BatchNorm1d(affine=False)
  outputs: (embedding / ||embedding||_2, ||embedding||_2), no epsilon, as the official forward.

The official input (`inference.to_input`) is an aligned 112x112 face, **BGR**, (v/255 - 0.5)/0.5,
i.e. [-1, 1]; `preprocess` builds it from RGB images in [0, 1] (or uint8). All BatchNorms have
torch's eps 1e-5 and run on the running statistics.

Parameter tree (the input layer and unit names follow `irse.IRBody`, so the two read alike):
  params/body/input_conv/kernel, params/body/input_bn/{scale,bias},
  params/body/input_prelu/negative_slope,
  params/body/unit_{i}/{bn1,conv1,bn_mid,prelu,conv2,bn2,shortcut_conv,shortcut_bn}/...
    (official `body.{i}.res_layer.{0,1,2,3,4,5}` and `body.{i}.shortcut_layer.{0,1}`),
  params/output_bn/{scale,bias}, params/output_linear/{kernel [C*7*7, 512] (NCHW row order), bias},
  batch_stats/.../{mean,var} for every BatchNorm (batch_stats/output_bn1d only: affine=False).
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ifadit_jax.errors import InputError
from ifadit_jax.nets import base, irse

# Units per stage of AdaFace's `get_blocks(num_layers)` for the `BasicBlockIR` depths
# (152 and 200 use `BottleneckIR` units, which no released AdaFace checkpoint has).
STAGE_UNITS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}
INPUT_SIZE = 112


def preprocess(images_rgb) -> jax.Array:
    """RGB faces -> the official AdaFace input: BGR, (v - 0.5) / 0.5 in [-1, 1], float32.

    images_rgb: [B, H, W, 3] aligned face crops (112x112 for the 112 model), either float in
      [0, 1] or uint8 in [0, 255].
    uint8 input is converted exactly as `inference.to_input` does it (numpy float64, then float32),
    which reproduces the official tensor bit for bit. Float input is computed in float32 (traceable,
    differentiable); for images that are exact uint8 levels it differs from the official tensor by
    at most one float32 ulp (<= 6e-8).
    """
    if getattr(images_rgb, "dtype", None) == np.uint8:
        x = np.asarray(images_rgb)
        _check_rgb(x)
        return jnp.asarray(((x[..., ::-1] / 255.0 - 0.5) / 0.5).astype(np.float32))
    x = jnp.asarray(images_rgb, jnp.float32)
    _check_rgb(x)
    return (x[..., ::-1] - 0.5) / 0.5


def _check_rgb(x) -> None:
    if x.ndim != 4 or x.shape[-1] != 3:
        raise InputError(f"AdaFace preprocess expects [B, H, W, 3] RGB images, "
                         f"got {tuple(x.shape)}")


class AdaFace(nn.Module):
    """AdaFace `Backbone(input_size, num_layers, 'ir')`, inference only.

    widths: the 4 stage widths (official 64, 128, 256, 512); units: per stage (IR-50:
    (3, 4, 14, 3), IR-101: (3, 13, 30, 3)); emb_dim: 512; input_size: 112 (or 224).
    """

    widths: Sequence[int]
    units: Sequence[int] = STAGE_UNITS[50]
    emb_dim: int = 512
    input_size: int = INPUT_SIZE

    def _check(self, x):
        s = self.input_size
        if x.ndim != 4 or x.shape[1:] != (s, s, 3):
            raise InputError(f"AdaFace expects [B, {s}, {s}, 3] aligned BGR faces in [-1, 1] "
                             f"(see adaface.preprocess), got {tuple(x.shape)}")

    @nn.compact
    def raw_embedding(self, x: jax.Array) -> jax.Array:
        """x: [B, s, s, 3] BGR in [-1, 1] -> [B, emb_dim], the output layer before normalising."""
        self._check(x)
        x = irse.IRBody(self.widths, self.units, se=False, mid_bn=True, name="body")(x)[-1]
        x = irse.batch_norm(False, "output_bn")(x)
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # official Flatten is NCHW
        x = nn.Dense(self.emb_dim, name="output_linear")(x)
        return irse.batch_norm(False, "output_bn1d", affine=False)(x)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [B, s, s, 3] BGR in [-1, 1] -> (unit embeddings [B, emb_dim], norms [B, 1])."""
        e = self.raw_embedding(x)
        norm = jnp.linalg.norm(e, axis=-1, keepdims=True)
        return e / norm, norm


@base.netconfig
class AdaFaceConfig(base.NetConfig):
    """What `ports/convert_adaface.py` infers (see `AdaFace` for the fields)."""

    KIND: ClassVar[str] = "adaface"
    SCHEMA: ClassVar[dict] = {
        "num_layers": base.Choice(tuple(STAGE_UNITS)), "widths": base.List(base.Int(), 4, 4),
        "units": base.List(base.Int(1, base.MAX_DEPTH), 4, 4), "emb_dim": base.Int(),
        "input_size": base.Choice((112, 224))}

    widths: tuple[int, ...]
    units: tuple[int, ...] = STAGE_UNITS[50]
    emb_dim: int = 512
    input_size: int = INPUT_SIZE
    num_layers: int = 50

    def check(self) -> None:
        if STAGE_UNITS[self.num_layers] != self.units:
            raise base.ConfigError(f"config field 'units' {list(self.units)} is not IR-"
                                   f"{self.num_layers}'s {list(STAGE_UNITS[self.num_layers])}")

    def module(self) -> AdaFace:
        return AdaFace(widths=self.widths, units=self.units, emb_dim=self.emb_dim,
                       input_size=self.input_size)

    def init_inputs(self) -> tuple:
        return (base.spec(1, self.input_size, self.input_size, 3),)


def module_from_config(config) -> AdaFace:
    """The module of a config (an `AdaFaceConfig` or its JSON dict)."""
    return base.parse_config(AdaFaceConfig, config, "AdaFace config").module()


class LoadedAdaFace(base.Loaded):
    """A converted AdaFace backbone.

    `net(x)` -> (embeddings [B, 512] unit vectors, norms [B, 1]) for x = `preprocess(rgb)`:
      [B, 112, 112, 3] BGR in [-1, 1].
    `net.embed_rgb(images)` -> embeddings [B, 512] for RGB faces in [0, 1] (or uint8).
    Inside your own jit use the pure function `net.module.apply(net.variables, x)`.
    """

    CONFIG = AdaFaceConfig

    def __call__(self, x) -> tuple[jax.Array, jax.Array]:
        return self._run(None, base.f32(x))

    def embed_rgb(self, images_rgb) -> jax.Array:
        return self(preprocess(images_rgb))[0]


from_weights = LoadedAdaFace.from_weights
