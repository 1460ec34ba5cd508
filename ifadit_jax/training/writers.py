"""Run outputs: JSON lines, TensorBoard event files and PNG sample grids.

- `JsonlWriter`: WORKDIR/metrics.jsonl, one {"step": s, "time": unix seconds, name: value, ...}
  object per log step. A resumed run appends; steps logged after the last checkpoint of an
  interrupted run appear twice (the later line is the one the resumed run computed).
- `EventWriter`: WORKDIR/tensorboard/events.out.tfevents.<time>.<host>, readable by TensorBoard.
  Neither TensorFlow, tensorboard nor tensorboardX is a dependency, so the file is written here:
  a TFRecord stream (length, masked CRC32C of the length, payload, masked CRC32C of the payload)
  of `tensorflow.Event` protocol buffers encoded by hand. Only the fields used are encoded:
  Event {wall_time = 1 (double), step = 2 (int64), file_version = 3 (string), summary = 5};
  Summary {value = 1 (repeated)}; Summary.Value {tag = 1, simple_value = 2 (float),
  image = 4}; Summary.Image {height = 1, width = 2, colorspace = 3, encoded_image_string = 4}.
- `save_grid`: a PNG of image rows (one per example) and columns (one per kind of image).
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import time
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

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


# ----------------------------------------------------------------------------- TFRecord + protobuf

def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # reflected Castagnoli polynomial
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord uses it."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(payload: bytes) -> bytes:
    """One TFRecord: uint64 length, masked CRC of it, payload, masked CRC of the payload (LE)."""
    length = struct.pack("<Q", len(payload))
    return (length + struct.pack("<I", masked_crc32c(length)) + payload
            + struct.pack("<I", masked_crc32c(payload)))


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 values are ten-byte two's complement varints
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint((field << 3) | wire)


def _pb_varint(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(value)


def _pb_bytes(field: int, value: bytes) -> bytes:
    return _key(field, 2) + _varint(len(value)) + value


def _pb_double(field: int, value: float) -> bytes:
    return _key(field, 1) + struct.pack("<d", value)


def _pb_float(field: int, value: float) -> bytes:
    return _key(field, 5) + struct.pack("<f", value)


def event(step: int, wall_time: float, *, file_version: str | None = None,
          values: Sequence[bytes] = ()) -> bytes:
    """An encoded tensorflow.Event with a file version or a Summary of encoded values."""
    out = _pb_double(1, wall_time) + _pb_varint(2, step)
    if file_version is not None:
        out += _pb_bytes(3, file_version.encode())
    if values:
        out += _pb_bytes(5, b"".join(_pb_bytes(1, v) for v in values))
    return out


def scalar_value(tag: str, value: float) -> bytes:
    return _pb_bytes(1, tag.encode()) + _pb_float(2, float(value))


def image_value(tag: str, png: bytes, height: int, width: int, channels: int = 3) -> bytes:
    image = (_pb_varint(1, height) + _pb_varint(2, width) + _pb_varint(3, channels)
             + _pb_bytes(4, png))
    return _pb_bytes(1, tag.encode()) + _pb_bytes(4, image)


class EventWriter:
    """Appends scalars and images to a new TensorBoard event file in `logdir`."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        now = time.time()
        self.path = os.path.join(logdir, f"events.out.tfevents.{int(now)}.{socket.gethostname()}")
        self._f = open(self.path, "ab")
        self._write(event(0, now, file_version="brain.Event:2"))

    def _write(self, payload: bytes) -> None:
        self._f.write(tfrecord(payload))
        self._f.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self._write(event(step, time.time(),
                          values=[scalar_value(k, v) for k, v in sorted(values.items())]))

    def image(self, step: int, tag: str, png: bytes, height: int, width: int) -> None:
        self._write(event(step, time.time(), values=[image_value(tag, png, height, width)]))

    def close(self) -> None:
        self._f.close()


# ----------------------------------------------------------------------------- sample grids

def grid(columns: Mapping[str, np.ndarray], max_rows: int = 4) -> np.ndarray:
    """uint8 [rows * H, n_columns * W, 3]: row i shows example i in every column (e.g. X,
    X_anon, X_rec, X_wrong), values clipped from [0, 1]."""
    arrays = [np.asarray(a)[:max_rows] for a in columns.values()]
    rows = [np.concatenate([a[i] for a in arrays], axis=1) for i in range(len(arrays[0]))]
    return (np.clip(np.concatenate(rows, axis=0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def save_grid(path: str, image: np.ndarray) -> bytes:
    """Writes the grid as a PNG (atomically) and returns the PNG bytes."""
    data = png_bytes(image)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return data
