"""The refinement step of iFADIT (paper Eq. 11): X = M * X_G + (1 - M) * X with a soft face mask M.

Official behaviour (lixionga/ProFace, FacePrivacy/iFADIT):
  * the mask comes from the BiSeNet face parser (`ifadit_jax.nets.bisenet`) run at 512x512
    (`models/deghosting/fixed_imgs.py: inference`: PIL `img.resize((512, 512))`, ToTensor,
    ImageNet Normalize), `parsing = feat_out.argmax(classes)`, resized back to the image size with
    `cv2.resize(..., INTER_NEAREST)`, and set to 1 on the face classes FACE_LABELS
    (skin, brows, eyes, glasses, nose, mouth, lips) and to the background value elsewhere;
  * `utils/utils_data.py: get_masked_imgs(fg, bg, masks)` then dilates the mask
    (`1 - tensor_erode(1 - masks)`, a 5x5 window, i.e. a 5x5 max filter with zero padding),
    blurs it with `cv2.GaussianBlur(mask, (15, 15), -1)` (sigma 2.6 from OpenCV's rule for
    ksize 15, float32 taps, BORDER_REFLECT_101, separable, per channel) and blends
    `fg * mask + (1 - mask) * bg`.

Background value: the official `inference` paints non-face classes with colour 10 (so the saved
mask PNGs read back as 10/255, not 0), while its tensor variant `get_fixed_imgs` uses 0. Which one
produced the masks of the official test set is not recorded; `background=0.0` (the paper's
binary face mask) is the default, pass `background=10/255` for the PNG variant.

Everything here is a pure, jittable function on NHWC float32 arrays:
  face_labels / face_labels_from_lowres -> [B, H, W] int32 class map at the image size
  binary_face_mask(labels)              -> [B, H, W, 1] in {background, 1}
  dilate, gaussian_blur, soften         -> same shape as the mask ([B, H, W, C], any C)
  face_mask(logits, image_hw)           -> soft mask [B, H, W, 1] in [0, 1]
  face_mask_from_images(parser, images) -> soft mask [B, H, W, 1] in [0, 1] (runs the parser;
                                           `face_mask_from_parser` is its pure form)
  blend(fg, bg, mask), soften_and_blend(fg, bg, masks) (= get_masked_imgs)
Masks are single-channel: the official masks are 3 identical channels and the blur is per channel,
so one channel broadcast over RGB gives the same result.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ifadit_jax.errors import InputError
from ifadit_jax.nets import bisenet, resample

# CelebAMask-HQ classes kept by iFADIT: 1 skin, 2/3 brows, 4/5 eyes, 6 glasses, 10 nose, 11 mouth,
# 12/13 lips (not ears, earrings, neck, necklace, cloth, hair, hat or background).
FACE_LABELS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 10, 11, 12, 13)
DILATE_SIZE = 5
BLUR_SIZE = 15


# ----------------------------------------------------------------------------- labels -> mask

def cv2_nearest_index(src_size: int, dst_size: int) -> np.ndarray:
    """Source index of each output pixel of `cv2.resize(..., interpolation=INTER_NEAREST)`.

    OpenCV's rule: floor(x * (1 / (dst / src))), clamped; for 512 -> 256 it keeps the even pixels.
    """
    inv_scale = dst_size / src_size
    ifx = 1.0 / inv_scale
    return np.minimum(np.floor(np.arange(dst_size) * ifx).astype(np.int64), src_size - 1)


def face_labels(logits: jax.Array, image_hw: tuple[int, int]) -> jax.Array:
    """Parser class map at the image size, as the official code makes it.

    logits: [B, Hp, Wp, n_classes], the parser's main output (`feat_out`) at its input size (512).
    Returns [B, H, W] int32: argmax over classes (first maximum wins, like numpy), then
    `cv2.resize(INTER_NEAREST)` to image_hw.
    """
    labels = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    rows = cv2_nearest_index(logits.shape[1], image_hw[0])
    cols = cv2_nearest_index(logits.shape[2], image_hw[1])
    return labels[:, rows][:, :, cols]


def face_labels_from_lowres(logits_lowres: jax.Array, parser_hw: tuple[int, int],
                            image_hw: tuple[int, int]) -> jax.Array:
    """`face_labels` from the main head before its upsampling (`net.lowres(x)[0]`).

    Same result as `face_labels(upsample(logits_lowres, parser_hw), image_hw)`, but only the
    upsampled pixels that the nearest-neighbour resize keeps are computed.
    """
    rows = cv2_nearest_index(parser_hw[0], image_hw[0])
    cols = cv2_nearest_index(parser_hw[1], image_hw[1])
    logits = resample.bilinear_align_corners(logits_lowres, parser_hw, rows, cols)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def binary_face_mask(labels: jax.Array, classes: Sequence[int] = FACE_LABELS,
                     background: float = 0.0) -> jax.Array:
    """[B, H, W] class map -> [B, H, W, 1] float32: 1 on `classes`, `background` elsewhere."""
    is_face = jnp.isin(labels, jnp.asarray(classes, labels.dtype))
    return jnp.where(is_face, 1.0, background).astype(jnp.float32)[..., None]


# ----------------------------------------------------------------------------- softening

def dilate(masks: jax.Array, size: int = DILATE_SIZE) -> jax.Array:
    """Official `1 - tensor_erode(1 - masks, size)`: a size x size max filter, zero padding.

    masks: [B, H, W, C] in [0, 1]. Written as the official erosion (min of 1 - m, padded with 1)
    so that values come out bit-identical to it.
    """
    pad = (size - 1) // 2
    inv = jnp.pad(1.0 - masks, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=1.0)
    eroded = jax.lax.reduce_window(inv, jnp.inf, jax.lax.min, (1, size, size, 1), (1, 1, 1, 1),
                                   "VALID")
    return 1.0 - eroded


def gaussian_sigma(ksize: int = BLUR_SIZE) -> float:
    """OpenCV's sigma for sigma <= 0: 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8 (2.6 for 15)."""
    return 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8


def gaussian_taps(ksize: int = BLUR_SIZE) -> np.ndarray:
    """`cv2.getGaussianKernel(ksize, -1, CV_32F)`: the taps computed in double, normalised to sum
    1, rounded to float32 (what cv2.GaussianBlur uses for float32 images). ksize > 7 (smaller
    sizes use OpenCV's fixed tables, which this does not reproduce)."""
    if ksize <= 7 or ksize % 2 == 0:
        raise InputError(f"gaussian_taps: odd ksize > 7 expected, got {ksize}")
    sigma = gaussian_sigma(ksize)
    x = np.arange(ksize, dtype=np.float64) - (ksize - 1) * 0.5
    t = np.exp(-0.5 / (sigma * sigma) * x * x)
    return (t / t.sum()).astype(np.float32)


def _reflect101(x: jax.Array, pad: int, axis: int) -> jax.Array:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (pad, pad)
    return jnp.pad(x, widths, mode="reflect")  # numpy "reflect" is OpenCV's BORDER_REFLECT_101


def gaussian_blur(masks: jax.Array, ksize: int = BLUR_SIZE) -> jax.Array:
    """`cv2.GaussianBlur(mask, (ksize, ksize), -1)` per channel of [B, H, W, C] float32.

    Separable, rows (width) first then columns, border BORDER_REFLECT_101 (H, W >= ksize // 2 + 1).
    The column pass adds symmetric pairs first, as OpenCV's symmetric column filter does.
    """
    half = ksize // 2
    if masks.shape[1] <= half or masks.shape[2] <= half:
        raise InputError(f"gaussian_blur needs images of at least {half + 1}x{half + 1} pixels, "
                         f"got {masks.shape[1]}x{masks.shape[2]}")
    taps = [np.float32(t) for t in gaussian_taps(ksize)]
    h, w = masks.shape[1], masks.shape[2]
    xp = _reflect101(masks, half, axis=2)
    rows = taps[0] * xp[:, :, 0:w]
    for k in range(1, ksize):
        rows = rows + taps[k] * xp[:, :, k:k + w]
    yp = _reflect101(rows, half, axis=1)
    out = taps[half] * yp[:, half:half + h]
    for k in range(1, half + 1):
        out = out + taps[half + k] * (yp[:, half + k:half + k + h] + yp[:, half - k:half - k + h])
    return out


def soften(masks: jax.Array) -> jax.Array:
    """Binary/loaded mask -> the soft blending mask: gaussian_blur(dilate(masks)), same shape."""
    return gaussian_blur(dilate(masks))


def blend(fg: jax.Array, bg: jax.Array, mask: jax.Array) -> jax.Array:
    """fg * mask + (1 - mask) * bg (paper Eq. 11 with fg = X_G, bg = X). Shapes broadcast, e.g.
    fg, bg [B, H, W, 3] and mask [B, H, W, 1] or [B, H, W, 3]."""
    return fg * mask + (1.0 - mask) * bg


def soften_and_blend(fg: jax.Array, bg: jax.Array, masks: jax.Array) -> jax.Array:
    """Official `get_masked_imgs(fg, bg, masks)` in NHWC: blend(fg, bg, soften(masks)).

    fg: [B, H, W, 3] generated images in [0, 1] ((G + 1) / 2, may overshoot); bg: [B, H, W, 3]
    originals in [0, 1]; masks: [B, H, W, C], C in {1, 3}, in [0, 1] (the face masks as loaded,
    or `binary_face_mask`). Returns [B, H, W, 3]. (The official RGB<->BGR swaps cancel out.)
    """
    return blend(fg, bg, soften(masks))


# ----------------------------------------------------------------------------- from the parser

def face_mask(logits: jax.Array, image_hw: tuple[int, int], classes: Sequence[int] = FACE_LABELS,
              background: float = 0.0) -> jax.Array:
    """Soft face mask [B, H, W, 1] in [0, 1] from the parser's main output.

    logits: [B, 512, 512, n_classes] `feat_out` of `bisenet` for the image resized to 512.
    """
    labels = face_labels(logits, image_hw)
    return soften(binary_face_mask(labels, classes, background))


def face_mask_from_parser(module, variables, images: jax.Array,
                          classes: Sequence[int] = FACE_LABELS, background: float = 0.0,
                          resample: str = "bicubic") -> jax.Array:
    """Pure form of `face_mask_from_images` for use inside your own jit / grad.

    module, variables: a loaded parser's `net.module` and `net.variables`.
    """
    size = bisenet.PARSER_SIZE
    # clip: the official masks come from uint8 images, which PIL clamps after each pass.
    x = bisenet.preprocess(images, size, resample, clip=True)
    lowres = module.apply(variables, x, upsample=False)[0]
    labels = face_labels_from_lowres(lowres, (size, size), images.shape[1:3])
    # Softened in the images' precision: float32, or float64 in a float64 computation.
    return soften(binary_face_mask(labels, classes, background).astype(x.dtype))


_face_mask_jit = jax.jit(face_mask_from_parser,
                         static_argnames=("module", "classes", "background", "resample"))


def face_mask_from_images(parser, images: jax.Array, classes: Sequence[int] = FACE_LABELS,
                          background: float = 0.0, resample: str = "bicubic") -> jax.Array:
    """Runs the face parser and returns the soft face mask [B, H, W, 1] in [0, 1].

    parser: a loaded BiSeNet (`ifadit_jax.load('bisenet.safetensors')`).
    images: [B, H, W, 3] RGB in [0, 1] (iFADIT's 256x256 faces; the mask is made from the image
      whose background is kept, i.e. X). They are resized to 512 (PIL filter `resample`,
      bicubic = Pillow's default used by the official code, clamped to [0, 1] as PIL does for
      uint8 images), normalised, parsed; the argmax of the main output is resized back to H x W
      with OpenCV's nearest rule, the face classes selected, then dilated and blurred (`soften`).
    Jitted (the parser's module is a static argument); inside your own jit call
    `face_mask_from_parser(parser.module, parser.variables, images)`.
    """
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InputError(f"face_mask_from_images expects [B, H, W, 3] RGB images in [0, 1], "
                         f"got {tuple(images.shape)}")
    return _face_mask_jit(parser.module, parser.variables, images,
                          tuple(int(c) for c in classes), float(background), resample)


__all__: Sequence[str] = ("FACE_LABELS", "cv2_nearest_index", "face_labels", "face_labels_from_lowres",
                          "binary_face_mask", "dilate", "gaussian_sigma", "gaussian_taps",
                          "gaussian_blur", "soften", "blend", "soften_and_blend", "face_mask",
                          "face_mask_from_parser", "face_mask_from_images")
