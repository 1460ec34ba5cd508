"""Packs an image folder or an FFHQ* folder into array_record files with a tensorflow-datasets
builder, offline and without TensorFlow.

  python -m ifadit_jax.data.tfds_builder SRC OUT [--image-size 256] [--split-seed 0]
      [--val-fraction 0.1]

Train with `source="array_record", path=OUT` (or the printed dataset folder). Why this works
without TensorFlow: tfds needs TensorFlow only to *encode* image arrays (tf.image.encode_png);
this builder hands it PNG bytes that Pillow encoded, and the rest of the writer (tf.train.Example
serialization, array_record shards, dataset_info.json, features.json) is TensorFlow-free in
tensorflow-datasets 4.9.10, as is reading back with `tfds.builder_from_directory(...)
.as_data_source(split)` (protobuf parsing and Pillow decoding), which `ArrayRecordSource` uses.

Output: OUT/face_images/<folder|ffhq_star>/1.0.0/{dataset_info.json, features.json,
metadata.json, face_images-{train,val}.array_record-XXXXX-of-YYYYY}. Features per example:
`image` (PNG, uint8 [S, S, 3]), `index` (int64: position in the sorted folder listing or FFHQ*
image number), `name` (the file's relative path), and for FFHQ* `w` (float32 [w_dim]).
The `train` / `val` splits are `sources.split_indices` of the source, the same ones the folder
pipelines use, so a packed dataset and its folder give the same split. tfds stores each split's
examples in an order of its own (a hash of the key); the pipeline shuffles anyway. Images are
prepared like the folder pipeline's (`sources.load_image`); a PNG that is already RGB and S x S is
stored as it is, anything else is re-encoded as PNG.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import os
import shutil
import tempfile
from typing import Iterator, Sequence

import numpy as np

from ifadit_jax import cli
from ifadit_jax.data import sources
from ifadit_jax.errors import InputError

import tensorflow_datasets as tfds  # noqa: E402  (after our imports: heavy, but no TensorFlow)

NAME = "face_images"
VERSION = "1.0.0"


def _png_bytes(path: str, size: int) -> bytes:
    """The PNG to store for one file: its own bytes if already an RGB S x S PNG, else re-encoded."""
    from PIL import Image

    arr = sources.load_image(path, size)  # validates and decodes; errors name the file
    with Image.open(path) as im:
        same = (im.format == "PNG" and im.mode == "RGB" and im.size == (size, size)
                and im.getexif().get(0x0112, 1) == 1)  # 0x0112: EXIF orientation
    if same:
        with open(path, "rb") as f:
            return f.read()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class FaceImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Face images (a folder, or FFHQ* with W latents) with a deterministic 90/10 train/val split.

    Not registered by name in tfds (read packed data with `tfds.builder_from_directory`), so
    importing this module twice (e.g. as `__main__`) is harmless."""

    name = NAME
    # tfds 4.9.10 looks for checksum files beside a builder's code through the
    # `importlib_resources` backport (installed for Python < 3.9 only) whenever the builder lives
    # in a package; this builder downloads nothing and has no such files.
    code_path = None
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="folder", description="an image folder"),
        tfds.core.BuilderConfig(name="ffhq_star", description="FFHQ*: images and W latents"),
    ]
    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "Images (+ W latents for FFHQ*), train/val by sources.split_indices."}

    def __init__(self, *, src: str, image_size: int = 256, split_seed: int = 0,
                 val_fraction: float = 0.1, workers: int | None = None, **kwargs):
        self.src = os.fspath(src)
        self.image_size = int(image_size)
        self.split_seed = int(split_seed)
        self.val_fraction = float(val_fraction)
        self.workers = workers or max(1, min(8, os.cpu_count() or 1))
        if os.path.exists(os.path.join(self.src, sources.FFHQ_STAR_META)):
            self.kind = "ffhq_star"
            self.ffhq_meta = sources.read_ffhq_star_meta(self.src)
            n = int(self.ffhq_meta["n"])
            self.files = [f"{sources.FFHQ_STAR_IMAGES}/{sources.ffhq_star_image_name(i)}"
                          for i in range(n)]
        else:
            self.kind = "folder"
            self.ffhq_meta = None
            self.files = sources.list_images(self.src)
        super().__init__(config=self.kind, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.image_size
        features = {"image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
                    "index": np.int64,
                    "name": tfds.features.Text()}
        metadata = {"source_kind": self.kind, "image_size": s, "n": len(self.files),
                    "split_seed": self.split_seed, "val_fraction": self.val_fraction}
        if self.ffhq_meta is not None:
            w_dim = int(self.ffhq_meta["w_dim"])
            features["w"] = tfds.features.Tensor(shape=(w_dim,), dtype=np.float32)
            metadata["ffhq_star"] = self.ffhq_meta
        return tfds.core.DatasetInfo(
            builder=self, description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict(features),
            metadata=tfds.core.MetadataDict(metadata))

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        return {split: self._generate_examples(sources.split_indices(
                    len(self.files), split, split_seed=self.split_seed,
                    val_fraction=self.val_fraction))
                for split in sources.SPLITS}

    def _generate_examples(self, indices: np.ndarray) -> Iterator[tuple[int, dict]]:
        latents = (np.load(os.path.join(self.src, sources.FFHQ_STAR_LATENTS), mmap_mode="r")
                   if self.ffhq_meta is not None else None)
        chunk = 16 * self.workers  # bounded look-ahead: `pool.map` would encode everything at once
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            for start in range(0, len(indices), chunk):
                part = [int(i) for i in indices[start: start + chunk]]
                encoded = pool.map(_png_bytes, [os.path.join(self.src, self.files[i]) for i in part],
                                   [self.image_size] * len(part))
                for i, png in zip(part, encoded):
                    ex = {"image": png, "index": i, "name": self.files[i]}
                    if latents is not None:
                        ex["w"] = np.array(latents[i], np.float32)
                    yield i, ex


def pack(src: str, out: str, *, image_size: int = 256, split_seed: int = 0,
         val_fraction: float = 0.1) -> str:
    """Packs `src` (an image folder or FFHQ*) under the tfds data dir `out`; returns the dataset
    folder (the one holding dataset_info.json)."""
    if image_size < 1:
        raise InputError(f"--image-size must be positive, got {image_size}")
    sources.split_indices(0, "val", split_seed=split_seed, val_fraction=val_fraction)  # validates
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise InputError(f"parent folder of OUT does not exist: {parent}")
    builder = FaceImages(src=src, image_size=image_size, split_seed=split_seed,
                         val_fraction=val_fraction, data_dir=out)
    if os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
        raise InputError(f"a packed dataset already exists at {builder.data_dir}; remove it first")
    for split in sources.SPLITS:
        if not len(sources.split_indices(len(builder.files), split, split_seed=split_seed,
                                         val_fraction=val_fraction)):
            raise InputError(f"the {split!r} split of {src} would be empty "
                             f"({len(builder.files)} images, val fraction {val_fraction})")
    os.makedirs(out, exist_ok=True)
    downloads = tempfile.mkdtemp(prefix=".downloads-", dir=out)  # tfds wants one; stays empty
    try:
        # tfds writes into an `incomplete.*` folder and renames it when done.
        builder.download_and_prepare(
            download_dir=downloads, file_format="array_record",
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    finally:
        shutil.rmtree(downloads, ignore_errors=True)
    return os.fspath(builder.data_dir)


def main(argv: Sequence[str]) -> int:
    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise InputError(message)

    p = Parser(prog="python -m ifadit_jax.data.tfds_builder",
               description="Packs an image folder or FFHQ* into array_record (tfds layout).")
    p.add_argument("src", help="image folder, or FFHQ* folder (with meta.json)")
    p.add_argument("out", help="tfds data dir to write into (created)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1)
    args = p.parse_args(argv)
    path = pack(args.src, args.out, image_size=args.image_size, split_seed=args.split_seed,
                val_fraction=args.val_fraction)
    print(f"wrote {path} (use source='array_record', path={path!r})")
    return 0


if __name__ == "__main__":
    cli.run(main)
