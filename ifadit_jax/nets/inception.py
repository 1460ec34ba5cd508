"""The FID InceptionV3 of mseitzer/pytorch-fid (`pt_inception-2015-12-05-6726825d.pth`), in Flax.

pytorch-fid's `InceptionV3([3], resize_input=True, normalize_input=True)` on `fid_inception_v3()`:
torchvision's `Inception3` layer layout with the TensorFlow FID graph's quirks:
  - Mixed_5b/5c/5d (`FIDInceptionA`), Mixed_6b..6e (`FIDInceptionC`) and Mixed_7b
    (`FIDInceptionE_1`) average-pool their pool branch 3x3/stride 1/pad 1 **without counting the
    padding** (count_include_pad=False);
  - Mixed_7c (`FIDInceptionE_2`) **max**-pools that branch instead;
  - Mixed_6a / Mixed_7a are torchvision's InceptionB / InceptionD (3x3 stride-2 max pool).
Every conv is `BasicConv2d` = conv (no bias) -> BatchNorm(eps 1e-3, running statistics) -> ReLU.

Input pipeline (`images_to_input`): images [B, H, W, 3] RGB in [0, 1], any size, are resized to
299x299 with torch's `F.interpolate(mode='bilinear', align_corners=False)` (no antialiasing, also
when shrinking; weights computed in float32 as torch does), then scaled to [-1, 1] by 2x - 1.
Blocks: 0 = Conv2d_1a (stride 2), 2a, 2b, max pool -> [B, 73, 73, C0]; 1 = 3b, 4a, max pool ->
[B, 35, 35, C1]; 2 = Mixed_5b..6e -> [B, 17, 17, C2]; 3 = Mixed_7a..7c, global mean -> [B, C3]
("pool3", the FID features; 2048 for the official widths).

Widths come from the checkpoint as the constructor's channel constants (`OFFICIAL_WIDTHS`):
  stem  [Conv2d_1a, 2a, 2b, 3b, 4a]                           (32, 32, 64, 80, 192)
  a     [branch1x1, 5x5_1, 5x5_2, 3x3dbl_1, 3x3dbl_2, 3x3dbl_3] (64, 48, 64, 64, 96, 96)
  a_pool  pool_features of Mixed_5b/5c/5d                     (32, 64, 64)
  b     [branch3x3, 3x3dbl_1, 3x3dbl_2, 3x3dbl_3]               (384, 64, 96, 96)
  c     [branch1x1, 7x7_3 and 7x7dbl_5 outputs, branch_pool]   (192, 192, 192)
  c7      channels_7x7 of Mixed_6b/6c/6d/6e                   (128, 160, 160, 192)
  d     [branch3x3_1, branch3x3_2, branch7x7x3_*]             (192, 320, 192)
  e     [branch1x1, branch3x3_*, 3x3dbl_1, 3x3dbl_2/3a/3b, branch_pool]  (320, 384, 448, 384, 192)
The classifier `fc` (1008 classes) is not part of the FID features and is not ported.

Parameter tree (official module names): params/<Block>[/<branch>]/conv/kernel,
params/.../bn/{scale,bias}, batch_stats/.../bn/{mean,var}; e.g. params/Conv2d_1a_3x3/conv/kernel,
params/Mixed_6b/branch7x7_2/bn/scale.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ifadit_jax.errors import InputError
from ifadit_jax.nets import base

BN_EPS = 1e-3  # torchvision BasicConv2d
INPUT_SIZE = 299

OFFICIAL_WIDTHS = {
    "stem": (32, 32, 64, 80, 192),
    "a": (64, 48, 64, 64, 96, 96),
    "a_pool": (32, 64, 64),
    "b": (384, 64, 96, 96),
    "c": (192, 192, 192),
    "c7": (128, 160, 160, 192),
    "d": (192, 320, 192),
    "e": (320, 384, 448, 384, 192),
}


def feature_dim(widths: Mapping[str, Any]) -> int:
    """Width of the pool3 features: Mixed_7c's concatenated branches (2048 officially)."""
    e1, e3, _, edbl, epool = widths["e"]
    return e1 + 2 * e3 + 2 * edbl + epool


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """torch `F.interpolate(mode='bilinear', align_corners=False)` along one axis as [n_out, n_in].

    Source coordinate src = (dst + 0.5) * n_in / n_out - 0.5, clamped at 0; taps floor(src) and the
    next pixel (clamped at the edge), weights 1 - frac and frac. Computed in float32 as torch does
    (its float32 weights differ from exact ones by up to ~1e-6 relative).
    """
    scale = np.float32(n_in) / np.float32(n_out)
    src = scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    w0 = (np.float32(1) - w1).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.arange(n_out), i0), w0)
    np.add.at(m, (np.arange(n_out), i1), w1)
    return m


def images_to_input(images: jax.Array) -> jax.Array:
    """pytorch-fid's input transform: [B, H, W, 3] in [0, 1] -> [B, 299, 299, 3] in [-1, 1].

    Bilinear resize (align_corners=False, no antialias) to 299x299, then 2x - 1. The resize is two
    matrix products at full float32 precision (also on GPU/TPU).
    """
    x = jnp.asarray(images, jnp.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise InputError(f"the FID Inception expects [B, H, W, 3] RGB images in [0, 1], "
                         f"got {tuple(x.shape)}")
    hi = jax.lax.Precision.HIGHEST
    if x.shape[1] != INPUT_SIZE:
        x = jnp.einsum("ih,bhwc->biwc", bilinear_matrix(x.shape[1], INPUT_SIZE), x, precision=hi)
    if x.shape[2] != INPUT_SIZE:
        x = jnp.einsum("jw,biwc->bijc", bilinear_matrix(x.shape[2], INPUT_SIZE), x, precision=hi)
    return 2 * x - 1


class BasicConv2d(nn.Module):
    """torchvision `BasicConv2d`: conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU; NHWC."""

    features: int
    kernel: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        (ph, pw) = self.padding
        x = nn.Conv(self.features, self.kernel, strides=self.stride, padding=((ph, ph), (pw, pw)),
                    use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3_no_pad_count(x):
    """TF-style 3x3/1 average pool, pad 1, padded zeros not counted (FID blocks A, C, E_1)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, stride: int, pad: int):
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
    """`FIDInceptionA(in_channels, pool_features)`; out = a[0] + a[2] + a[5] + pool_features."""

    widths: tuple
    pool_features: int

    @nn.compact
    def __call__(self, x):
        w = self.widths
        b1 = BasicConv2d(w[0], name="branch1x1")(x)
        b5 = BasicConv2d(w[1], name="branch5x5_1")(x)
        b5 = BasicConv2d(w[2], (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv2d(w[3], name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(w[4], (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(w[5], (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, name="branch_pool")(_avg_pool_3x3_no_pad_count(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """torchvision `InceptionB` (Mixed_6a, grid 35 -> 17); out = b[0] + b[3] + in_channels."""

    widths: tuple

    @nn.compact
    def __call__(self, x):
        w = self.widths
        b3 = BasicConv2d(w[0], (3, 3), stride=2, name="branch3x3")(x)
        bd = BasicConv2d(w[1], name="branch3x3dbl_1")(x)
        bd = BasicConv2d(w[2], (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(w[3], (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionC(nn.Module):
    """`FIDInceptionC(in_channels, channels_7x7)`; out = c[0] + 2 c[1] + c[2]."""

    widths: tuple
    c7: int

    @nn.compact
    def __call__(self, x):
        w, c7 = self.widths, self.c7
        row = dict(kernel=(1, 7), padding=(0, 3))  # the factorised 7x7 convs
        col = dict(kernel=(7, 1), padding=(3, 0))
        b1 = BasicConv2d(w[0], name="branch1x1")(x)
        b7 = BasicConv2d(c7, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, **row, name="branch7x7_2")(b7)
        b7 = BasicConv2d(w[1], **col, name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, **col, name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, **row, name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, **col, name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(w[1], **row, name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(w[2], name="branch_pool")(_avg_pool_3x3_no_pad_count(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """torchvision `InceptionD` (Mixed_7a, grid 17 -> 8); out = d[1] + d[2] + in_channels."""

    widths: tuple

    @nn.compact
    def __call__(self, x):
        w = self.widths
        b3 = BasicConv2d(w[0], name="branch3x3_1")(x)
        b3 = BasicConv2d(w[1], (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(w[2], name="branch7x7x3_1")(x)
        b7 = BasicConv2d(w[2], (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(w[2], (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(w[2], (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionE(nn.Module):
    """`FIDInceptionE_1` (max_pool=False) / `FIDInceptionE_2` (max_pool=True);
    out = e[0] + 2 e[1] + 2 e[3] + e[4]."""

    widths: tuple
    max_pool: bool

    @nn.compact
    def __call__(self, x):
        w = self.widths
        row = dict(kernel=(1, 3), padding=(0, 1))
        col = dict(kernel=(3, 1), padding=(1, 0))
        b1 = BasicConv2d(w[0], name="branch1x1")(x)
        b3 = BasicConv2d(w[1], name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv2d(w[1], **row, name="branch3x3_2a")(b3),
                              BasicConv2d(w[1], **col, name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(w[2], name="branch3x3dbl_1")(x)
        bd = BasicConv2d(w[3], (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv2d(w[3], **row, name="branch3x3dbl_3a")(bd),
                              BasicConv2d(w[3], **col, name="branch3x3dbl_3b")(bd)], axis=-1)
        # The FID graph max-pools in its last block (TF's Inception quirk), average elsewhere.
        pooled = _max_pool_3x3(x, 1, 1) if self.max_pool else _avg_pool_3x3_no_pad_count(x)
        bp = BasicConv2d(w[4], name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's InceptionV3 feature extractor (blocks 0-3), inference only.

    One attribute per group of channel constants (see the module docstring); the defaults are the
    released network's `OFFICIAL_WIDTHS`.
    """

    stem: tuple = OFFICIAL_WIDTHS["stem"]
    a: tuple = OFFICIAL_WIDTHS["a"]
    a_pool: tuple = OFFICIAL_WIDTHS["a_pool"]
    b: tuple = OFFICIAL_WIDTHS["b"]
    c: tuple = OFFICIAL_WIDTHS["c"]
    c7: tuple = OFFICIAL_WIDTHS["c7"]
    d: tuple = OFFICIAL_WIDTHS["d"]
    e: tuple = OFFICIAL_WIDTHS["e"]

    @nn.compact
    def blocks(self, images: jax.Array, last_block: int = 3) -> list[jax.Array]:
        """images [B, H, W, 3] in [0, 1] -> outputs of blocks 0..last_block (NHWC; block 3 is the
        pool3 features [B, C3])."""
        stem, a, a_pool, b, c, c7, d, e = (self.stem, self.a, self.a_pool, self.b, self.c, self.c7,
                                           self.d, self.e)
        x = images_to_input(images)
        outs = []
        x = BasicConv2d(stem[0], (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(stem[1], (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(stem[2], (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        outs.append(x := _max_pool_3x3(x, 2, 0))
        if last_block >= 1:
            x = BasicConv2d(stem[3], name="Conv2d_3b_1x1")(x)
            x = BasicConv2d(stem[4], (3, 3), name="Conv2d_4a_3x3")(x)
            outs.append(x := _max_pool_3x3(x, 2, 0))
        if last_block >= 2:
            for name, pf in zip(("Mixed_5b", "Mixed_5c", "Mixed_5d"), a_pool):
                x = InceptionA(a, pf, name=name)(x)
            x = InceptionB(b, name="Mixed_6a")(x)
            for name, n7 in zip(("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"), c7):
                x = InceptionC(c, n7, name=name)(x)
            outs.append(x)
        if last_block >= 3:
            x = InceptionD(d, name="Mixed_7a")(x)
            x = InceptionE(e, max_pool=False, name="Mixed_7b")(x)
            x = InceptionE(e, max_pool=True, name="Mixed_7c")(x)
            outs.append(jnp.mean(x, axis=(1, 2)))  # AdaptiveAvgPool2d(1), squeezed
        return outs

    def __call__(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] RGB in [0, 1] (any size) -> pool3 features [B, feature_dim]."""
        return self.blocks(images)[-1]


_WIDTHS_SCHEMA = {k: base.List(base.Int(), len(v), len(v)) for k, v in OFFICIAL_WIDTHS.items()}


@base.netconfig
class InceptionConfig(base.NetConfig):
    """What `ports/convert_inception.py` infers: the channel constants of every group
    (`widths`, as a tuple of (group, widths) pairs) and the pool3 width they give."""

    KIND: ClassVar[str] = "inception"
    SCHEMA: ClassVar[dict] = {"widths": base.Record(_WIDTHS_SCHEMA),
                              "feature_dim": base.Int(1, 4 * base.MAX_WIDTH)}

    widths: tuple = tuple(OFFICIAL_WIDTHS.items())
    feature_dim: int = 2048

    def check(self) -> None:
        if feature_dim(dict(self.widths)) != self.feature_dim:
            raise base.ConfigError(f"config field 'feature_dim' {self.feature_dim} does not match "
                                   f"the widths ({feature_dim(dict(self.widths))})")

    def module(self) -> FIDInceptionV3:
        return FIDInceptionV3(**dict(self.widths))

    def init_inputs(self) -> tuple:
        return (base.spec(1, INPUT_SIZE, INPUT_SIZE, 3),)


def module_from_config(config) -> FIDInceptionV3:
    """The module of a config (an `InceptionConfig` or its JSON dict)."""
    return base.parse_config(InceptionConfig, config, "Inception config").module()


class LoadedInception(base.Loaded):
    """A converted FID Inception: `net(images)` -> pool3 features [B, C3] (2048 for the official
    weights) for images [B, H, W, 3] RGB in [0, 1] of any size (resized to 299 as pytorch-fid does).

    `net.blocks(images)` -> the 4 block outputs. Inside your own jit use the pure function
    `net.module.apply(net.variables, images)`.
    """

    CONFIG = InceptionConfig

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def __call__(self, images) -> jax.Array:
        return self._run(None, base.f32(images))

    def blocks(self, images) -> list[jax.Array]:
        return self._run("blocks", base.f32(images))


from_weights = LoadedInception.from_weights
