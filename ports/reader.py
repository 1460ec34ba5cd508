"""Torch-free, code-free reader for PyTorch checkpoints.

Reads the zip `.pt`/`.pth` format (torch >= 1.6), the legacy pre-1.6 stream format, Lightning
`.ckpt` files (zip format with extra entries) and NVlabs network pickles (`torch_utils.persistence`
records whose storages are legacy `torch.save` blobs) into plain Python containers of numpy arrays.

Nothing in a checkpoint is executed: the unpickler admits only the globals needed to rebuild
tensors, storages, ordered dicts, numpy scalars and NVlabs persistence records. Any other global is
refused with an error that names it, before anything is called. The embedded `module_src` of an
NVlabs record stays an inert string.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from ifadit_jax.errors import WeightsError

__all__ = [
    "CheckpointError",
    "PersistentRecord",
    "read_checkpoint",
    "nvlabs_state_dict",
    "flatten_state_dict",
]


class CheckpointError(WeightsError):
    """A file that is not a readable checkpoint, or one that asks for a refused global."""


_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _StorageType:
    """Stands in for `torch.FloatStorage` and friends: only carries the element dtype."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    """A flat typed buffer; tensors are strided views into it."""

    def __init__(self, dtype: np.dtype, numel: int, data: np.ndarray | None = None):
        self.dtype = np.dtype(dtype)
        self.numel = numel
        self.data = data  # filled later for the legacy format

    def array(self) -> np.ndarray:
        if self.data is None:
            raise CheckpointError("storage referenced but never filled (truncated checkpoint?)")
        return self.data


class _PendingTensor:
    """A tensor whose storage bytes come after the pickle (legacy format)."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def materialize(self) -> np.ndarray:
        flat = self.storage.array()
        if not self.size:
            return flat[self.offset].copy() if flat.size > self.offset else np.zeros((), flat.dtype)
        needed = self.offset + sum((s - 1) * st for s, st in zip(self.size, self.stride)) + 1
        if any(s == 0 for s in self.size):
            return np.zeros(self.size, flat.dtype)
        if needed > flat.size:
            raise CheckpointError("tensor reaches past the end of its storage (truncated checkpoint?)")
        item = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], shape=self.size, strides=[st * item for st in self.stride])
        return np.array(view, copy=True)


class PersistentRecord(dict):
    """An NVlabs `torch_utils.persistence` object: {type, version, module_src, class_name, state}.

    The module source is kept as text and never executed.
    """


class _Namespace(dict):
    """Stands in for `argparse.Namespace` (found in some Lightning/pSp option dumps)."""

    def __setstate__(self, state):
        self.update(state)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    return _PendingTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, *unused):
    return _PendingTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
    return data


def _numpy_scalar(dtype, data=None):
    if isinstance(data, str):  # protocol-2 pickles carry bytes as latin-1 text
        data = data.encode("latin-1")
    return np.frombuffer(data, dtype=dtype)[0]


def _codecs_encode(text, encoding="latin-1"):
    return text.encode(encoding)


def _load_from_bytes(blob: bytes):
    storage = _read_legacy(io.BytesIO(blob), "<embedded storage>")
    if isinstance(storage, _PendingTensor):
        return storage.storage
    return storage


def _allowed_globals() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _load_from_bytes,
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): lambda meta: PersistentRecord(meta),
        ("dnnlib.util", "EasyDict"): dict,
        ("argparse", "Namespace"): _Namespace,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
        ("_codecs", "encode"): _codecs_encode,
    }
    for name in _STORAGE_DTYPES:
        table[("torch", name)] = _StorageType(name)
        table[("torch.storage", name)] = _StorageType(name)
    return table


_ALLOWED = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, stream, source: str, persistent_load):
        super().__init__(stream)
        self._source = source
        self._persistent = persistent_load

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self._source}: refusing to load global '{module}.{name}' "
                "(only tensor-rebuilding globals are allowed; nothing was executed)") from None

    def persistent_load(self, pid):
        return self._persistent(pid)


def _storage_type(obj) -> np.dtype:
    if isinstance(obj, _StorageType):
        return obj.dtype
    if isinstance(obj, str) and obj in _STORAGE_DTYPES:  # some writers store the name
        return np.dtype(_STORAGE_DTYPES[obj])
    raise CheckpointError(f"unknown storage type {obj!r}")


def _finalize(obj):
    """Replaces pending tensors by numpy arrays and ordered dicts by dicts, recursively."""
    if isinstance(obj, _PendingTensor):
        return obj.materialize()
    if isinstance(obj, PersistentRecord):
        return PersistentRecord({k: _finalize(v) for k, v in obj.items()})
    if isinstance(obj, _Namespace):
        return {k: _finalize(v) for k, v in obj.items()}
    if isinstance(obj, dict):
        return {k: _finalize(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finalize(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_finalize(v) for v in obj)
    if isinstance(obj, set):
        return {_finalize(v) for v in obj}
    return obj


def _read_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pickles:
            raise CheckpointError(f"{path}: zip file without data.pkl, not a PyTorch checkpoint")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder") != b"little":
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
        storages: dict[str, _Storage] = {}

        def persistent_load(pid):
            if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
                raise CheckpointError(f"{path}: unexpected persistent id {pid!r}")
            _, storage_type, key, _location, numel = pid[:5]
            if key not in storages:
                dtype = _storage_type(storage_type)
                raw = archive.read(f"{prefix}data/{key}")
                data = np.frombuffer(raw, dtype=dtype)
                storages[key] = _Storage(dtype, numel, data)
            return storages[key]

        unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), path, persistent_load)
        return _finalize(unpickler.load())


def _read_legacy(stream, source: str) -> Any:
    """The pre-1.6 format: magic, protocol, sys_info, object pickle, storage keys, raw storages."""
    def plain_load():
        return _RestrictedUnpickler(stream, source, _no_persistent).load()

    def _no_persistent(pid):
        raise CheckpointError(f"{source}: unexpected persistent id in header")

    magic = plain_load()
    if magic != _LEGACY_MAGIC:
        raise CheckpointError(f"{source}: not a PyTorch checkpoint (bad magic number)")
    if plain_load() != _LEGACY_PROTOCOL:
        raise CheckpointError(f"{source}: unsupported legacy protocol version")
    plain_load()  # sys_info: endianness and type sizes, always little/standard in practice

    storages: dict[str, _Storage] = {}
    views: dict[str, tuple[str, int, int]] = {}

    def persistent_load(pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise CheckpointError(f"{source}: unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel, view_metadata = pid
        if key not in storages:
            storages[key] = _Storage(_storage_type(storage_type), numel)
        if view_metadata is not None:
            view_key, offset, view_size = view_metadata
            views[view_key] = (key, offset, view_size)
            return _ViewStorage(storages[key], offset, view_size)
        return storages[key]

    result = _RestrictedUnpickler(stream, source, persistent_load).load()
    keys = _RestrictedUnpickler(stream, source, _no_persistent).load()
    for key in keys:
        storage = storages[key]
        header = stream.read(8)
        if len(header) != 8:
            raise CheckpointError(f"{source}: truncated checkpoint (storage {key} missing)")
        (numel,) = struct.unpack("<q", header)
        nbytes = numel * storage.dtype.itemsize
        raw = stream.read(nbytes)
        if len(raw) != nbytes:
            raise CheckpointError(f"{source}: truncated checkpoint (storage {key} cut short)")
        storage.data = np.frombuffer(raw, dtype=storage.dtype)
    return _finalize(result)


class _ViewStorage(_Storage):
    def __init__(self, base: _Storage, offset: int, size: int):
        super().__init__(base.dtype, size)
        self.base, self.offset = base, offset

    def array(self):
        return self.base.array()[self.offset:self.offset + self.numel]


def read_checkpoint(path: str | os.PathLike) -> Any:
    """Reads any supported checkpoint into dicts/lists of numpy arrays.

    Raises:
      CheckpointError: one readable line naming the file and what is wrong with it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        if zipfile.is_zipfile(path):
            return _read_zip(path)
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if len(head) < 2 or head[0] != 0x80:
                raise CheckpointError(f"{path}: not a PyTorch checkpoint or network pickle")
            data = f.read()
        # Legacy torch.save streams start with the pickled magic number (a long integer).
        if data[2:3] == b"\x8a":
            return _read_legacy(io.BytesIO(data), path)
        return _finalize(_RestrictedUnpickler(io.BytesIO(data), path, _refuse_persistent(path)).load())
    except CheckpointError:
        raise
    except (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, struct.error, KeyError,
            ValueError, TypeError, IndexError, AttributeError, MemoryError) as e:
        raise CheckpointError(
            f"{path}: unreadable or truncated checkpoint ({type(e).__name__}: {e})"[:300]) from None


def _refuse_persistent(path):
    def load(pid):
        raise CheckpointError(f"{path}: unexpected persistent id {pid!r}")
    return load


def nvlabs_state_dict(record: PersistentRecord) -> dict[str, np.ndarray]:
    """Flattens an NVlabs persistent module record the way `nn.Module.state_dict()` orders it."""
    out: dict[str, np.ndarray] = {}

    def visit(rec, prefix):
        state = rec["state"] if isinstance(rec, PersistentRecord) else rec
        skip = set(state.get("_non_persistent_buffers_set", ()) or ())
        for name, value in (state.get("_parameters") or {}).items():
            if value is not None:
                out[prefix + name] = value
        for name, value in (state.get("_buffers") or {}).items():
            if value is not None and name not in skip:
                out[prefix + name] = value
        for name, child in (state.get("_modules") or {}).items():
            if child is not None:
                visit(child, f"{prefix}{name}.")

    if not isinstance(record, (PersistentRecord, dict)) or "state" not in record and "_modules" not in record:
        raise CheckpointError("not an NVlabs network record")
    visit(record, "")
    return out


def flatten_state_dict(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts of arrays -> {'a.b.c': array}; non-array leaves are dropped."""
    out: dict[str, np.ndarray] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten_state_dict(v, f"{prefix}{k}."))
    elif isinstance(tree, np.ndarray):
        out[prefix[:-1]] = tree
    return out
