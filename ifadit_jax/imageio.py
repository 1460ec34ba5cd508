"""Reading and writing images for the command-line tools, data and experiments, with one-line
errors.

Images are float32 HWC RGB in [0, 1] for the networks. `read_rgb` accepts what photo collections
hold: the EXIF orientation is applied (a phone portrait stored rotated comes out upright);
grayscale, grayscale+alpha, RGBA, CMYK, palette, 1-bit and 16-bit images are converted to 8-bit
RGB (16-bit values are scaled, not clipped). Only files that cannot be decoded are errors.

`read_image` also returns what `write_image` needs to give the output the input's kind where the
output format allows: a grayscale input is written as grayscale, and an alpha channel is carried
over unchanged (it is not anonymized: it holds transparency, not a face). CMYK and 16-bit inputs
are written as 8-bit RGB / grayscale.

Pixel limit: images above MAX_PIXELS (64 million pixels, e.g. 8000x8000) are refused before they
are decoded; a photo at the limit needs about 3 GB of float32 working memory. Pillow's
decompression-bomb check is reported the same way.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from ifadit_jax.errors import InputError
from ifadit_jax.files import atomic_path

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
LOSSLESS = (".png", ".webp", ".bmp", ".tif", ".tiff")
ALPHA_FORMATS = ("PNG", "WEBP", "TIFF")
MAX_PIXELS = 64_000_000
_GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


@dataclasses.dataclass
class Decoded:
    """rgb: [H, W, 3] float32 in [0, 1]; gray: the file was grayscale; alpha: [H, W] uint8 or
    None, the file's transparency, to write back unchanged."""

    rgb: np.ndarray
    gray: bool = False
    alpha: np.ndarray | None = None


def is_image_path(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in EXTENSIONS


def is_lossy_path(path: str) -> bool:
    return is_image_path(path) and os.path.splitext(path)[1].lower() not in LOSSLESS


def _wide_to_8bit(im: Image.Image) -> np.ndarray:
    """A 16/32-bit integer or float grayscale image -> uint8 [H, W]."""
    arr = np.asarray(im)
    if im.mode == "F":
        scaled = np.nan_to_num(arr.astype(np.float64), nan=0.0) * 255.0
    else:
        scaled = arr.astype(np.float64) / 257.0  # 65535 -> 255
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def _to_arrays(im: Image.Image) -> Decoded:
    """A decoded, upright Pillow image -> Decoded (8-bit RGB plus what the writer restores)."""
    alpha = None
    if im.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("LA" if im.mode in ("LA", "La") else "RGBA")
        alpha = np.asarray(rgba.getchannel("A"), np.uint8).copy()
    gray = im.mode in _GRAY_MODES
    if im.mode in _WIDE_MODES:
        plane = _wide_to_8bit(im)
        rgb = np.repeat(plane[..., None], 3, axis=2)
    else:
        rgb = np.asarray(im.convert("RGB"), np.uint8)
    return Decoded(rgb.astype(np.float32) / 255.0, gray=gray, alpha=alpha)


def read_image(path: str | os.PathLike, min_size: int = 1) -> Decoded:
    """Decodes any supported image (see the module docstring) -> Decoded."""
    path = os.fspath(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise InputError(f"{path}: image is {im.width}x{im.height}, above the limit of "
                                     f"{MAX_PIXELS} pixels")
                im = ImageOps.exif_transpose(im)
                im.load()
                decoded = _to_arrays(im)
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(f"{path}: image is above the pixel limit") from None
    except Exception as e:  # noqa: BLE001
        # Pillow's decoders raise many types for a corrupt file (UnidentifiedImageError, OSError,
        # SyntaxError, struct.error, ...); each means "cannot decode", never a traceback.
        raise InputError(f"{path}: cannot read image ({type(e).__name__}: {e})"[:300]) from None
    h, w = decoded.rgb.shape[:2]
    if min(h, w) < min_size:
        raise InputError(f"{path}: image is {w}x{h}, smaller than {min_size} pixels on a side")
    return decoded


def header_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) as `read_image` will return it (EXIF orientation applied), from the
    file's header without decoding the pixels; None if unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(os.fspath(path)) as im:
                turned = im.getexif().get(0x0112) in (5, 6, 7, 8)  # 90 or 270 degrees
                return (im.height, im.width) if turned else (im.width, im.height)
    except Exception:  # noqa: BLE001 - the caller decodes it later and reports that
        return None


def read_rgb(path: str | os.PathLike, min_size: int = 1) -> np.ndarray:
    """Decodes any supported image -> [H, W, 3] float32 RGB in [0, 1], EXIF orientation applied."""
    return read_image(path, min_size).rgb


def to_uint8(image) -> np.ndarray:
    return np.asarray(np.clip(np.asarray(image, np.float32), 0.0, 1.0) * 255.0 + 0.5, np.uint8)


def _pillow_image(image, fmt: str, like: Decoded | None) -> Image.Image:
    pixels = to_uint8(image)
    gray = like is not None and like.gray
    alpha = like.alpha if like is not None and fmt in ALPHA_FORMATS else None
    if alpha is not None and alpha.shape != pixels.shape[:2]:
        alpha = None
    if gray:
        # The networks see three equal channels; their output is a colour image: keep its
        # luminance, as the input had no colour.
        out = Image.fromarray(pixels).convert("L")
        return Image.merge("LA", (out, Image.fromarray(alpha))) if alpha is not None else out
    out = Image.fromarray(pixels)
    if alpha is not None:
        out.putalpha(Image.fromarray(alpha))
    return out


def write_rgb(path: str | os.PathLike, image, force: bool = False, like: Decoded | None = None) -> None:
    """Writes [H, W, 3] in [0, 1] atomically; the format follows the extension. `like` (from
    `read_image`) restores the input's kind: grayscale stays grayscale, alpha is put back."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise InputError(f"{path}: unknown image extension (use one of {', '.join(EXTENSIONS)})")
    fmt = Image.registered_extensions()[ext]
    im = _pillow_image(image, fmt, like)
    with atomic_path(path, force=force) as tmp:
        im.save(tmp, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
