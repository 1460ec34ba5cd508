"""Reading and writing images for the command-line tools, with one-line errors.

Images are float32 NHWC/HWC RGB in [0, 1]. Only 8-bit RGB files are accepted: grayscale, alpha
and 16-bit images are refused rather than silently converted, so that what comes out is always
the same kind of image as what went in (convert them first, e.g. with Pillow's `convert("RGB")`).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from ifadit_jax.errors import InputError
from ifadit_jax.files import atomic_path

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
LOSSLESS = (".png", ".webp", ".bmp", ".tif", ".tiff")


def is_image_path(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in EXTENSIONS


def read_rgb(path: str | os.PathLike, min_size: int = 1) -> np.ndarray:
    """Decodes an 8-bit RGB image -> [H, W, 3] float32 in [0, 1]."""
    path = os.fspath(path)
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode != "RGB":
                kind = {"L": "grayscale", "LA": "grayscale with alpha", "RGBA": "RGBA (has alpha)",
                        "P": "palette", "I;16": "16-bit", "I;16B": "16-bit", "I": "32-bit integer",
                        "F": "floating point", "CMYK": "CMYK", "1": "1-bit"}.get(mode, mode)
                raise InputError(f"{path}: {kind} image; only 8-bit RGB is supported "
                                 "(convert it to RGB first)")
            arr = np.asarray(im, dtype=np.uint8)
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read image ({type(e).__name__}: {e})"[:300]) from None
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise InputError(f"{path}: expected an RGB image, got array of shape {arr.shape}")
    if min(arr.shape[:2]) < min_size:
        raise InputError(f"{path}: image is {arr.shape[1]}x{arr.shape[0]}, smaller than "
                         f"{min_size} pixels on a side")
    return arr.astype(np.float32) / 255.0


def to_uint8(image) -> np.ndarray:
    return np.asarray(np.clip(np.asarray(image, np.float32), 0.0, 1.0) * 255.0 + 0.5, np.uint8)


def write_rgb(path: str | os.PathLike, image, force: bool = False) -> None:
    """Writes [H, W, 3] in [0, 1] atomically; the format follows the extension."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise InputError(f"{path}: unknown image extension (use one of {', '.join(EXTENSIONS)})")
    fmt = Image.registered_extensions()[ext]
    with atomic_path(path, force=force) as tmp:
        Image.fromarray(to_uint8(image)).save(tmp, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
