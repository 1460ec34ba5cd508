"""Training data: grain pipelines over an image folder, FFHQ* (images + W latents synthesized
with the ported StyleGAN2) and array_record files packed by a tensorflow-datasets builder.

- `make_dataset(config, split)`: batches for training / evaluation (`loader`).
- `python -m ifadit_jax.data.synthesize ...`: writes FFHQ* (`synthesize`).
- `python -m ifadit_jax.data.tfds_builder SRC OUT`: packs a folder or FFHQ* into array_record
  (`tfds_builder`).
"""

from ifadit_jax.data.loader import SOURCE_KINDS, DataConfig, make_dataset, make_source
from ifadit_jax.data.sources import (
    ArrayRecordSource,
    FFHQStarSource,
    ImageFolderSource,
    list_images,
    load_image,
    read_ffhq_star_meta,
    split_indices,
)

__all__ = [
    "SOURCE_KINDS", "DataConfig", "make_dataset", "make_source", "ArrayRecordSource",
    "FFHQStarSource", "ImageFolderSource", "list_images", "load_image", "read_ffhq_star_meta",
    "split_indices",
]
