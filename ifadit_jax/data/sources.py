"""Random-access data sources (grain `RandomAccessDataSource`s): an image folder, FFHQ*, and
array_record files written by `ifadit_jax.data.tfds_builder`; plus image decoding and the split.

Every source returns, per index, a dict of numpy arrays:
  `image` uint8 [S, S, 3] RGB, `index` int64 (the example's position in the whole dataset),
  and for FFHQ* `w` float32 [w_dim] (the W latent the image was synthesized from).

Images (`load_image`):
- folder: `*.png, *.jpg, *.jpeg, *.webp` (any letter case), found recursively, hidden files and
  folders (names starting with ".") skipped, sorted by their relative POSIX path, so the order
  (and with it the split) is the same on every machine.
- decoded by `ifadit_jax.imageio.read_rgb`, the project's one image reader (its docstring and
  the README give the EXIF orientation and colour-mode rules), so training, the experiments and
  the command lines see the same pixels for the same file;
- an image that is not square is centre-cropped to a square (the shorter side); an image whose
  size differs from S is resized to S x S with Pillow's LANCZOS filter (antialiased, the usual
  choice when FFHQ's 1024 px crops are reduced to 256 px). Images already S x S are not touched.

The 90/10 split (`split_indices`): every index i in [0, n) gets the key
splitmix64(i XOR splitmix64(split_seed)), a bijection of 64-bit integers; the round(n * 0.1)
indices with the smallest keys are `val`, all others `train`. The split depends only on n, the
split seed and the fraction (never on the shuffle seed, numpy's generator streams, or the number
of processes), so val never overlaps train, and the same n gives the same split everywhere. For a
folder, n counts its images: adding or removing files changes the split.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ifadit_jax import imageio
from ifadit_jax.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
SPLITS = ("train", "val")
RESAMPLE = Image.Resampling.LANCZOS

# FFHQ* layout (written by `ifadit_jax.data.synthesize`):
#   DIR/meta.json                 settings (format FFHQ_STAR_FORMAT, n, seed, truncation, generator)
#   DIR/latents.npy               float32 [n, w_dim], row i = the W latent of image i
#   DIR/images/{i:06d}.png        uint8 RGB [res, res, 3]
FFHQ_STAR_FORMAT = "ifadit-jax/ffhq-star/1"
FFHQ_STAR_META = "meta.json"
FFHQ_STAR_LATENTS = "latents.npy"
FFHQ_STAR_IMAGES = "images"
_FFHQ_STAR_NAME = re.compile(r"^(\d{6,})\.png$")


def ffhq_star_image_name(i: int) -> str:
    return f"{i:06d}.png"


# ----------------------------------------------------------------------------- images


def load_image(path: str | os.PathLike, size: int = 256) -> np.ndarray:
    """Reads one image file -> uint8 [size, size, 3] RGB (see the module docstring for the
    crop and resize rules). Raises InputError naming the file if it cannot be used."""
    path = os.fspath(path)
    try:
        # The one reader of the project: the CLIs, the training data and the experiments decode
        # (EXIF orientation, colour modes) the same way.
        rgb = imageio.to_uint8(imageio.read_rgb(path, min_size=1))
    except (SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read image {path}: {e}"[:300]) from None
    h, w = rgb.shape[:2]
    if (w, h) == (size, size):
        return rgb
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    im = Image.fromarray(rgb).resize((size, size), RESAMPLE, box=(left, top, left + s, top + s))
    return np.asarray(im, dtype=np.uint8)


def list_images(root: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of the images under `root` (recursive, hidden entries skipped), sorted.
    Raises InputError if `root` is not a folder or holds no image."""
    root = os.fspath(root)
    if not os.path.exists(root):
        raise InputError(f"image folder does not exist: {root}")
    if not os.path.isdir(root):
        raise InputError(f"not a folder: {root}")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    if not found:
        raise InputError(f"no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) found in {root}")
    return sorted(found)


# ----------------------------------------------------------------------------- split


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 output function of state `x` (uint64 array); wraps modulo 2**64."""
    x = np.asarray(x, np.uint64)
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def num_val(n: int, val_fraction: float = 0.1) -> int:
    """round(n * val_fraction), halves rounded up."""
    return int(math.floor(n * val_fraction + 0.5))


def split_indices(n: int, split: str, *, split_seed: int = 0, val_fraction: float = 0.1) -> np.ndarray:
    """Sorted int64 indices of `split` ('train' | 'val') among n examples (module docstring)."""
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not 0 <= split_seed < 2**64:
        raise InputError(f"split_seed must be in [0, 2**64), got {split_seed}")
    keys = _splitmix64(np.arange(n, dtype=np.uint64) ^ _splitmix64(np.uint64(split_seed)))
    order = np.argsort(keys, kind="stable")
    k = num_val(n, val_fraction)
    chosen = order[:k] if split == "val" else order[k:]
    return np.sort(chosen).astype(np.int64)


# ----------------------------------------------------------------------------- sources


class ImageFolderSource:
    """The images of a folder (module docstring) restricted to `indices` (default: all).

    Item k -> {"image": uint8 [S,S,3], "index": int64 position in the sorted folder listing}.
    """

    def __init__(self, root: str | os.PathLike, image_size: int = 256,
                 indices: Sequence[int] | None = None, files: Sequence[str] | None = None):
        self.root = os.fspath(root)
        self.files = list(files) if files is not None else list_images(self.root)
        self.image_size = int(image_size)
        self.indices = np.arange(len(self.files)) if indices is None else np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        i = int(self.indices[k])
        return {"image": load_image(os.path.join(self.root, self.files[i]), self.image_size),
                "index": np.int64(i)}

    def __repr__(self) -> str:
        return f"ImageFolderSource({self.root!r}, {len(self)} of {len(self.files)} images)"


def read_ffhq_star_meta(root: str | os.PathLike, *, check_complete: bool = True) -> dict[str, Any]:
    """Reads and checks DIR/meta.json of an FFHQ* folder; with `check_complete`, also that
    latents.npy has shape [n, w_dim] and all n images exist."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise InputError(f"FFHQ* folder does not exist: {root}")
    meta_path = os.path.join(root, FFHQ_STAR_META)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise InputError(f"not an FFHQ* folder (no {FFHQ_STAR_META}): {root}") from None
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {meta_path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FFHQ_STAR_FORMAT:
        raise InputError(f"{meta_path} is not an FFHQ* description (format "
                         f"{meta.get('format') if isinstance(meta, dict) else None!r}, "
                         f"expected {FFHQ_STAR_FORMAT!r})")
    if not check_complete:
        return meta
    n, w_dim = int(meta["n"]), int(meta["w_dim"])
    lat_path = os.path.join(root, FFHQ_STAR_LATENTS)
    try:
        lat = np.load(lat_path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read FFHQ* latents {lat_path}: {e}") from None
    if lat.shape != (n, w_dim) or lat.dtype != np.float32:
        raise InputError(f"{lat_path} holds {lat.dtype} {lat.shape}, expected float32 {(n, w_dim)}")
    names = os.listdir(os.path.join(root, FFHQ_STAR_IMAGES)) if os.path.isdir(
        os.path.join(root, FFHQ_STAR_IMAGES)) else []
    present = {int(m.group(1)) for m in map(_FFHQ_STAR_NAME.match, names) if m}
    have = sum(1 for i in present if i < n)
    if have < n:
        raise InputError(f"FFHQ* folder {root} is incomplete ({have} of {n} images); rerun "
                         "`python -m ifadit_jax.data.synthesize` with the same arguments to finish it")
    return meta


class FFHQStarSource:
    """FFHQ* images and their W latents (layout above) restricted to `indices` (default: all).

    Item k -> {"image": uint8 [S,S,3], "w": float32 [w_dim], "index": int64 image number}.
    The latents are memory-mapped (opened lazily, so the source pickles cheaply).
    """

    def __init__(self, root: str | os.PathLike, image_size: int = 256,
                 indices: Sequence[int] | None = None):
        self.root = os.fspath(root)
        self.meta = read_ffhq_star_meta(self.root)
        self.n = int(self.meta["n"])
        self.image_size = int(image_size)
        self.indices = np.arange(self.n) if indices is None else np.asarray(indices, np.int64)
        self._latents = None

    def __getstate__(self):
        return dict(self.__dict__, _latents=None)

    def _w(self, i: int) -> np.ndarray:
        if self._latents is None:
            self._latents = np.load(os.path.join(self.root, FFHQ_STAR_LATENTS), mmap_mode="r")
        return np.array(self._latents[i], dtype=np.float32)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        i = int(self.indices[k])
        path = os.path.join(self.root, FFHQ_STAR_IMAGES, ffhq_star_image_name(i))
        return {"image": load_image(path, self.image_size), "w": self._w(i), "index": np.int64(i)}

    def __repr__(self) -> str:
        return f"FFHQStarSource({self.root!r}, {len(self)} of {self.n} images)"


def find_tfds_dir(path: str | os.PathLike) -> str:
    """The folder holding `dataset_info.json` of a packed dataset: `path` itself, or the only such
    folder below it (e.g. the `--out` given to the tfds builder)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise InputError(f"array_record dataset folder does not exist: {path}")
    if os.path.exists(os.path.join(path, "dataset_info.json")):
        return path
    found = sorted(os.path.dirname(os.path.join(d, "dataset_info.json"))
                   for d, _, files in os.walk(path) if "dataset_info.json" in files)
    if len(found) != 1:
        raise InputError(f"expected one packed dataset (a dataset_info.json) under {path}, "
                         f"found {len(found)}" + (f": {', '.join(found)}" if found else ""))
    return found[0]


class ArrayRecordSource:
    """One split of a dataset packed by `ifadit_jax.data.tfds_builder`, read through
    tensorflow-datasets' array_record data source (no TensorFlow needed).

    Item k -> {"image": uint8 [S,S,3], "index": int64, ("w": float32 [w_dim] for FFHQ*)}.
    `metadata` holds what the builder recorded (source kind, split seed, val fraction, sizes).
    """

    def __init__(self, path: str | os.PathLike, split: str, image_size: int = 256):
        import tensorflow_datasets as tfds

        if split not in SPLITS:
            raise InputError(f"split must be one of {SPLITS}, got {split!r}")
        self.path = find_tfds_dir(path)
        try:
            builder = tfds.builder_from_directory(self.path)
            self.metadata = dict(builder.info.metadata or {})
            self._source = builder.as_data_source(split=split)
        except Exception as e:  # tfds raises assorted types for a damaged or foreign folder
            raise InputError(f"cannot open packed dataset {self.path} (split {split!r}): {e}") from None
        stored = int(self.metadata.get("image_size", -1))
        if stored != image_size:
            raise InputError(f"packed dataset {self.path} holds {stored} px images, but "
                             f"{image_size} px were asked for; pack it again with "
                             f"--image-size {image_size}")
        self.split = split
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        ex = self._source[k]
        out = {"image": np.asarray(ex["image"], np.uint8), "index": np.int64(ex["index"])}
        if "w" in ex:
            out["w"] = np.asarray(ex["w"], np.float32)
        return out

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self.path!r}, split={self.split!r}, {len(self)} examples)"
