"""E_LM: the MobileFaceNet 68-point landmark regressor of cunjian/pytorch_face_landmark, in Flax.

`MobileFaceNet([112, 112], 136)` with the GDC head, as loaded from `mobilefacenet_model_best.pth.tar`
(`['state_dict']`). It maps a 112x112 BGR face crop in [0, 1] to 136 numbers = 68 (x, y) pairs in
crop-normalised units (multiply by 112 for pixels). iFADIT (like RiDDLE) uses it for the landmark
L1 term of L_Sem and L_Img; `preprocess` turns generator images into the network's input.

Blocks (official names): `Conv_block` = conv (no bias) -> BatchNorm -> PReLU(C);
`Linear_block` = conv -> BatchNorm; `Depth_Wise` = 1x1 Conv_block (in -> groups) -> depthwise kxk
Conv_block (stride) -> 1x1 Linear_block (groups -> out), plus the input when residual;
GDC head = depthwise 7x7 Linear_block -> flatten -> Linear(512, 136, no bias) -> BatchNorm1d.
BatchNorm runs in inference mode on the running statistics (eps 1e-5, torch's default).

Parameter tree (mirrors the state dict; `model.i` becomes `model_i`):
  params/<block>/conv/kernel [k,k,I/groups,O]; params/<block>/bn/{scale,bias};
  params/<block>/prelu/negative_slope [C]; batch_stats/<block>/bn/{mean,var}
  e.g. params/conv_3/model_0/conv_dw/conv/kernel, params/output_layer/linear/kernel [512,136],
  params/output_layer/bn/{scale,bias}.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import flax.linen as nn
import jax

from ifadit_jax.errors import InputError
from ifadit_jax.nets import as_float, base, irse

INPUT_SIZE = 112
BN_EPS = 1e-5  # torch BatchNorm default, used by every BN in the official model




class ConvBN(nn.Module):
    """Official `Conv_block` (prelu=True) or `Linear_block` (prelu=False); NHWC."""

    features: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    groups: int = 1
    prelu: bool = True

    @nn.compact
    def __call__(self, x):
        p = self.padding
        x = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride,
                    padding=((p, p), (p, p)), feature_group_count=self.groups, use_bias=False,
                    name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return irse.PReLU(name="prelu")(x) if self.prelu else x


class DepthWise(nn.Module):
    """Official `Depth_Wise`: expand (1x1) -> depthwise kxk (stride) -> project (1x1) [+ input]."""

    out_features: int
    groups: int
    stride: int = 2
    residual: bool = False

    @nn.compact
    def __call__(self, x):
        y = ConvBN(self.groups, name="conv")(x)
        y = ConvBN(self.groups, kernel=3, stride=self.stride, padding=1, groups=self.groups,
                   name="conv_dw")(y)
        y = ConvBN(self.out_features, prelu=False, name="project")(y)
        return x + y if self.residual else y


class Residual(nn.Module):
    """Official `Residual`: `num_blocks` residual stride-1 DepthWise blocks (`model.i`)."""

    features: int
    num_blocks: int
    groups: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_blocks):
            x = DepthWise(self.features, self.groups, stride=1, residual=True, name=f"model_{i}")(x)
        return x


class GDC(nn.Module):
    """Global depthwise conv head: 7x7 depthwise Linear_block -> Linear (no bias) -> BatchNorm1d."""

    embedding_size: int

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = ConvBN(c, kernel=7, groups=c, prelu=False, name="conv_6_dw")(x)  # [B,1,1,C]
        x = x.reshape(x.shape[0], -1)  # spatial is 1x1, so NHWC and NCHW flatten agree
        x = nn.Dense(self.embedding_size, use_bias=False, name="linear")(x)
        return nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)


class MobileFaceNet(nn.Module):
    """`MobileFaceNet([112, 112], embedding_size)` with the GDC head (the landmark model).

    Widths and block counts are the official constructor's constants (it has no width argument);
    only `embedding_size` (136 = 68 x 2 for landmarks) varies.
    """

    embedding_size: int = 136

    @nn.compact
    def __call__(self, x, return_features: bool = False):
        """x: [B, 112, 112, 3] BGR in [0, 1] (see `preprocess`).

        Returns landmarks [B, embedding_size] (68 (x, y) pairs in crop-normalised units, roughly
        [0, 1]); with `return_features`, also `conv_features` [B, 7, 7, 512], the output of
        `conv_6_sep` before the GDC head (the official model's second output, in NHWC).
        """
        if x.ndim != 4 or x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise InputError(f"MobileFaceNet expects [B, {INPUT_SIZE}, {INPUT_SIZE}, 3] BGR images "
                             f"in [0, 1] (use mobilefacenet.preprocess), got {tuple(x.shape)}")
        x = ConvBN(64, kernel=3, stride=2, padding=1, name="conv1")(x)
        x = ConvBN(64, kernel=3, padding=1, groups=64, name="conv2_dw")(x)
        x = DepthWise(64, groups=128, name="conv_23")(x)
        x = Residual(64, num_blocks=4, groups=128, name="conv_3")(x)
        x = DepthWise(128, groups=256, name="conv_34")(x)
        x = Residual(128, num_blocks=6, groups=256, name="conv_4")(x)
        x = DepthWise(128, groups=512, name="conv_45")(x)
        x = Residual(128, num_blocks=2, groups=256, name="conv_5")(x)
        conv_features = ConvBN(512, name="conv_6_sep")(x)
        landmarks = GDC(self.embedding_size, name="output_layer")(conv_features)
        return (landmarks, conv_features) if return_features else landmarks


def preprocess(images: jax.Array, value_range: tuple[float, float] = (-1.0, 1.0)) -> jax.Array:
    """Generator images -> the landmark network's input. Differentiable; no clipping.

    images: [B, H, W, 3] RGB face crops (iFADIT's aligned 256x256 faces) with values in
      `value_range` ((-1, 1) for generator outputs; pass (0, 1) or (0, 255) for other images).
    Returns [B, 112, 112, 3] float32 (float64 for float64 input), BGR channel order, values
    mapped linearly to [0, 1]: what the official demo feeds (a cv2 BGR crop resized to 112x112,
    divided by 255, no mean/std).
    Resizing is bilinear with antialiasing (a triangle filter widened by the downscale factor,
    as PIL's and torchvision's antialiased bilinear resize) and is skipped at 112x112 already.
    """
    images = as_float(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InputError(f"preprocess expects [B, H, W, 3] RGB images, got {tuple(images.shape)}")
    lo, hi = value_range
    x = (images - lo) / (hi - lo)
    x = x[..., ::-1]  # RGB -> BGR: the network was trained on cv2 images
    if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
        x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), method="linear",
                             antialias=True)
    return x


@base.netconfig
class MobileFaceNetConfig(base.NetConfig):
    """What `ports/convert_mobilefacenet.py` infers: only the output size varies."""

    KIND: ClassVar[str] = "mobilefacenet"
    SCHEMA: ClassVar[dict] = {"embedding_size": base.Int()}

    embedding_size: int = 136

    def module(self) -> MobileFaceNet:
        return MobileFaceNet(embedding_size=self.embedding_size)

    def init_inputs(self) -> tuple:
        return (base.spec(1, INPUT_SIZE, INPUT_SIZE, 3),)


class LoadedMobileFaceNet(base.Loaded):
    """A converted MobileFaceNet: `net(x)` -> landmarks [B, 136] for x [B, 112, 112, 3] BGR in [0, 1].

    `net.features(x)` -> (landmarks [B, 136], conv_features [B, 7, 7, 512]).
    For generator images use `net(mobilefacenet.preprocess(images))`; inside your own jit call the
    pure function `net.module.apply(net.variables, x)` instead.
    """

    CONFIG = MobileFaceNetConfig

    def __call__(self, x) -> jax.Array:
        return self._run(None, base.f32(x))

    def features(self, x) -> tuple[jax.Array, jax.Array]:
        return self._run(None, base.f32(x), return_features=True)


from_weights = LoadedMobileFaceNet.from_weights


def load(path) -> LoadedMobileFaceNet:
    """Loads a file written by ports/convert_mobilefacenet.py."""
    from ifadit_jax import weights

    variables, meta = weights.read(path, kind="mobilefacenet")
    return from_weights(variables, meta)


def landmark_pairs(landmarks: jax.Array, size: float = INPUT_SIZE) -> jax.Array:
    """[B, 136] network output -> [B, 68, 2] (x, y) points, scaled by `size` (crop pixels)."""
    return landmarks.reshape(landmarks.shape[0], -1, 2) * size


__all__: Sequence[str] = ("MobileFaceNet", "preprocess", "landmark_pairs", "LoadedMobileFaceNet",
                          "from_weights", "load")
