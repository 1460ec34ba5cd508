"""E_FP / face mask: the BiSeNet face parser of zllrunning/face-parsing.PyTorch, in Flax.

`BiSeNet(n_classes=19)` as loaded from `79999_iter.pth` (a plain state dict). It maps an
ImageNet-normalised RGB image (trained at 512x512) to three logit maps over the 19 CelebAMask-HQ
classes (0 background, 1 skin, 2/3 left/right brow, 4/5 left/right eye, 6 glasses, 7/8 left/right
ear, 9 earring, 10 nose, 11 mouth, 12/13 upper/lower lip, 14 neck, 15 necklace, 16 cloth, 17 hair,
18 hat). The first map (`feat_out`) is the parser's answer; the other two are the auxiliary heads
used in training. iFADIT uses the argmax of `feat_out` for its face mask (`ifadit_jax.refine`) and
the logits for the face-parser term of L_Img.

Structure (official names):
  context path `cp`: ResNet18 `resnet` (conv1 7x7/2 -> BN -> ReLU -> maxpool 3x3/2 -> layer1..4 of
    BasicBlocks; returns layer2, layer3, layer4 = 1/8, 1/16, 1/32), global average of layer4 ->
    `conv_avg` (1x1 ConvBNReLU); `arm32`(layer4) + avg -> nearest x2 -> `conv_head32`;
    `arm16`(layer3) + that -> nearest x2 -> `conv_head16`.
  `ffm`: concat(layer2, cp 1/8) -> 1x1 ConvBNReLU -> feat * (1 + sigmoid(conv2(relu(conv1(avg))))).
  heads `conv_out` (on ffm), `conv_out16` (on cp 1/8), `conv_out32` (on cp 1/16): 3x3 ConvBNReLU ->
    1x1 conv to n_classes; each upsampled to the input size with bilinear, align_corners=True.
ConvBNReLU = conv (no bias) -> BatchNorm -> ReLU; AttentionRefinementModule (ARM) =
ConvBNReLU 3x3 -> feat * sigmoid(BN(conv1x1(avg(feat)))). BatchNorm runs on the running
statistics (eps 1e-5, torch's default). Every width comes from the checkpoint (`config`).

Parameter tree (mirrors the state dict; `layer1.0` becomes `layer1_0`, `downsample.0/1` become
`downsample_conv` / `downsample_bn`):
  params/cp/resnet/conv1/kernel [7,7,3,C]; params/cp/resnet/layer2_0/bn1/{scale,bias};
  params/cp/arm16/conv/conv/kernel, params/cp/arm16/bn_atten/scale; params/ffm/conv1/kernel;
  params/conv_out/conv_out/kernel [1,1,mid,19]; batch_stats/<same path of each BN>/{mean,var}.

Input preprocessing (official `test.py`): PIL resize to 512x512, ToTensor ([0, 1]), Normalize with
the ImageNet mean/std. `preprocess` does that on [B, H, W, 3] arrays; `net(x)` takes its output.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ifadit_jax.errors import InputError
from ifadit_jax.nets import as_float, base, resample

PARSER_SIZE = 512  # the resolution 79999_iter.pth was trained and is run at
BN_EPS = 1e-5  # torch BatchNorm2d default; the official model uses it everywhere
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The official model: BiSeNet(n_classes=19) with ResNet18 widths.
DEFAULT_CONFIG = {
    "n_classes": 19,
    "stem_width": 64,
    "layer_widths": [64, 128, 256, 512],
    "layer_blocks": [2, 2, 2, 2],
    "context_width": 128,
    "fusion_width": 256,
    "fusion_attention_width": 64,
    "head_widths": [256, 64, 64],
}


# ----------------------------------------------------------------------------- resampling
# Index/weight tables are computed in numpy at trace time (shapes are static), with the same
# float32 arithmetic as torch's CPU kernels, and applied as gathers + lerps: exact and cheap.

def _nearest_index(in_size: int, out_size: int) -> np.ndarray:
    """torch `F.interpolate(mode='nearest')` source indices for one axis."""
    i = np.arange(out_size)
    if out_size == in_size:
        return i
    if out_size == 2 * in_size:
        return i >> 1
    scale = np.float32(in_size) / np.float32(out_size)
    return np.minimum(np.floor(i.astype(np.float32) * scale).astype(np.int64), in_size - 1)


def upsample_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """`F.interpolate(x, size, mode='nearest')` on NHWC `x`."""
    return x[:, _nearest_index(x.shape[1], size[0])][:, :, _nearest_index(x.shape[2], size[1])]


def _pil_filter(name: str):
    if name == "bilinear":
        return 1.0, lambda t: np.maximum(0.0, 1.0 - np.abs(t))
    if name == "bicubic":
        a = -0.5

        def cubic(t):
            t = np.abs(t)
            near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
            far = (((t - 5.0) * t + 8.0) * t - 4.0) * a
            return np.where(t < 1.0, near, np.where(t < 2.0, far, 0.0))

        return 2.0, cubic
    raise InputError(f"unknown resample filter '{name}' (use 'bicubic' or 'bilinear')")


def pil_resize_matrix(in_size: int, out_size: int, resample: str = "bicubic") -> np.ndarray:
    """[out_size, in_size] float64 weights of PIL's `Image.resize` along one axis.

    PIL's convolution resampler: output pixel i is centred at (i + 0.5) * in/out in input
    coordinates, the filter is widened by the scale when downsampling (antialiasing), its window is
    cut at the image border and the weights renormalised (no padding).
    """
    support, fn = _pil_filter(resample)
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        x = np.arange(lo, hi)
        w = fn((x - center + 0.5) / filterscale)
        total = w.sum()
        m[i, lo:hi] = w / total if total != 0.0 else w
    return m


def resize_pil(images: jax.Array, size: tuple[int, int], resample: str = "bicubic",
               clip: bool = False) -> jax.Array:
    """PIL `Image.resize(size[::-1], resample)` of float images [B, H, W, C] -> [B, *size, C].

    Same weights as PIL, horizontal pass first as PIL does, in float32 (PIL's float path, mode
    'F'). With `clip`, each pass is clamped to [0, 1] as PIL clamps uint8 RGB images to [0, 255]
    after each pass (bicubic overshoots at edges); PIL's rounding to uint8 is not reproduced.
    An image already at `size` is returned as is.
    """
    b, h, w, c = images.shape
    if (h, w) == tuple(size):
        return images
    mw = jnp.asarray(pil_resize_matrix(w, size[1], resample), jnp.float32)
    mh = jnp.asarray(pil_resize_matrix(h, size[0], resample), jnp.float32)
    hi = jax.lax.Precision.HIGHEST  # a resize must not lose bits to TF32 on GPUs
    limit = (lambda t: jnp.clip(t, 0.0, 1.0)) if clip else (lambda t: t)
    x = limit(jnp.einsum("xw,bhwc->bhxc", mw, images, precision=hi))
    return limit(jnp.einsum("yh,bhxc->byxc", mh, x, precision=hi))


def preprocess(images: jax.Array, size: int = PARSER_SIZE, resample: str = "bicubic",
               clip: bool = False) -> jax.Array:
    """RGB images in [0, 1] -> the parser's input. Differentiable.

    images: [B, H, W, 3] RGB, values in [0, 1] (ToTensor of a PNG, or (G(w) + 1) / 2).
    Returns [B, size, size, 3] float32 (float64 for float64 input): resized to size x size with
    PIL's filter (skipped when already that size) and normalised channel-wise with the ImageNet
    mean/std, (x - mean) / std. `resample='bicubic'` is what iFADIT's official mask code gets
    from `img.resize((512, 512))` (Pillow's default filter since 7.0); face-parsing's own
    `test.py` asks for 'bilinear'. Resizing runs in float32; `clip=True` clamps the resized values
    to [0, 1] as PIL does for uint8 images (PIL's rounding to 1/255 is not reproduced).
    """
    images = as_float(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InputError(f"preprocess expects [B, H, W, 3] RGB images, got {tuple(images.shape)}")
    x = resize_pil(images, (size, size), resample, clip)
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    return (x - mean) / std


# ----------------------------------------------------------------------------- network

def _bn(name: str):
    return nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name=name)


def _conv(features: int, k: int, stride: int = 1, pad: int = 0, name: str = ""):
    return nn.Conv(features, (k, k), strides=stride, padding=((pad, pad), (pad, pad)),
                   use_bias=False, name=name)


def _global_mean(x):
    return jnp.mean(x, axis=(1, 2), keepdims=True)


class ConvBNReLU(nn.Module):
    features: int
    kernel: int = 3

    @nn.compact
    def __call__(self, x):
        x = _conv(self.features, self.kernel, pad=self.kernel // 2, name="conv")(x)
        return nn.relu(_bn("bn")(x))


class BasicBlock(nn.Module):
    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        r = _conv(self.features, 3, self.stride, 1, name="conv1")(x)
        r = nn.relu(_bn("bn1")(r))
        r = _bn("bn2")(_conv(self.features, 3, 1, 1, name="conv2")(r))
        shortcut = x
        if x.shape[-1] != self.features or self.stride != 1:  # the official condition
            shortcut = _bn("downsample_bn")(
                _conv(self.features, 1, self.stride, name="downsample_conv")(x))
        return nn.relu(shortcut + r)


class Resnet18(nn.Module):
    """The official `resnet.Resnet18` trunk; returns the 1/8, 1/16 and 1/32 features."""

    stem_width: int
    layer_widths: Sequence[int]
    layer_blocks: Sequence[int]

    @nn.compact
    def __call__(self, x):
        x = nn.relu(_bn("bn1")(_conv(self.stem_width, 7, 2, 3, name="conv1")(x)))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        feats = []
        for li, (width, blocks) in enumerate(zip(self.layer_widths, self.layer_blocks)):
            for bi in range(blocks):
                stride = 2 if (li > 0 and bi == 0) else 1
                x = BasicBlock(width, stride, name=f"layer{li + 1}_{bi}")(x)
            feats.append(x)
        return feats[1], feats[2], feats[3]


class AttentionRefinement(nn.Module):
    """Official `AttentionRefinementModule`."""

    features: int

    @nn.compact
    def __call__(self, x):
        feat = ConvBNReLU(self.features, 3, name="conv")(x)
        atten = _conv(self.features, 1, name="conv_atten")(_global_mean(feat))
        atten = nn.sigmoid(_bn("bn_atten")(atten))
        return feat * atten


class ContextPath(nn.Module):
    stem_width: int
    layer_widths: Sequence[int]
    layer_blocks: Sequence[int]
    context_width: int

    @nn.compact
    def __call__(self, x):
        feat8, feat16, feat32 = Resnet18(self.stem_width, tuple(self.layer_widths),
                                         tuple(self.layer_blocks), name="resnet")(x)
        c = self.context_width
        avg = ConvBNReLU(c, 1, name="conv_avg")(_global_mean(feat32))
        avg_up = upsample_nearest(avg, feat32.shape[1:3])
        feat32_sum = AttentionRefinement(c, name="arm32")(feat32) + avg_up
        feat32_up = upsample_nearest(feat32_sum, feat16.shape[1:3])
        feat32_up = ConvBNReLU(c, 3, name="conv_head32")(feat32_up)
        feat16_sum = AttentionRefinement(c, name="arm16")(feat16) + feat32_up
        feat16_up = upsample_nearest(feat16_sum, feat8.shape[1:3])
        feat16_up = ConvBNReLU(c, 3, name="conv_head16")(feat16_up)
        return feat8, feat16_up, feat32_up


class FeatureFusion(nn.Module):
    """Official `FeatureFusionModule` (spatial features first in the concatenation)."""

    features: int
    attention_width: int

    @nn.compact
    def __call__(self, fsp, fcp):
        feat = ConvBNReLU(self.features, 1, name="convblk")(jnp.concatenate([fsp, fcp], axis=-1))
        atten = nn.relu(_conv(self.attention_width, 1, name="conv1")(_global_mean(feat)))
        atten = nn.sigmoid(_conv(self.features, 1, name="conv2")(atten))
        return feat * atten + feat


class OutputHead(nn.Module):
    """Official `BiSeNetOutput`: 3x3 ConvBNReLU -> 1x1 conv to classes (no bias)."""

    mid_width: int
    n_classes: int

    @nn.compact
    def __call__(self, x):
        x = ConvBNReLU(self.mid_width, 3, name="conv")(x)
        return _conv(self.n_classes, 1, name="conv_out")(x)


class BiSeNet(nn.Module):
    """`model.BiSeNet(n_classes)` with widths from the checkpoint (see DEFAULT_CONFIG)."""

    n_classes: int = 19
    stem_width: int = 64
    layer_widths: Sequence[int] = (64, 128, 256, 512)
    layer_blocks: Sequence[int] = (2, 2, 2, 2)
    context_width: int = 128
    fusion_width: int = 256
    fusion_attention_width: int = 64
    head_widths: Sequence[int] = (256, 64, 64)

    @nn.compact
    def __call__(self, x, upsample: bool = True):
        """x: [B, H, W, 3] ImageNet-normalised RGB (see `preprocess`; trained at 512x512).

        Returns (feat_out, feat_out16, feat_out32), logits over `n_classes`, NHWC: each
        [B, H, W, n_classes] (bilinear, align_corners=True, to the input size), or with
        `upsample=False` the heads' raw outputs at 1/8, 1/8 and 1/16 of the input size.
        """
        if x.ndim != 4 or x.shape[-1] != 3:
            raise InputError(f"BiSeNet expects [B, H, W, 3] normalised RGB images (use "
                             f"bisenet.preprocess), got {tuple(x.shape)}")
        feat_res8, feat_cp8, feat_cp16 = ContextPath(
            self.stem_width, tuple(self.layer_widths), tuple(self.layer_blocks),
            self.context_width, name="cp")(x)
        feat_fuse = FeatureFusion(self.fusion_width, self.fusion_attention_width,
                                  name="ffm")(feat_res8, feat_cp8)
        mid, mid16, mid32 = self.head_widths
        outs = (OutputHead(mid, self.n_classes, name="conv_out")(feat_fuse),
                OutputHead(mid16, self.n_classes, name="conv_out16")(feat_cp8),
                OutputHead(mid32, self.n_classes, name="conv_out32")(feat_cp16))
        if not upsample:
            return outs
        size = x.shape[1:3]
        return tuple(resample.bilinear_align_corners(o, size) for o in outs)

    def labels(self, x):
        """[B, H, W] int32 argmax of feat_out: the official parsing map."""
        return jnp.argmax(self(x)[0], axis=-1)


@base.netconfig
class BiSeNetConfig(base.NetConfig):
    """What `ports/convert_bisenet.py` infers (see `BiSeNet` and DEFAULT_CONFIG)."""

    KIND: ClassVar[str] = "bisenet"
    SCHEMA: ClassVar[dict] = {
        "n_classes": base.Int(), "stem_width": base.Int(), "layer_widths": base.List(base.Int(), 4, 4),
        "layer_blocks": base.List(base.Int(1, base.MAX_DEPTH), 4, 4), "context_width": base.Int(),
        "fusion_width": base.Int(), "fusion_attention_width": base.Int(),
        "head_widths": base.List(base.Int(), 3, 3)}

    n_classes: int
    stem_width: int
    layer_widths: tuple[int, ...]
    layer_blocks: tuple[int, ...]
    context_width: int
    fusion_width: int
    fusion_attention_width: int
    head_widths: tuple[int, ...]

    def module(self) -> BiSeNet:
        return BiSeNet(**{name: getattr(self, name) for name in self.SCHEMA})

    def init_inputs(self) -> tuple:
        return (base.spec(1, 64, 64, 3),)  # fully convolutional: the size does not matter


def module_from_config(config) -> BiSeNet:
    """The module of a config (a `BiSeNetConfig` or its JSON dict)."""
    return base.parse_config(BiSeNetConfig, config, "BiSeNet config").module()


class LoadedBiSeNet(base.Loaded):
    """A converted BiSeNet face parser.

    `net(x)` -> (feat_out, feat_out16, feat_out32), each [B, H, W, 19] logits, for x
    [B, H, W, 3] ImageNet-normalised RGB (`bisenet.preprocess(images_0_1)`; 512x512 is the
    trained size). `net.lowres(x)` -> the same heads before upsampling (1/8, 1/8, 1/16).
    `net.labels(x)` -> [B, H, W] int32 argmax of feat_out (the official parsing map).
    Inside your own jit call the pure function `net.module.apply(net.variables, x)`.
    """

    CONFIG = BiSeNetConfig

    def __call__(self, x) -> tuple[jax.Array, jax.Array, jax.Array]:
        return self._run(None, base.f32(x))

    def lowres(self, x) -> tuple[jax.Array, jax.Array, jax.Array]:
        return self._run(None, base.f32(x), upsample=False)

    def labels(self, x) -> jax.Array:
        return self._run("labels", base.f32(x))


from_weights = LoadedBiSeNet.from_weights


def load(path) -> LoadedBiSeNet:
    """Loads a file written by ports/convert_bisenet.py."""
    from ifadit_jax import weights

    variables, meta = weights.read(path, kind="bisenet")
    return from_weights(variables, meta)


__all__: Sequence[str] = ("BiSeNet", "DEFAULT_CONFIG", "PARSER_SIZE", "preprocess", "resize_pil",
                          "pil_resize_matrix",
                          "upsample_nearest", "LoadedBiSeNet", "from_weights", "load")
