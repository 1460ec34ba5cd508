"""Run outputs: JSON lines, TensorBoard event files and PNG sample grids.

- `JsonlWriter`: WORKDIR/metrics.jsonl, one {"step": s, "time": unix seconds, name: value, ...}
  object per log step. A resumed run appends; steps logged after the last checkpoint of an
  interrupted run appear twice (the later line is the one the resumed run computed).
- `EventWriter`: WORKDIR/tensorboard/events.out.tfevents.*, TensorBoard event files written by
  tensorboardX (no TensorFlow): every logged scalar, and the sample grids as images.
- `grid` / `save_grid`: a PNG of image rows (one per example) and columns (one per kind of
  image), each column labelled above its first row.
"""

from __future__ import annotations

import json
import time
from typing import Mapping

import numpy as np
from PIL import Image, ImageDraw

from ifadit_jax.files import atomic_path


class JsonlWriter:
    def __init__(self, path: str):
        self.path = path
        self._f = open(path, "a")

    def write(self, step: int, values: Mapping[str, float]) -> None:
        record = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in values.items()}}
        self._f.write(json.dumps(record, sort_keys=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


# ----------------------------------------------------------------------------- TensorBoard

class EventWriter:
    """Scalars and images in a TensorBoard event file in `logdir`, through tensorboardX (which
    needs neither TensorFlow nor tensorboard)."""

    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(logdir=logdir, flush_secs=10)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in sorted(values.items()):
            self._writer.add_scalar(tag, float(value), int(step))

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """image: uint8 [H, W, 3]."""
        self._writer.add_image(tag, image, int(step), dataformats="HWC")

    def close(self) -> None:
        self._writer.close()


# ----------------------------------------------------------------------------- sample grids

LABEL_HEIGHT = 16  # pixels above the first row for the column labels


def grid(columns: Mapping[str, np.ndarray], max_rows: int = 4) -> np.ndarray:
    """uint8 [LABEL_HEIGHT + rows * H, n_columns * W, 3]: row i shows example i in every column
    (e.g. input, anonymized, recovered, wrong key), values clipped from [0, 1]; each column's
    name is written in the label strip above it."""
    arrays = [np.asarray(a)[:max_rows] for a in columns.values()]
    rows = [np.concatenate([a[i] for a in arrays], axis=1) for i in range(len(arrays[0]))]
    body = (np.clip(np.concatenate(rows, axis=0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    strip = Image.new("RGB", (body.shape[1], LABEL_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    width = arrays[0].shape[2]
    for j, label in enumerate(columns):
        draw.text((j * width + 4, 2), label, fill=(0, 0, 0))
    return np.concatenate([np.asarray(strip), body], axis=0)


def save_grid(path: str, image: np.ndarray) -> None:
    """Writes the grid as a PNG (atomically)."""
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
