"""MTCNN face detector (Zhang et al. 2016) as shipped by facenet-pytorch: P-, R- and O-Net plus `detect`.

The three networks are Flax modules on NHWC float32 input normalized as the official code feeds them,
`(uint8 - 127.5) * 0.0078125`, i.e. values in [-0.996, 0.996]:

- PNet  [B, H, W, 3] (H, W >= 12) -> (reg [B, h, w, 4], prob [B, h, w, 2]),  h = ceil((H - 2) / 2) - 4
- RNet  [N, 24, 24, 3]            -> (reg [N, 4], prob [N, 2])
- ONet  [N, 48, 48, 3]            -> (reg [N, 4], landmarks [N, 10] (5 x then 5 y, as fractions of
                                      the box size), prob [N, 2])

`prob[..., 1]` is the face probability (softmax over the two channels).

`MTCNN.detect(image)` reproduces facenet-pytorch's `MTCNN(keep_all=True).detect(img, landmarks=True)`
(`models/utils/detect_face.py`) detail for detail, because its boxes feed alignment and Table 2 and
a one-pixel difference in a crop moves every later stage:

- pyramid scales `12 / min_face_size * factor**i` while `min(H, W) * scale >= 12`, each level resized to
  `(int(H*s + 1), int(W*s + 1))` with torch's `area` interpolation (adaptive average pooling with
  non-integer windows; computed exactly here from an integral image, sum / kh / kw in float32);
- stage 1: PNet cells with prob >= t0 become boxes `floor((2*pos + 1) / s)`, `floor((2*pos + 12) / s)`;
  NMS (torchvision semantics, no +1) 0.5 per scale, then 0.7 over all scales; regression with widths
  `x2 - x1`; boxes squared (`rerec`);
- stage 2: integer crops (truncated, clipped to 1-based [1, W] x [1, H]) resized to 24x24, RNet,
  keep prob > t1, NMS 0.7, regression with widths `x2 - x1 + 1`, squared again;
- stage 3: crops at 48x48, ONet, keep prob > t2, landmarks from the box *before* the last regression,
  regression, then facenet-pytorch's own NMS ("Min": overlap = inter / min(area) with +1 areas,
  keep overlap <= 0.7);
- results sorted by box area, largest first.

The networks run in JAX (jitted, float32 at HIGHEST precision so that detections do not depend on the
backend's default TF32/bf16 matmul passes); the data-dependent glue (thresholds, NMS, crop windows)
is numpy, copying the official float32 arithmetic operation by operation. PNet inputs are zero-padded
to size buckets and the padding is masked before the first (ceil-mode) max pool, so one compiled
program serves many pyramid sizes; RNet/ONet candidates are batched and padded to a few fixed batch
sizes. One deliberate difference: a candidate whose clipped crop is empty (a box wholly outside the
image) is dropped, where the official code would misalign its outputs or raise.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ifadit_jax.errors import InputError
from ifadit_jax.nets import base, irse

_HIGHEST = jax.lax.Precision.HIGHEST

# Official defaults of facenet-pytorch's MTCNN.
MIN_FACE_SIZE = 20
THRESHOLDS = (0.6, 0.7, 0.7)
FACTOR = 0.709
# RNet/ONet batches are padded to one of a dozen sizes in [_MIN_BATCH, _MAX_BATCH] and run in chunks
# of _MAX_BATCH (the official code also runs chunks of 512), so a few programs serve any count.
_MIN_BATCH = 8
_MAX_BATCH = 512


# ----------------------------------------------------------------------------------------------
# Networks




def _conv(features: int, k: int, name: str) -> nn.Conv:
    return nn.Conv(features, (k, k), padding="VALID", precision=_HIGHEST, name=name)


def _dense(features: int, name: str) -> nn.Dense:
    return nn.Dense(features, precision=_HIGHEST, name=name)


def max_pool_ceil(x: jax.Array, k: int, s: int) -> jax.Array:
    """torch `MaxPool2d(k, s, ceil_mode=True)` (no padding) on NHWC.

    Ceil mode keeps a last, partial window as long as it starts inside the input; the missing
    part is padded with -inf so it never wins the max.
    """
    def out_size(n):
        o = -(-(n - k) // s) + 1
        return o - 1 if (o - 1) * s >= n else o

    pads = [(0, (out_size(n) - 1) * s + k - n) for n in x.shape[1:3]]
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, s, s, 1),
                                 [(0, 0), *pads, (0, 0)])


def _flatten_whc(x: jax.Array) -> jax.Array:
    """[N, H, W, C] -> [N, W*H*C] in the order of torch's `x.permute(0, 3, 2, 1).view(N, -1)` on NCHW."""
    return jnp.transpose(x, (0, 2, 1, 3)).reshape(x.shape[0], -1)


class PNet(nn.Module):
    """Proposal net, fully convolutional; see the module docstring for shapes."""

    widths: Sequence[int] = (10, 16, 32)

    @nn.compact
    def __call__(self, x, valid_hw=None):
        """`valid_hw` ([2] int, optional): the true height and width of `x` when `x` was zero-padded
        at the bottom/right; outputs inside the true output size are then exactly those of the
        unpadded input (the padding is masked out of the ceil-mode pool)."""
        c1, c2, c3 = self.widths
        x = irse.PReLU(name="prelu1")(_conv(c1, 3, "conv1")(x))
        if valid_hw is not None:
            rows = jnp.arange(x.shape[1])[:, None] < valid_hw[0] - 2
            cols = jnp.arange(x.shape[2])[None, :] < valid_hw[1] - 2
            x = jnp.where((rows & cols)[None, :, :, None], x, -jnp.inf)
        x = max_pool_ceil(x, 2, 2)
        if valid_hw is not None:
            # Pool windows lying wholly in the padding are -inf; keep the padding region finite.
            x = jnp.where(jnp.isfinite(x), x, 0.0)
        x = irse.PReLU(name="prelu2")(_conv(c2, 3, "conv2")(x))
        x = irse.PReLU(name="prelu3")(_conv(c3, 3, "conv3")(x))
        prob = jax.nn.softmax(_conv(2, 1, "conv4_1")(x), axis=-1)
        reg = _conv(4, 1, "conv4_2")(x)
        return reg, prob


class RNet(nn.Module):
    """Refinement net on 24x24 crops; see the module docstring for shapes."""

    widths: Sequence[int] = (28, 48, 64, 128)

    @nn.compact
    def __call__(self, x):
        c1, c2, c3, d4 = self.widths
        x = max_pool_ceil(irse.PReLU(name="prelu1")(_conv(c1, 3, "conv1")(x)), 3, 2)
        x = max_pool_ceil(irse.PReLU(name="prelu2")(_conv(c2, 3, "conv2")(x)), 3, 2)
        x = irse.PReLU(name="prelu3")(_conv(c3, 2, "conv3")(x))
        x = irse.PReLU(name="prelu4")(_dense(d4, "dense4")(_flatten_whc(x)))
        prob = jax.nn.softmax(_dense(2, "dense5_1")(x), axis=-1)
        reg = _dense(4, "dense5_2")(x)
        return reg, prob


class ONet(nn.Module):
    """Output net on 48x48 crops; see the module docstring for shapes."""

    widths: Sequence[int] = (32, 64, 64, 128, 256)

    @nn.compact
    def __call__(self, x):
        c1, c2, c3, c4, d5 = self.widths
        x = max_pool_ceil(irse.PReLU(name="prelu1")(_conv(c1, 3, "conv1")(x)), 3, 2)
        x = max_pool_ceil(irse.PReLU(name="prelu2")(_conv(c2, 3, "conv2")(x)), 3, 2)
        x = max_pool_ceil(irse.PReLU(name="prelu3")(_conv(c3, 3, "conv3")(x)), 2, 2)
        x = irse.PReLU(name="prelu4")(_conv(c4, 2, "conv4")(x))
        x = irse.PReLU(name="prelu5")(_dense(d5, "dense5")(_flatten_whc(x)))
        prob = jax.nn.softmax(_dense(2, "dense6_1")(x), axis=-1)
        reg = _dense(4, "dense6_2")(x)
        landmarks = _dense(10, "dense6_3")(x)
        return reg, landmarks, prob


class MTCNNNets(nn.Module):
    """The three nets under one variable tree: params/{pnet,rnet,onet}/...

    Call one net with `module.apply(variables, x, method="run_pnet")` (or run_rnet / run_onet);
    `__call__(p, r, o)` runs all three (used for init and shape checks).
    """

    pnet_widths: Sequence[int] = (10, 16, 32)
    rnet_widths: Sequence[int] = (28, 48, 64, 128)
    onet_widths: Sequence[int] = (32, 64, 64, 128, 256)

    def setup(self):
        self.pnet = PNet(tuple(self.pnet_widths))
        self.rnet = RNet(tuple(self.rnet_widths))
        self.onet = ONet(tuple(self.onet_widths))

    def run_pnet(self, x, valid_hw=None):
        return self.pnet(x, valid_hw)

    def run_rnet(self, x):
        return self.rnet(x)

    def run_onet(self, x):
        return self.onet(x)

    def __call__(self, x_pnet, x_rnet, x_onet):
        return self.pnet(x_pnet), self.rnet(x_rnet), self.onet(x_onet)


def init_inputs() -> tuple[jax.Array, jax.Array, jax.Array]:
    """Smallest inputs for `MTCNNNets.init` / `jax.eval_shape`."""
    return (jnp.zeros((1, 12, 12, 3), jnp.float32), jnp.zeros((1, 24, 24, 3), jnp.float32),
            jnp.zeros((1, 48, 48, 3), jnp.float32))


# ----------------------------------------------------------------------------------------------
# Detection glue (numpy, float32 like the official tensors)

_F32 = np.float32


def pyramid_scales(height: int, width: int, min_face_size: float = MIN_FACE_SIZE,
                   factor: float = FACTOR) -> list[float]:
    """Scale factors of the image pyramid, in Python floats exactly as the official loop makes them."""
    scale = 12.0 / min_face_size
    min_side = min(height, width) * scale
    scales = []
    while min_side >= 12:
        scales.append(scale)
        scale = scale * factor
        min_side = min_side * factor
    return scales


def pyramid_sizes(height: int, width: int, scales: Sequence[float]) -> list[tuple[int, int]]:
    """PNet input (height, width) per scale: `int(h * s + 1)`."""
    return [(int(height * s + 1), int(width * s + 1)) for s in scales]


def integral_image(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> int64 [H+1, W+1, 3] with S[y, x] = sum of image[:y, :x]."""
    s = np.zeros((image.shape[0] + 1, image.shape[1] + 1, image.shape[2]), np.int64)
    s[1:, 1:] = image
    np.cumsum(s, axis=0, out=s)
    np.cumsum(s, axis=1, out=s)
    return s


def _pool_windows(start: np.ndarray, length: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Adaptive-pooling windows [floor(i*n/size), ceil((i+1)*n/size)) of spans starting at `start`."""
    i = np.arange(size, dtype=np.int64)[None, :]
    n = length[:, None]
    return start[:, None] + (i * n) // size, start[:, None] + ((i + 1) * n + size - 1) // size


def area_resize(integral: np.ndarray, y0: np.ndarray, y1: np.ndarray, x0: np.ndarray,
                x1: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """torch `interpolate(mode='area')` of the crops image[y0:y1, x0:x1] (0-based, end exclusive).

    `integral` from `integral_image`; y0.. are int arrays [N]. Returns float32 [N, out_h, out_w, 3]
    in [0, 255]. Window sums of integer pixels are exact, then divided by kh and by kw in float32 as
    torch's CPU kernel does.
    """
    r0, r1 = _pool_windows(np.asarray(y0, np.int64), np.asarray(y1, np.int64) - y0, out_h)
    c0, c1 = _pool_windows(np.asarray(x0, np.int64), np.asarray(x1, np.int64) - x0, out_w)
    # Gather corners through flat row indices (much faster than 2-D fancy indexing).
    flat = integral.reshape(-1, integral.shape[2])
    top, bottom = r0[:, :, None] * integral.shape[1], r1[:, :, None] * integral.shape[1]
    left, right = c0[:, None, :], c1[:, None, :]
    total = (np.take(flat, bottom + right, axis=0) - np.take(flat, top + right, axis=0)
             - np.take(flat, bottom + left, axis=0) + np.take(flat, top + left, axis=0))
    kh = (r1 - r0).astype(_F32)[:, :, None, None]
    kw = (c1 - c0).astype(_F32)[:, None, :, None]
    return total.astype(_F32) / kh / kw


def normalize(pixels: np.ndarray) -> np.ndarray:
    """[0, 255] float32 -> network input `(x - 127.5) * 0.0078125`."""
    return (pixels.astype(_F32) - _F32(127.5)) * _F32(0.0078125)


def boxes_from_pnet(reg: np.ndarray, face_prob: np.ndarray, scale: float,
                    threshold: float) -> np.ndarray:
    """PNet maps of one image (reg [h, w, 4], face_prob [h, w]) -> float32 [n, 9]
    rows (x1, y1, x2, y2, score, reg0..reg3), in row-major cell order (official generateBoundingBox)."""
    ys, xs = np.nonzero(face_prob >= _F32(threshold))
    pos = np.stack([xs, ys], axis=1).astype(_F32)
    s = _F32(scale)
    q1 = np.floor((_F32(2) * pos + _F32(1)) / s)
    q2 = np.floor((_F32(2) * pos + _F32(12)) / s)
    return np.concatenate([q1, q2, face_prob[ys, xs][:, None], reg[ys, xs]], axis=1).astype(_F32)


def nms_iou(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """torchvision's CPU `nms`: stable descending sort, IoU without +1, suppress IoU > threshold.

    Returns kept indices, highest score first.
    """
    boxes = boxes.astype(_F32)
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    suppressed = np.zeros(len(order), bool)
    keep = []
    for n, i in enumerate(order):
        if suppressed[n]:
            continue
        keep.append(i)
        rest = order[n + 1:]
        w = np.maximum(_F32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(_F32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        # torchvision compares the float32 IoU with the threshold as a double.
        suppressed[n + 1:] |= iou.astype(np.float64) > threshold
    return np.asarray(keep, np.int64)


def nms_min(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """facenet-pytorch's `nms_numpy(..., 'Min')`: +1 areas, overlap = inter / min(area), keeps
    overlap <= threshold; candidates taken from the end of `np.argsort(scores)`."""
    boxes = boxes.astype(_F32)
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + _F32(1)) * (y2 - y1 + _F32(1))
    order = np.argsort(scores)
    keep = []
    while order.size > 0:
        i = order[-1]
        keep.append(i)
        rest = order[:-1]
        w = np.maximum(_F32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + _F32(1))
        h = np.maximum(_F32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + _F32(1))
        overlap = (w * h) / np.minimum(areas[i], areas[rest])
        order = rest[overlap <= _F32(threshold)]
    return np.asarray(keep, np.int64)


def regress(boxes: np.ndarray, reg: np.ndarray, plus_one: bool) -> np.ndarray:
    """Moves box corners by reg * box size; size is x2 - x1 (stage 1) or x2 - x1 + 1 (`bbreg`)."""
    out = boxes.astype(_F32).copy()
    w = out[:, 2] - out[:, 0]
    h = out[:, 3] - out[:, 1]
    if plus_one:
        w, h = w + _F32(1), h + _F32(1)
    reg = reg.astype(_F32)
    out[:, 0] = out[:, 0] + reg[:, 0] * w
    out[:, 1] = out[:, 1] + reg[:, 1] * h
    out[:, 2] = out[:, 2] + reg[:, 2] * w
    out[:, 3] = out[:, 3] + reg[:, 3] * h
    return out


def square(boxes: np.ndarray) -> np.ndarray:
    """Official `rerec`: grows each box to a square of side max(w, h) around its centre."""
    out = boxes.astype(_F32).copy()
    h = out[:, 3] - out[:, 1]
    w = out[:, 2] - out[:, 0]
    side = np.maximum(w, h)
    out[:, 0] = out[:, 0] + w * _F32(0.5) - side * _F32(0.5)
    out[:, 1] = out[:, 1] + h * _F32(0.5) - side * _F32(0.5)
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def crop_windows(boxes: np.ndarray, width: int, height: int):
    """Official `pad`: truncate to int, clip to 1-based [1, W] x [1, H]; the crop is
    image[y - 1:ey, x - 1:ex]. Returns 0-based (y0, y1, x0, x1) and the mask of non-empty crops."""
    b = np.trunc(boxes[:, :4]).astype(np.int64)
    x = np.maximum(b[:, 0], 1)
    y = np.maximum(b[:, 1], 1)
    ex = np.minimum(b[:, 2], width)
    ey = np.minimum(b[:, 3], height)
    ok = (ey > y - 1) & (ex > x - 1)
    return y - 1, ey, x - 1, ex, ok


def _bucket(n: int) -> int:
    """Rounds a pyramid side up to a multiple of 2**(bit_length - 3) (>= 16): at most 25% padding,
    a few sizes per octave, shared by all images."""
    step = max(16, 1 << max(n.bit_length() - 3, 0))
    return -(-n // step) * step


def _batch_bucket(n: int) -> int:
    """Smallest of 8, 12, 16, 24, 32, 48, ... (powers of two and 1.5 times them) that holds n."""
    size = _MIN_BATCH
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


@dataclasses.dataclass
class Detection:
    """Everything `MTCNN.detect_stages` computed, for tests and debugging.

    boxes [N, 4] (x1, y1, x2, y2 pixels), probs [N], landmarks [N, 5, 2] (x, y) are the results,
    largest box first. The rest are intermediates: pyramid scales and PNet input sizes, and the
    RNet/ONet outputs on all their candidates in the order fed.
    """

    boxes: np.ndarray
    probs: np.ndarray
    landmarks: np.ndarray
    scales: list
    pnet_input_hw: list
    rnet_reg: np.ndarray
    rnet_prob: np.ndarray
    onet_reg: np.ndarray
    onet_landmarks: np.ndarray
    onet_prob: np.ndarray


@base.netconfig
class MTCNNConfig(base.NetConfig):
    """What `ports/convert_mtcnn.py` infers: the output widths of each net's layers."""

    KIND: ClassVar[str] = "mtcnn"
    SCHEMA: ClassVar[dict] = {"pnet_widths": base.List(base.Int(), 3, 3),
                              "rnet_widths": base.List(base.Int(), 4, 4),
                              "onet_widths": base.List(base.Int(), 5, 5)}

    pnet_widths: tuple[int, ...] = (10, 16, 32)
    rnet_widths: tuple[int, ...] = (28, 48, 64, 128)
    onet_widths: tuple[int, ...] = (32, 64, 64, 128, 256)

    def module(self) -> MTCNNNets:
        return MTCNNNets(self.pnet_widths, self.rnet_widths, self.onet_widths)

    def init_inputs(self) -> tuple:
        return tuple(base.spec(*x.shape) for x in init_inputs())


class MTCNN(base.Loaded):
    """Loaded MTCNN: `detect(image)` plus the raw nets `pnet(x)`, `rnet(x)`, `onet(x)`.

    `module` (MTCNNNets) and `variables` stay reachable for use inside other jitted code.
    """

    CONFIG = MTCNNConfig

    def __init__(self, config: Any, variables: dict, meta: Any = None):
        super().__init__(config, variables, meta)
        apply = self.module.apply
        self._pnet = jax.jit(functools.partial(apply, method="run_pnet"))
        self._rnet = jax.jit(functools.partial(apply, method="run_rnet"))
        self._onet = jax.jit(functools.partial(apply, method="run_onet"))

    # Raw nets on official normalized NHWC input (see module docstring).
    def pnet(self, x):
        """[B, H, W, 3] -> (reg [B, h, w, 4], prob [B, h, w, 2])."""
        return self._pnet(self.variables, jnp.asarray(x, jnp.float32))

    def rnet(self, x):
        """[N, 24, 24, 3] -> (reg [N, 4], prob [N, 2])."""
        return self._rnet(self.variables, jnp.asarray(x, jnp.float32))

    def onet(self, x):
        """[N, 48, 48, 3] -> (reg [N, 4], landmarks [N, 10], prob [N, 2])."""
        return self._onet(self.variables, jnp.asarray(x, jnp.float32))

    # Detection.
    def detect(self, image, min_face_size: float = MIN_FACE_SIZE,
               thresholds: Sequence[float] = THRESHOLDS, factor: float = FACTOR):
        """uint8 [H, W, 3] RGB -> (boxes [N, 4] x1, y1, x2, y2 in pixels, probs [N], landmarks
        [N, 5, 2] (x, y) of the left eye, right eye, nose, left and right mouth corner, left/right
        as seen in the image), float32 numpy, largest box first; N = 0 (arrays of shape [0, 4],
        [0], [0, 5, 2]) when no face is found."""
        d = self.detect_stages(image, min_face_size, thresholds, factor)
        return d.boxes, d.probs, d.landmarks

    def _pnet_start(self, pixels: np.ndarray):
        """Dispatches PNet on one pyramid level [h, w, 3] (normalized), padded to its size bucket.

        Returns a callable that waits for the result: (reg [oh, ow, 4], face prob [oh, ow])."""
        result = self._pnet_start_many(pixels[None])
        return lambda: result()[0]

    def _pnet_start_many(self, pixels: np.ndarray):
        """`_pnet_start` for one pyramid level of several frames [B, h, w, 3]; the batch is padded
        to a power of two (few programs) -> a callable giving [(reg, prob) per frame]."""
        b, h, w = pixels.shape[:3]
        padded = np.zeros((1 << (b - 1).bit_length(), _bucket(h), _bucket(w), 3), _F32)
        padded[:b, :h, :w] = pixels
        reg, prob = self._pnet(self.variables, padded, np.array([h, w], np.int32))
        oh, ow = -(-(h - 2) // 2) - 4, -(-(w - 2) // 2) - 4
        return lambda: [(r[:oh, :ow], p[:oh, :ow, 1])
                        for r, p in zip(np.asarray(reg)[:b], np.asarray(prob)[:b])]

    def _pnet_maps(self, pixels: np.ndarray):
        """PNet on one pyramid level through the bucketed program: (reg [oh, ow, 4], prob [oh, ow])."""
        return self._pnet_start(pixels)()

    def _batched(self, fn, x: np.ndarray):
        """Runs a crop net on [N, s, s, 3] in chunks padded to `_batch_bucket` sizes; numpy outputs."""
        outs = []
        for start in range(0, len(x), _MAX_BATCH):
            chunk = x[start:start + _MAX_BATCH]
            padded = np.zeros((_batch_bucket(len(chunk)), *chunk.shape[1:]), _F32)
            padded[:len(chunk)] = chunk
            outs.append([np.asarray(o)[:len(chunk)] for o in fn(self.variables, padded)])
        return [np.concatenate(parts) for parts in zip(*outs)]

    def _batched_split(self, fn, crops: list, widths: int):
        """`_batched` over the crops of several frames at once -> per frame, the outputs (empty
        arrays with `widths` columns for a frame without crops)."""
        counts = [len(c) for c in crops]
        if not sum(counts):
            return [[np.zeros((0, k), _F32) for k in widths] for _ in crops]
        outs = self._batched(fn, np.concatenate([c for c in crops if len(c)]))
        cuts = np.cumsum(counts)[:-1]
        return [list(parts) for parts in zip(*(np.split(o, cuts) for o in outs))]

    @staticmethod
    def _crops(integral: np.ndarray, boxes: np.ndarray, size: int):
        """Integer crops of `boxes` resized to size x size (normalized) -> (crops, boxes kept)."""
        height, width = integral.shape[0] - 1, integral.shape[1] - 1
        y0, y1, x0, x1, ok = crop_windows(boxes, width, height)
        boxes = boxes[ok]
        if not len(boxes):
            return np.zeros((0, size, size, 3), _F32), boxes
        return normalize(area_resize(integral, y0[ok], y1[ok], x0[ok], x1[ok], size, size)), boxes

    @staticmethod
    def _rnet_select(boxes: np.ndarray, rnet_reg: np.ndarray, rnet_prob: np.ndarray, threshold: float):
        """Stage 2 after RNet: keep prob > threshold, NMS 0.7, regress, square -> boxes [N, 5]."""
        if not len(boxes):
            return boxes
        keep = rnet_prob[:, 1] > _F32(threshold)
        boxes = np.concatenate([boxes[keep, :4], rnet_prob[keep, 1:2]], axis=1)
        reg = rnet_reg[keep]
        pick = nms_iou(boxes[:, :4], boxes[:, 4], 0.7)
        return square(regress(boxes[pick], reg[pick], plus_one=True))

    @staticmethod
    def _onet_select(boxes, onet_reg, onet_landmarks, onet_prob, threshold: float):
        """Stage 3 after ONet: keep, landmarks from the box before the last regression, regress,
        "Min" NMS -> (boxes [N, 5], landmarks [N, 5, 2])."""
        if not len(boxes):
            return boxes, np.zeros((0, 5, 2), _F32)
        keep = onet_prob[:, 1] > _F32(threshold)
        boxes = np.concatenate([boxes[keep, :4], onet_prob[keep, 1:2]], axis=1)
        points = onet_landmarks[keep]
        w = boxes[:, 2] - boxes[:, 0] + _F32(1)
        h = boxes[:, 3] - boxes[:, 1] + _F32(1)
        px = w[:, None] * points[:, :5] + boxes[:, 0:1] - _F32(1)
        py = h[:, None] * points[:, 5:] + boxes[:, 1:2] - _F32(1)
        landmarks = np.stack([px, py], axis=2)
        boxes = regress(boxes, onet_reg[keep], plus_one=True)
        pick = nms_min(boxes[:, :4], boxes[:, 4], 0.7)
        return boxes[pick], landmarks[pick]

    def _pnet_stage(self, integrals: list, min_face_size: float, factor: float, threshold: float) -> list:
        """Stage 1 over the pyramid of frames of one size, each level one PNet call for all
        frames -> per frame, the squared candidate boxes [N, 5]."""
        height, width = integrals[0].shape[0] - 1, integrals[0].shape[1] - 1
        one = lambda v: np.array([v], np.int64)  # noqa: E731
        scales = pyramid_scales(height, width, min_face_size, factor)
        # All levels are dispatched before any result is read, so resizing overlaps device work.
        results = [self._pnet_start_many(np.stack([normalize(
            area_resize(ii, one(0), one(height), one(0), one(width), hs, ws)[0]) for ii in integrals]))
            for hs, ws in pyramid_sizes(height, width, scales)]
        per_frame = [[] for _ in integrals]
        for scale, result in zip(scales, results):
            for i, maps in enumerate(result()):
                cand = boxes_from_pnet(*maps, scale, threshold)
                per_frame[i].append(cand[nms_iou(cand[:, :4], cand[:, 4], 0.5)])
        out = []
        for parts in per_frame:
            boxes = np.concatenate(parts) if parts else np.zeros((0, 9), _F32)
            boxes = boxes[nms_iou(boxes[:, :4], boxes[:, 4], 0.7)]
            out.append(square(np.concatenate([regress(boxes[:, :4], boxes[:, 5:9], plus_one=False),
                                              boxes[:, 4:5]], axis=1)))
        return out

    def _stages(self, images: list, min_face_size: float, thresholds: Sequence[float],
                factor: float) -> list[Detection]:
        """The three stages for frames of one size, each net called once for all of them."""
        integrals = [integral_image(i) for i in images]
        t_pnet, t_rnet, t_onet = (float(t) for t in thresholds)
        boxes = self._pnet_stage(integrals, min_face_size, factor, t_pnet)
        cut = [self._crops(ii, b, 24) for ii, b in zip(integrals, boxes)]
        rnet = self._batched_split(self._rnet, [c for c, _ in cut], (4, 2))
        boxes = [self._rnet_select(b, *r, t_rnet) for (_, b), r in zip(cut, rnet)]
        cut = [self._crops(ii, b, 48) for ii, b in zip(integrals, boxes)]
        onet = self._batched_split(self._onet, [c for c, _ in cut], (4, 10, 2))
        out = []
        for (_, b), r, o in zip(cut, rnet, onet):
            b, lm = self._onet_select(b, *o, t_onet)
            # Official select_largest ordering.
            order = np.argsort((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[::-1]
            out.append(Detection(boxes=np.ascontiguousarray(b[order, :4], _F32),
                                 probs=np.ascontiguousarray(b[order, 4], _F32),
                                 landmarks=np.ascontiguousarray(lm[order], _F32).reshape(-1, 5, 2),
                                 scales=[], pnet_input_hw=[], rnet_reg=r[0], rnet_prob=r[1],
                                 onet_reg=o[0], onet_landmarks=o[1], onet_prob=o[2]))
        return out

    def detect_stages(self, image, min_face_size: float = MIN_FACE_SIZE,
                      thresholds: Sequence[float] = THRESHOLDS, factor: float = FACTOR) -> Detection:
        """`detect` with its intermediates (see `Detection`)."""
        image = _check_image(image)
        d = self._stages([image], min_face_size, thresholds, factor)[0]
        d.scales = pyramid_scales(image.shape[0], image.shape[1], min_face_size, factor)
        d.pnet_input_hw = pyramid_sizes(image.shape[0], image.shape[1], d.scales)
        return d

    def detect_many(self, images: Sequence, min_face_size: float = MIN_FACE_SIZE,
                    thresholds: Sequence[float] = THRESHOLDS, factor: float = FACTOR) -> list[tuple]:
        """`detect` on several uint8 RGB frames of one size (video), each network called once
        per pyramid level / stage for all of them -> per frame (boxes, probs, landmarks), the
        same as `detect` on that frame alone."""
        images = [_check_image(i) for i in images]
        if len({i.shape for i in images}) > 1:
            raise InputError("MTCNN.detect_many expects frames of one size")
        if not images:
            return []
        return [(d.boxes, d.probs, d.landmarks)
                for d in self._stages(images, min_face_size, thresholds, factor)]


def _check_image(image: Any) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"MTCNN.detect expects a uint8 RGB image [H, W, 3], got {image.dtype} "
                         f"{tuple(image.shape)}")
    return image


from_weights = MTCNN.from_weights
