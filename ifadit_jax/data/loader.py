"""grain input pipelines for training and evaluation.

    ds = make_dataset(config.data, "train")          # a grain.IterDataset
    it = iter(ds)
    batch = next(it)       # {"image": float32 [b, S, S, 3] in [0, 1], "index": int64 [b],
                           #  "w": float32 [b, w_dim] (FFHQ* and FFHQ* packed as array_record)}
    state = it.get_state() # a JSON-able dict; store it with the checkpoint ...
    it.set_state(state)    # ... and a fresh iterator continues with exactly the same batches.

With orbax, `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` save and restore the
same state (one JSON file per process).

Order of operations (per process):
  split indices (`sources.split_indices`, fixed by split_seed) -> this process's shard
  -> shuffle(seed) -> repeat(num_epochs; None = forever, each epoch reshuffled)
  -> decode (threads) -> batch(batch_size / process_count) -> uint8 to float32 / 255.

Multi-host: `batch_size` is the GLOBAL batch; every process reads batch_size / process_count
examples per step from its own shard. The split is first cut to a multiple of process_count (at
most process_count - 1 examples are left out), then process p takes examples p, p + P, ... of it,
so all shards have the same length and never overlap, and every process takes the same number of
steps per epoch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from ifadit_jax.data import sources
from ifadit_jax.errors import InputError

SOURCE_KINDS = ("folder", "ffhq_star", "array_record")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What `make_dataset` needs. `batch_size` is global (all processes together)."""

    source: str = "ffhq_star"      # "folder" | "ffhq_star" | "array_record"
    path: str = ""
    batch_size: int = 4
    image_size: int = 256
    seed: int = 0                  # shuffle seed (the split does not depend on it)
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    drop_remainder: bool = True
    split_seed: int = 0
    val_fraction: float = 0.1
    num_threads: int = 8           # decoding threads per process
    prefetch_buffer_size: int = 64  # decoded examples kept ahead

    @classmethod
    def from_mapping(cls, m: Any, **overrides) -> "DataConfig":
        """From a DataConfig, a dict or an ml_collections ConfigDict; unknown keys are an error."""
        if isinstance(m, DataConfig):
            d = dataclasses.asdict(m)
        elif hasattr(m, "to_dict"):
            d = dict(m.to_dict())
        elif isinstance(m, Mapping):
            d = dict(m)
        else:
            raise InputError(f"data config must be a mapping, got {type(m).__name__}")
        d.update(overrides)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown data config keys {unknown}; known: {sorted(known)}")
        return cls(**d)


def _check(config: DataConfig, process_count: int) -> None:
    if config.source not in SOURCE_KINDS:
        raise InputError(f"data source must be one of {SOURCE_KINDS}, got {config.source!r}")
    if not config.path:
        raise InputError("data path is empty")
    if config.batch_size < 1 or config.batch_size % process_count:
        raise InputError(f"batch_size {config.batch_size} must be a positive multiple of the "
                         f"process count {process_count}")
    if config.image_size < 1:
        raise InputError(f"image_size must be positive, got {config.image_size}")
    if config.num_epochs is not None and config.num_epochs < 1:
        raise InputError(f"num_epochs must be None (forever) or >= 1, got {config.num_epochs}")
    if not 0 <= config.seed < 2**32:
        raise InputError(f"seed must be in [0, 2**32), got {config.seed}")


def make_source(config: DataConfig, split: str):
    """The whole `split` of the configured dataset as a random-access source (not sharded)."""
    if config.source == "array_record":
        src = sources.ArrayRecordSource(config.path, split, config.image_size)
        recorded = (src.metadata.get("split_seed"), src.metadata.get("val_fraction"))
        if recorded != (config.split_seed, config.val_fraction):
            raise InputError(f"packed dataset {src.path} was split with split_seed, val_fraction = "
                             f"{recorded}, but the config asks for "
                             f"{(config.split_seed, config.val_fraction)}")
        return src
    if config.source == "folder":
        files = sources.list_images(config.path)
        n = len(files)
    else:
        n = int(sources.read_ffhq_star_meta(config.path)["n"])
    idx = sources.split_indices(n, split, split_seed=config.split_seed,
                                val_fraction=config.val_fraction)
    if len(idx) == 0:
        raise InputError(f"the {split!r} split of {config.path} is empty ({n} examples, "
                         f"val_fraction {config.val_fraction})")
    if config.source == "folder":
        return sources.ImageFolderSource(config.path, config.image_size, idx, files=files)
    return sources.FFHQStarSource(config.path, config.image_size, idx)


def _to_float(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = dict(batch)
    out["image"] = batch["image"].astype(np.float32) / np.float32(255)  # exactly x / 255
    return out


def make_dataset(config: Any, split: str, *, process_index: int | None = None,
                 process_count: int | None = None, **overrides):
    """A grain.IterDataset of batches of `split` ('train' | 'val') for this process.

    config: DataConfig, dict or ConfigDict (see DataConfig); `overrides` replace its fields, e.g.
    `make_dataset(cfg, "val", shuffle=False, num_epochs=1, drop_remainder=False)`.
    process_index / process_count default to jax.process_index() / jax.process_count().
    Batches: {"image": float32 [b, S, S, 3] in [0, 1], "index": int64 [b], and for FFHQ*
    "w": float32 [b, w_dim]}, b = batch_size / process_count.
    Raises InputError for a missing or empty folder at once; an unreadable image raises InputError
    naming the file when it is reached.
    """
    import grain

    config = DataConfig.from_mapping(config, **overrides)
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
        raise InputError(f"process_index {process_index} not in [0, {process_count})")
    _check(config, process_count)
    local_batch = config.batch_size // process_count

    src = make_source(config, split)
    per_process = len(src) // process_count
    if per_process == 0:
        raise InputError(f"the {split!r} split of {config.path} has {len(src)} examples, fewer "
                         f"than the {process_count} processes")
    finite = config.num_epochs is not None
    if finite and config.drop_remainder and per_process * config.num_epochs < local_batch:
        raise InputError(f"the {split!r} split of {config.path} gives {per_process} examples per "
                         f"process, fewer than one batch of {local_batch}")

    ds = grain.MapDataset.source(src)
    ds = ds[: per_process * process_count][process_index::process_count]
    if config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    ds = ds.repeat(config.num_epochs)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.num_threads,
                                              prefetch_buffer_size=config.prefetch_buffer_size))
    ds = ds.batch(local_batch, drop_remainder=config.drop_remainder)
    return ds.map(_to_float)
