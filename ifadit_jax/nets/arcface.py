"""E_ID: ArcFace IR-SE50 (pSp `model_irse.Backbone`, the `model_ir_se50.pth` layout), in Flax.

`Backbone(input_size=112, num_layers=50, mode='ir_se', drop_ratio=0.6)` as pSp's and iFADIT's
`IDLoss` build it: the IR-SE body of `irse.py`, then the output layer
  BatchNorm2d -> Dropout (inactive: E_ID is only ever evaluated) -> flatten in **NCHW order**
  -> Linear(C*7*7, 512) -> BatchNorm1d -> x / ||x||_2 (no eps, as the official `l2_norm`).
The NHWC feature map is transposed to NCHW before flattening, so the Linear kernel is the official
weight, only transposed.

Two entry points (NHWC float32, values in [-1, 1]):
  `ArcFace.__call__(x112)`  [B, 112, 112, 3] face crops -> [B, 512] unit vectors (`normalize=False`:
      the output layer's raw embedding);
  `ArcFace.identity(x256)`  [B, 256, 256, 3] aligned (FFHQ-crop) images -> [B, 512]: the IDLoss
      path `extract_feats` = `identity_crop_pool` (crop [35:223, 32:220], adaptive average pool
      188 -> 112) then the network. iFADIT feeds its [0, 1] images as `x * 2 - 1` here.

Parameter tree: params/body/... (see `irse.py`), params/output_bn/{scale,bias},
batch_stats/output_bn/{mean,var}, params/output_linear/{kernel [C*7*7, 512] (NCHW row order),
bias}, params/output_bn1d/{scale,bias} (absent for affine=False checkpoints),
batch_stats/output_bn1d/{mean,var}.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ifadit_jax.errors import InputError
from ifadit_jax.nets import as_float, base, irse

# IDLoss crop of a 256x256 FFHQ-aligned image (rows, columns), then pooled to 112x112.
ID_CROP = ((35, 223), (32, 220))
ID_SIZE = 112


def adaptive_pool_matrix(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """torch AdaptiveAvgPool along one axis: window i is [floor(i*n_in/n_out), ceil((i+1)*n_in/n_out)).

    Returns (membership [n_out, n_in] of 0/1, window sizes [n_out]); for 188 -> 112 the windows
    are 2 or 3 wide and overlap, so no reshape-and-mean can express them.
    """
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        m[i, (i * n_in) // n_out: -(-((i + 1) * n_in) // n_out)] = 1.0
    return m, m.sum(axis=1)


def identity_crop_pool(x256: jax.Array) -> jax.Array:
    """The official `IDLoss.extract_feats` preprocessing: [B, 256, 256, 3] -> [B, 112, 112, 3].

    Crops rows 35:223 and columns 32:220 (188x188) and applies AdaptiveAvgPool2d(112). Linear and
    value-range agnostic (iFADIT feeds [-1, 1]). Window sums are matrix products at full float32
    precision (also on GPU/TPU), then divided by the window height and width, as torch does.
    """
    x256 = as_float(x256)
    if x256.ndim != 4 or x256.shape[1:3] != (256, 256) or x256.shape[-1] != 3:
        raise InputError(f"the identity path expects [B, 256, 256, 3] aligned face images, "
                         f"got {tuple(x256.shape)}")
    (r0, r1), (c0, c1) = ID_CROP
    x = x256[:, r0:r1, c0:c1]
    rows, row_n = adaptive_pool_matrix(r1 - r0, ID_SIZE)
    cols, col_n = adaptive_pool_matrix(c1 - c0, ID_SIZE)
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("ih,bhwc->biwc", rows, x, precision=hi)
    x = jnp.einsum("jw,biwc->bijc", cols, x, precision=hi)
    return x / row_n[None, :, None, None] / col_n[None, None, :, None]


def l2_normalize(x: jax.Array) -> jax.Array:
    """Official `l2_norm`: x / ||x||_2 along the last axis, with no epsilon."""
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class ArcFace(nn.Module):
    """IR-SE ArcFace backbone (pSp `model_irse.Backbone`), inference only.

    widths: the 4 stage widths (official 64, 128, 256, 512); units: per stage (50 layers:
    (3, 4, 14, 3)); se: IR-SE (True) or plain IR; emb_dim: 512; input_size: 112 (or 224);
    bn1d_affine: whether the final BatchNorm1d has scale/bias (pSp's Backbone default: True).
    """

    widths: Sequence[int]
    units: Sequence[int] = irse.STAGE_UNITS[50]
    se: bool = True
    emb_dim: int = 512
    input_size: int = 112
    bn1d_affine: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, normalize: bool = True) -> jax.Array:
        """x: [B, input_size, input_size, 3] in [-1, 1] -> [B, emb_dim] (unit vectors if normalize)."""
        s = self.input_size
        if x.ndim != 4 or x.shape[1:] != (s, s, 3):
            raise InputError(f"ArcFace expects [B, {s}, {s}, 3] face crops in [-1, 1] "
                             f"(use .identity for 256x256 aligned images), got {tuple(x.shape)}")
        x = irse.IRBody(self.widths, self.units, self.se, name="body")(x)[-1]
        x = irse.batch_norm(False, "output_bn")(x)
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # official Flatten is NCHW
        x = nn.Dense(self.emb_dim, name="output_linear")(x)
        x = irse.batch_norm(False, "output_bn1d", affine=self.bn1d_affine)(x)
        return l2_normalize(x) if normalize else x

    def identity(self, x256: jax.Array) -> jax.Array:
        """IDLoss `extract_feats`: [B, 256, 256, 3] in [-1, 1] -> [B, emb_dim] unit vectors."""
        return self(identity_crop_pool(x256))


def id_loss(feats_hat: jax.Array, feats_target: jax.Array, feats_input: jax.Array):
    """pSp `IDLoss.forward` on embeddings (e.g. `identity` outputs of y_hat, y, x), each [B, D].

    Returns (loss, sim_improvement, logs): loss = mean(1 - <f(y_hat), f(y)>), sim_improvement =
    mean(<f(y_hat), f(y)> - <f(y), f(x)>), logs = per-sample dots {diff_target, diff_input,
    diff_views} [B]. pSp detaches f(y); apply `jax.lax.stop_gradient` to it when training.
    """
    diff_target = jnp.sum(feats_hat * feats_target, axis=-1)
    diff_input = jnp.sum(feats_hat * feats_input, axis=-1)
    diff_views = jnp.sum(feats_target * feats_input, axis=-1)
    logs = {"diff_target": diff_target, "diff_input": diff_input, "diff_views": diff_views}
    return jnp.mean(1.0 - diff_target), jnp.mean(diff_target - diff_views), logs


@base.netconfig
class ArcFaceConfig(base.NetConfig):
    """What `ports/convert_arcface.py` infers (see `ArcFace` for the fields)."""

    KIND: ClassVar[str] = "arcface"
    OPTIONAL: ClassVar[frozenset] = frozenset({"in_channels"})  # older configs lack it
    SCHEMA: ClassVar[dict] = {
        "widths": base.List(base.Int(), 4, 4), "units": base.List(base.Int(1, base.MAX_DEPTH), 4, 4),
        "se": base.Bool(), "emb_dim": base.Int(), "input_size": base.Choice((112, 224)),
        "bn1d_affine": base.Bool(), "in_channels": base.Choice((3,))}

    widths: tuple[int, ...]
    units: tuple[int, ...] = irse.STAGE_UNITS[50]
    se: bool = True
    emb_dim: int = 512
    input_size: int = 112
    bn1d_affine: bool = True
    in_channels: int = 3

    def module(self) -> ArcFace:
        return ArcFace(widths=self.widths, units=self.units, se=self.se, emb_dim=self.emb_dim,
                       input_size=self.input_size, bn1d_affine=self.bn1d_affine)

    def init_inputs(self) -> tuple:
        return (base.spec(1, self.input_size, self.input_size, 3),)


def module_from_config(config) -> ArcFace:
    """The module of a config (an `ArcFaceConfig` or its JSON dict)."""
    return base.parse_config(ArcFaceConfig, config, "ArcFace config").module()


class LoadedArcFace(base.Loaded):
    """A converted ArcFace: `net(x112)` -> [B, 512] unit vectors for [B, 112, 112, 3] in [-1, 1];
    `net.identity(x256)` -> the same for [B, 256, 256, 3] aligned images in [-1, 1] (IDLoss path).

    Inside your own jit use the pure functions `net.module.apply(net.variables, x)` and
    `net.module.apply(net.variables, x256, method="identity")`.
    """

    CONFIG = ArcFaceConfig

    def __call__(self, x112) -> jax.Array:
        return self._run(None, base.f32(x112))

    def identity(self, x256) -> jax.Array:
        return self._run("identity", base.f32(x256))


from_weights = LoadedArcFace.from_weights
