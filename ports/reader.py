"""Torch-free, code-free reader for PyTorch checkpoints.

Reads the zip `.pt`/`.pth` format (torch >= 1.6), the legacy pre-1.6 stream format, Lightning
`.ckpt` files (zip format with extra entries) and NVlabs network pickles (`torch_utils.persistence`
records whose storages are legacy `torch.save` blobs) into plain Python containers of numpy arrays.

Nothing in a checkpoint is executed: the unpickler admits only the globals needed to rebuild
tensors, storages, ordered dicts, numpy scalars and NVlabs persistence records. Any other global is
refused with an error that names it, before anything is called. The embedded `module_src` of an
NVlabs record stays an inert string.

Every checkpoint is hostile until read. What the reader guarantees, and the caps it enforces
(each violation is a `CheckpointError` naming the file and, where there is one, the tensor key or
storage; no other exception leaves `read_checkpoint`):

* No read outside a storage: every tensor view is checked before memory is touched (offset and
  strides >= 0 and Python-int arithmetic, so no overflow; first and last element inside the
  storage; at most `MAX_NDIM` (32) dimensions of at most `MAX_DIM` (2^40) elements). A storage's bytes must
  equal exactly what its record holds (zip member or legacy stream) and what its header announces.
* Allocation budget: all tensors of one file together may not take more than the bytes of the
  storages really present in it plus `ALLOC_SLACK` (16 MiB), so stride-0 or overlapping views
  cannot expand a small file into a large array. Shared tensors and containers are finalized once
  (memoized by identity), so a "billion laughs" pickle stays linear; cycles are refused.
* Only regular files are read (no FIFO or device); a zip checkpoint is recognized by its first
  four bytes. Zip members: at most `MAX_ZIP_MEMBERS` (100,000) entries, only stored or deflated members, each member's
  declared size at most `MAX_INFLATE_RATIO` (4) times its compressed size plus 64 KiB, and all
  members read together at most 4x the archive's size plus 16 MiB; checked before inflating, and
  the bytes actually inflated are bounded by the declared size and must equal it.
* Pickles: each is pre-scanned opcode by opcode (bounded by its length) before unpickling: at
  most `MAX_PICKLE_OPS` (2,000,000) opcodes, a set-making one counting 4, which also bounds the
  Python objects a pickle can make (measured: about 150 MB at most); a memo index is never larger
  than the number of opcodes before it, and never read before it is written; extension-registry,
  INST/OBJ and out-of-band buffer opcodes are refused. Containers nest at most `MAX_DEPTH` (64)
  deep; dict and set keys must be flat values (str, bytes, numbers, None, or short tuples of
  those) so hashing never recurses.
* No state between files: every read builds its own stand-ins; BUILD (`__setstate__`) is accepted
  only on the fresh objects that need it (ordered dicts, argparse namespaces, numpy dtypes, whose
  state is validated) and refused on anything else, such as the storage-type stand-ins.
* `flatten_state_dict` and `nvlabs_state_dict` visit at most `MAX_KEYS` (1,000,000) nodes making
  at most `MAX_KEY_CHARS` (64 Mi) characters of keys, at most `MAX_DEPTH` levels deep (a shared
  subtree counts each time it is reached). Every NVlabs record carries a `state` dict.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
import re
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

MAX_PICKLE_OPS = 2_000_000
MAX_DEPTH = 64
MAX_NDIM = 32
MAX_DIM = 2 ** 40
ALLOC_SLACK = 16 * 2 ** 20
MAX_ZIP_MEMBERS = 100_000
MAX_INFLATE_RATIO = 4
INFLATE_SLACK = 64 * 2 ** 10
MAX_KEYS = 1_000_000
MAX_KEY_CHARS = 64 * 2 ** 20
MAX_KEY_TUPLE = 8


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
# Opcodes no torch or NVlabs writer emits: the extension registry is process-wide state, INST/OBJ
# instantiate by a second path, and out-of-band buffers have no place in a file.
_REFUSED_OPS = {"EXT1", "EXT2", "EXT4", "INST", "OBJ", "NEXT_BUFFER", "READONLY_BUFFER"}
# A set takes about four times the memory of any other object one opcode can make.
_OP_WEIGHT = {"EMPTY_SET": 4, "FROZENSET": 4}
_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GETS = {"GET", "BINGET", "LONG_BINGET"}
_STORAGE_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DTYPE_SPEC = re.compile(r"[<|=]?[biufc?][0-9]{0,2}")
_FLAT_KEYS = (str, bytes, int, float, bool, type(None))


def _clean(text: str, limit: int = 300) -> str:
    """One printable line: file-controlled text must not carry terminal escapes or newlines."""
    text = str(text)
    cut = len(text) > limit
    text = "".join(c if c.isprintable() else "?" for c in text[:limit - 3 if cut else limit])
    return text + "..." if cut else text


def _name(obj) -> str:
    """A short description of a value from the file, never its whole (possibly huge) text."""
    if isinstance(obj, (str, bytes)):
        return _clean(repr(obj[:80]), 80)
    if isinstance(obj, int) and obj.bit_length() > 64:  # repr of a huge int is slow or refused
        return f"a {obj.bit_length()}-bit integer"
    return _clean(repr(obj) if isinstance(obj, _FLAT_KEYS) else type(obj).__name__, 80)


class _Context:
    """Everything one read knows: the source name and its byte budgets. Never shared by reads."""

    def __init__(self, source: str):
        self.source = source
        self.storage_bytes = 0  # bytes of the storages read from the file so far
        self.materialized = 0  # bytes of the tensors copied out of them so far
        self.zip_budget = 0  # bytes zip members may still inflate to

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.source}: {_clean(what)}")

    def add_storage(self, nbytes: int) -> None:
        self.storage_bytes += nbytes

    def charge(self, nbytes: int, where: str) -> None:
        """Refuses an allocation that the bytes present in the file do not pay for."""
        if self.materialized + nbytes > self.storage_bytes + ALLOC_SLACK:
            raise self.fail(f"{where} would allocate {nbytes} bytes, more than the file's "
                            f"storages hold ({self.storage_bytes} bytes) plus {ALLOC_SLACK}")
        self.materialized += nbytes


class _StorageType:
    """Stands in for `torch.FloatStorage` and friends: only carries the element dtype."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    """A flat typed buffer; tensors are strided views into it."""

    def __init__(self, key: str, dtype: np.dtype, numel: int, data: np.ndarray | None = None):
        self.key = key
        self.dtype = np.dtype(dtype)
        self.numel = numel
        self.data = data  # filled later for the legacy format

    def array(self, ctx: _Context) -> np.ndarray:
        if self.data is None:
            raise ctx.fail(f"storage {self.key!r} referenced but never filled (truncated checkpoint?)")
        return self.data


class _ViewStorage(_Storage):
    """A legacy-format storage view: `numel` elements of `base` from `offset`."""

    def __init__(self, base: _Storage, offset: int, numel: int):
        super().__init__(base.key, base.dtype, numel)
        self.base, self.offset = base, offset

    def array(self, ctx: _Context) -> np.ndarray:
        flat = self.base.array(ctx)
        if self.offset + self.numel > flat.size:
            raise ctx.fail(f"storage view of {self.key!r} reaches past the end of its storage")
        return flat[self.offset:self.offset + self.numel]


class _PendingTensor:
    """A strided view into a storage, exactly as the file describes it: nothing is checked at
    rebuild time, everything in `_check_view` when finalized, where the tensor's key is known."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _materialize(tensor: _PendingTensor, ctx: _Context, where: str) -> Any:
    """Copies a tensor out of its storage after proving every element it touches is inside."""
    storage, offset, size, stride = _check_view(tensor, ctx, where)
    flat = storage.array(ctx)
    numel = math.prod(size)
    ctx.charge(numel * flat.dtype.itemsize, where)
    if numel == 0:
        return np.zeros(size, flat.dtype)
    # A dimension of extent 1 never moves, so its stride is irrelevant (and may be anything).
    stride = tuple(0 if s == 1 else st for s, st in zip(size, stride))
    last = offset + sum((s - 1) * st for s, st in zip(size, stride))
    if offset >= flat.size or last >= flat.size:
        raise ctx.fail(f"{where} reaches element {last} of storage {storage.key!r}, "
                       f"which holds {flat.size} (truncated or hostile checkpoint)")
    if not size:
        return flat[offset].copy()
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=[st * item for st in stride], writeable=False)
    return np.array(view, copy=True)


def _check_view(tensor: _PendingTensor, ctx: _Context, where: str):
    """The rebuild arguments as the file gave them, checked in type and sign."""
    if not isinstance(tensor.storage, _Storage):
        raise ctx.fail(f"{where} is rebuilt from a {_name(tensor.storage)} instead of a storage")
    offset = _check_int(tensor.offset, f"{where}: storage offset", ctx, MAX_DIM * MAX_DIM)
    size = _check_shape(tensor.size, f"{where}: size", ctx)
    stride = _check_shape(tensor.stride, f"{where}: stride", ctx)
    if len(size) != len(stride):
        raise ctx.fail(f"{where} has {len(size)} sizes but {len(stride)} strides")
    return tensor.storage, offset, size, stride


class PersistentRecord(dict):
    """An NVlabs `torch_utils.persistence` object: {type, version, module_src, class_name, state}.

    The module source is kept as text and never executed.
    """


class _Namespace(dict):
    """Stands in for `argparse.Namespace` (found in some Lightning/pSp option dumps)."""


class _NumpyDtype:
    """Stands in for `numpy.dtype` while unpickling: numpy's own dtypes are process-wide
    singletons, and BUILD on one would change it for every later read."""

    def __init__(self, spec: str):
        self.spec = spec
        self.byteorder = "="

    def resolve(self) -> np.dtype:
        return np.dtype(self.spec).newbyteorder(self.byteorder)


def _check_int(value, what: str, ctx: _Context, limit: int) -> int:
    if type(value) is not int or not 0 <= value <= limit:
        raise ctx.fail(f"{what} must be an integer in [0, {limit}], got {_name(value)}")
    return value


def _check_shape(values, what: str, ctx: _Context) -> tuple:
    if not isinstance(values, (tuple, list)) or len(values) > MAX_NDIM:
        raise ctx.fail(f"{what} must be a tuple of at most {MAX_NDIM} integers")
    return tuple(_check_int(v, what, ctx, MAX_DIM) for v in values)


def _rebuild_tensor(storage=None, storage_offset=None, size=None, stride=None, *unused):
    # Checked when finalized, where the error can name the tensor's key.
    return _PendingTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(ctx: _Context):
    def rebuild(data=None, *unused):
        if not isinstance(data, _PendingTensor):
            raise ctx.fail(f"parameter rebuilt from a {_name(data)} instead of a tensor")
        return data
    return rebuild


def _numpy_dtype(ctx: _Context):
    def make(spec=None, *unused):
        if not isinstance(spec, str) or not _DTYPE_SPEC.fullmatch(spec):
            raise ctx.fail(f"numpy dtype {_name(spec)} refused (only plain numeric dtypes)")
        return _NumpyDtype(spec)
    return make


def _numpy_scalar(ctx: _Context):
    def make(dtype=None, data=None, *unused):
        if not isinstance(dtype, _NumpyDtype):
            raise ctx.fail(f"numpy scalar of a {_name(dtype)} instead of a dtype")
        if isinstance(data, str):  # protocol-2 pickles carry bytes as latin-1 text
            data = data.encode("latin-1")
        resolved = dtype.resolve()
        if not isinstance(data, bytes) or len(data) != resolved.itemsize:
            raise ctx.fail(f"numpy scalar of dtype {resolved} needs {resolved.itemsize} bytes")
        return np.frombuffer(data, dtype=resolved)[0]
    return make


def _codecs_encode(ctx: _Context):
    def encode(text=None, encoding="latin-1", *unused):
        # Protocol-2 pickles write bytes as `_codecs.encode(text, 'latin1')`; nothing else.
        if not isinstance(text, str) or not isinstance(encoding, str) \
                or encoding.lower() not in ("latin1", "latin-1"):
            raise ctx.fail(f"_codecs.encode with codec {_name(encoding)} refused (latin-1 only)")
        return text.encode("latin-1")
    return encode


def _container(ctx: _Context, cls):
    """Stands in for a dict-like class called with key/value pairs (REDUCE); NEWOBJ on it
    gives an empty `cls` (see `_Unpickler._load_newobj`)."""
    def make(items=(), *unused):
        out = cls()
        for pair in items:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ctx.fail("dict built from something other than key/value pairs")
            out[_check_key(pair[0], ctx)] = pair[1]
        return out
    return make


_CONTAINERS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("dnnlib.util", "EasyDict"): dict,
    ("argparse", "Namespace"): _Namespace,
}


def _persistent_record(ctx: _Context):
    def make(meta=None, *unused):
        if not isinstance(meta, dict):
            raise ctx.fail(f"NVlabs record built from a {_name(meta)} instead of a dict")
        return PersistentRecord(meta)
    return make


def _load_from_bytes(ctx: _Context):
    # One blob referenced many times (a memo get costs two bytes) is one storage, so that its
    # bytes count once in the allocation budget.
    loaded: dict[int, tuple[bytes, _Storage]] = {}

    def load(blob=None, *unused):
        if not isinstance(blob, bytes):
            raise ctx.fail(f"embedded storage is a {_name(blob)}, not bytes")
        if id(blob) in loaded:
            return loaded[id(blob)][1]
        storage = _read_legacy(blob, ctx, embedded=True)
        if isinstance(storage, _PendingTensor):
            storage = storage.storage
        if not isinstance(storage, _Storage):
            raise ctx.fail(f"embedded storage holds a {_name(storage)}, not a storage")
        loaded[id(blob)] = (blob, storage)
        return storage
    return load


def _allowed_globals(ctx: _Context, embedded: bool = False) -> dict[tuple[str, str], Any]:
    """A fresh table for every pickle: nothing a file does to a stand-in can reach another."""
    rebuild = _rebuild_tensor
    table: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor"): rebuild,
        ("torch._utils", "_rebuild_tensor_v2"): rebuild,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter(ctx),
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter(ctx),
        ("numpy", "dtype"): _numpy_dtype(ctx),
        ("numpy.core.multiarray", "scalar"): _numpy_scalar(ctx),
        ("numpy._core.multiarray", "scalar"): _numpy_scalar(ctx),
        ("_codecs", "encode"): _codecs_encode(ctx),
    }
    if not embedded:  # an embedded storage blob may not embed another, nor an NVlabs record
        table[("torch.storage", "_load_from_bytes")] = _load_from_bytes(ctx)
        table[("torch_utils.persistence", "_reconstruct_persistent_obj")] = _persistent_record(ctx)
    for key, cls in _CONTAINERS.items():
        table[key] = _container(ctx, cls)
    for name in _STORAGE_DTYPES:
        table[("torch", name)] = table[("torch.storage", name)] = _StorageType(name)
    return table


def _check_key(key, ctx: _Context, depth: int = 0):
    """Dict and set keys are flat, so hashing or comparing them never recurses deeply."""
    if isinstance(key, _FLAT_KEYS):
        return key
    if isinstance(key, tuple) and len(key) <= MAX_KEY_TUPLE and depth < 2:
        for part in key:
            _check_key(part, ctx, depth + 1)
        return key
    raise ctx.fail(f"dict or set key of type {type(key).__name__} refused")


def _prescan(data: bytes, start: int, ctx: _Context) -> int:
    """Walks one pickle's opcodes without building anything; returns the offset after STOP."""
    stream = io.BytesIO(data)  # shares the bytes object's buffer: no copy
    stream.seek(start)
    written: set[int] = set()
    ops = 0
    for op, arg, _pos in pickletools.genops(stream):
        ops += _OP_WEIGHT.get(op.name, 1)
        if ops > MAX_PICKLE_OPS:
            raise ctx.fail(f"pickle has more than {MAX_PICKLE_OPS} opcodes")
        if op.name in _REFUSED_OPS:
            raise ctx.fail(f"pickle opcode {op.name} refused")
        # Python 2 picklers skip memo indexes, but none writes one beyond its opcode count.
        if op.name in _MEMO_PUTS:
            if not isinstance(arg, int) or not 0 <= arg <= ops:
                raise ctx.fail(f"pickle memo index {_name(arg)} larger than the pickle")
            written.add(arg)
        elif op.name == "MEMOIZE":
            written.add(len(written))
        elif op.name in _MEMO_GETS and arg not in written:
            raise ctx.fail(f"pickle memo index {_name(arg)} read before it is written")
    return stream.tell()


class _Unpickler(pickle._Unpickler):
    """The pure-Python unpickler (memo is a dict, every opcode is overridable), restricted to a
    per-read table of globals, with BUILD and keyed inserts checked."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data, ctx: _Context, persistent_load, embedded: bool = False):
        super().__init__(io.BytesIO(data))
        self._ctx = ctx
        self._table = _allowed_globals(ctx, embedded)
        self._empty = {id(self._table[key]): cls for key, cls in _CONTAINERS.items()}
        self._persistent = persistent_load

    def find_class(self, module, name):
        try:
            return self._table[(module, name)]
        except (KeyError, TypeError):
            raise self._ctx.fail(
                f"refusing to load global '{module}.{name}' "
                "(only tensor-rebuilding globals are allowed; nothing was executed)") from None

    def persistent_load(self, pid):
        return self._persistent(pid)

    def _load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is _NumpyDtype:
            _build_dtype(inst, state, self._ctx)
        elif type(inst) is _Namespace and isinstance(state, dict):
            for key, value in state.items():
                inst[_check_key(key, self._ctx)] = value
        elif type(inst) is collections.OrderedDict and isinstance(state, dict):
            pass  # torch's `_metadata` (module versions): not needed, and never an attribute here
        else:
            raise self._ctx.fail(f"pickle BUILD on a {type(inst).__name__} refused")

    def _set_items(self, items: list):
        target = self.stack[-1]
        if type(target) not in (dict, collections.OrderedDict, _Namespace) \
                or len(items) % 2:
            raise self._ctx.fail(f"pickle SETITEM on a {type(target).__name__} refused")
        for i in range(0, len(items), 2):
            target[_check_key(items[i], self._ctx)] = items[i + 1]

    def _load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        self._set_items([key, value])

    def _load_setitems(self):
        self._set_items(self.pop_mark())

    def _load_dict(self):
        items = self.pop_mark()
        self.append({})
        self._set_items(items)

    def _load_additems(self):
        items = [_check_key(item, self._ctx) for item in self.pop_mark()]
        target = self.stack[-1]
        if type(target) is not set:
            raise self._ctx.fail(f"pickle ADDITEMS on a {type(target).__name__} refused")
        target.update(items)

    def _load_frozenset(self):
        self.append(frozenset(_check_key(item, self._ctx) for item in self.pop_mark()))

    def _load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        empty = self._empty.get(id(cls))
        if empty is None or not isinstance(args, tuple):
            raise self._ctx.fail(f"pickle NEWOBJ of a {type(cls).__name__} refused")
        self.append(empty())

    def _load_newobj_ex(self):
        self.stack.pop()  # keyword arguments: the admitted containers take none
        self._load_newobj()

    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.SETITEM[0]] = _load_setitem
    dispatch[pickle.SETITEMS[0]] = _load_setitems
    dispatch[pickle.DICT[0]] = _load_dict
    dispatch[pickle.ADDITEMS[0]] = _load_additems
    dispatch[pickle.FROZENSET[0]] = _load_frozenset
    dispatch[pickle.NEWOBJ[0]] = _load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = _load_newobj_ex


def _build_dtype(dtype: _NumpyDtype, state, ctx: _Context) -> None:
    # numpy pickles (version, byteorder, subarray, names, fields, elsize, alignment, flags).
    if not isinstance(state, tuple) or len(state) < 5 or state[1] not in ("<", "|", "=") \
            or any(part is not None for part in state[2:5]):
        raise ctx.fail("numpy dtype state refused (only plain little-endian dtypes)")
    dtype.byteorder = state[1]


def _unpickle(data: bytes, start: int, ctx: _Context, persistent_load, embedded: bool = False):
    """Pre-scans then loads the pickle at `start`; returns (object, offset after it)."""
    end = _prescan(data, start, ctx)
    return _Unpickler(data[start:end], ctx, persistent_load, embedded).load(), end


def _storage_type(obj, ctx: _Context) -> np.dtype:
    if isinstance(obj, _StorageType):
        return obj.dtype
    if isinstance(obj, str) and obj in _STORAGE_DTYPES:  # some writers store the name
        return np.dtype(_STORAGE_DTYPES[obj])
    raise ctx.fail(f"unknown storage type {_name(obj)}")


def _storage_pid(pid, ctx: _Context, length: int):
    """(dtype, key, numel, rest) of a persistent id ('storage', type, key, location, numel, ...)."""
    if not (isinstance(pid, tuple) and len(pid) == length and pid[0] == "storage"):
        raise ctx.fail(f"unexpected persistent id (a {type(pid).__name__}, not a storage reference)")
    _, storage_type, key, _location, numel = pid[:5]
    if not isinstance(key, str) or not _STORAGE_KEY.fullmatch(key):
        raise ctx.fail(f"storage key {_name(key)} refused")
    numel = _check_int(numel, f"element count of storage {key!r}", ctx, MAX_DIM * MAX_DIM)
    return _storage_type(storage_type, ctx), key, numel, pid[5:]


def _known_storage(storages: dict, key: str, dtype: np.dtype, numel: int, ctx: _Context):
    storage = storages[key]
    if storage.dtype != dtype or storage.numel != numel:
        raise ctx.fail(f"storage {key!r} referenced with two different types or sizes")
    return storage


_DEFAULT = object()
_FINALIZED_TYPES = (type(None), bool, int, float, complex, str, bytes, np.generic, np.ndarray)


def _finalize(obj, ctx: _Context, memo: dict, path: tuple = ()):
    """Replaces pending tensors by numpy arrays, dict-like stand-ins by dicts and numpy dtype
    stand-ins by dtypes. Each shared object is finalized once; cycles and deep nests refused."""
    if isinstance(obj, _FINALIZED_TYPES):
        return obj
    done = memo.get(id(obj), _DEFAULT)
    if done is None:
        raise ctx.fail(f"object at {_where(path)} contains itself")
    if done is not _DEFAULT:
        return done[1]
    if len(path) >= MAX_DEPTH:
        raise ctx.fail(f"objects nested deeper than {MAX_DEPTH} levels at {_where(path[:8])}")
    memo[id(obj)] = None
    out = _finalize_one(obj, ctx, memo, path)
    memo[id(obj)] = (obj, out)  # keep obj alive so its id is not reused during this read
    return out


def _finalize_one(obj, ctx: _Context, memo: dict, path: tuple):
    if isinstance(obj, _PendingTensor):
        return _materialize(obj, ctx, f"tensor {_where(path)}")
    if isinstance(obj, _NumpyDtype):
        return obj.resolve()
    if isinstance(obj, dict):
        items = {k: _finalize(v, ctx, memo, path + (k,)) for k, v in obj.items()}
        if not isinstance(obj, PersistentRecord):
            return items
        if not isinstance(items.get("state"), dict):  # every consumer reads record["state"]
            raise ctx.fail(f"NVlabs record at {_where(path)} has no state dict")
        return PersistentRecord(items)
    if isinstance(obj, (list, tuple)):
        items = [_finalize(v, ctx, memo, path + (i,)) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, (set, frozenset)):
        return obj  # elements are flat keys (checked when added)
    raise ctx.fail(f"unexpected {type(obj).__name__} at {_where(path)} (a bare storage or "
                   "global outside a tensor)")


def _where(path: tuple) -> str:
    return "'" + _clean(".".join(str(p) for p in path), 120) + "'" if path else "the top level"


def _read_member(archive: zipfile.ZipFile, name: str, ctx: _Context) -> bytes:
    """One zip member, its declared sizes checked before a byte is inflated."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise ctx.fail(f"zip member {name!r} missing") from None
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise ctx.fail(f"zip member {name!r} uses an unsupported compression")
    if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
        raise ctx.fail(f"zip member {name!r} declares inconsistent sizes")
    if info.file_size > info.compress_size * MAX_INFLATE_RATIO + INFLATE_SLACK:
        raise ctx.fail(f"zip member {name!r} would inflate more than {MAX_INFLATE_RATIO}x")
    if info.file_size > ctx.zip_budget:
        raise ctx.fail(f"zip members inflate to more than {MAX_INFLATE_RATIO}x the archive")
    ctx.zip_budget -= info.file_size
    with archive.open(info) as member:
        raw = member.read(info.file_size)  # zipfile never inflates past the declared size
    if len(raw) != info.file_size:
        raise ctx.fail(f"zip member {name!r} is shorter than it declares")
    return raw


def _zip_persistent_load(archive, prefix: str, ctx: _Context, storages: dict):
    def load(pid):
        dtype, key, numel, _ = _storage_pid(pid, ctx, 5)
        if key in storages:
            return _known_storage(storages, key, dtype, numel, ctx)
        raw = _read_member(archive, f"{prefix}data/{key}", ctx)
        if len(raw) != numel * dtype.itemsize:
            raise ctx.fail(f"storage {key!r} holds {len(raw)} bytes, its header announces "
                           f"{numel} x {dtype.itemsize}")
        ctx.add_storage(len(raw))
        storages[key] = _Storage(key, dtype, numel, np.frombuffer(raw, dtype=dtype))
        return storages[key]
    return load


def _read_zip(stream, size: int, ctx: _Context) -> Any:
    with zipfile.ZipFile(stream) as archive:
        if len(archive.infolist()) > MAX_ZIP_MEMBERS:
            raise ctx.fail(f"zip file with more than {MAX_ZIP_MEMBERS} members")
        ctx.zip_budget = size * MAX_INFLATE_RATIO + ALLOC_SLACK
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pickles:
            raise ctx.fail("zip file without data.pkl, not a PyTorch checkpoint")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and _read_member(archive, f"{prefix}byteorder", ctx) != b"little":
            raise ctx.fail("big-endian checkpoints are not supported")
        storages: dict[str, _Storage] = {}
        data = _read_member(archive, pickles[0], ctx)
        result, _ = _unpickle(data, 0, ctx, _zip_persistent_load(archive, prefix, ctx, storages))
        return _finalize(result, ctx, {})


def _refuse_persistent(ctx: _Context):
    def load(pid):
        raise ctx.fail(f"unexpected persistent id of type {type(pid).__name__}")
    return load


def _legacy_persistent_load(ctx: _Context, storages: dict):
    def load(pid):
        dtype, key, numel, (view_metadata,) = _storage_pid(pid, ctx, 6)
        storage = storages.get(key) or storages.setdefault(key, _Storage(key, dtype, numel))
        _known_storage(storages, key, dtype, numel, ctx)
        if view_metadata is None:
            return storage
        if not (isinstance(view_metadata, tuple) and len(view_metadata) == 3):
            raise ctx.fail(f"storage view metadata of {key!r} is not (key, offset, size)")
        _view_key, offset, view_size = view_metadata
        offset = _check_int(offset, f"view offset into {key!r}", ctx, numel)
        view_size = _check_int(view_size, f"view size of {key!r}", ctx, numel - offset)
        return _ViewStorage(storage, offset, view_size)
    return load


def _read_legacy(data: bytes, ctx: _Context, embedded: bool = False) -> Any:
    """The pre-1.6 format: magic, protocol, sys_info, object pickle, storage keys, raw storages.

    Returns the object pickle's result unfinalized; storages are zero-copy views into `data`.
    """
    refuse = _refuse_persistent(ctx)
    magic, pos = _unpickle(data, 0, ctx, refuse, embedded=True)
    if magic != _LEGACY_MAGIC:
        raise ctx.fail("not a PyTorch checkpoint (bad magic number)")
    protocol, pos = _unpickle(data, pos, ctx, refuse, embedded=True)
    if protocol != _LEGACY_PROTOCOL:
        raise ctx.fail("unsupported legacy protocol version")
    _sys_info, pos = _unpickle(data, pos, ctx, refuse, embedded=True)
    storages: dict[str, _Storage] = {}
    result, pos = _unpickle(data, pos, ctx, _legacy_persistent_load(ctx, storages), embedded)
    keys, pos = _unpickle(data, pos, ctx, refuse, embedded=True)
    if not isinstance(keys, list) or len(set(map(type, keys)) - {str}) or len(set(keys)) != len(keys):
        raise ctx.fail("legacy storage key list is not a list of distinct names")
    for key in keys:
        pos = _fill_legacy_storage(data, pos, storages, key, ctx)
    return result


def _fill_legacy_storage(data: bytes, pos: int, storages: dict, key: str, ctx: _Context) -> int:
    if key not in storages:
        raise ctx.fail(f"storage {key!r} listed but never referenced")
    storage = storages[key]
    if pos + 8 > len(data):
        raise ctx.fail(f"truncated checkpoint (storage {key!r} missing)")
    (numel,) = struct.unpack_from("<q", data, pos)
    if numel != storage.numel:
        raise ctx.fail(f"storage {key!r} holds {numel} elements, its header announces {storage.numel}")
    nbytes = numel * storage.dtype.itemsize
    pos += 8
    if pos + nbytes > len(data):
        raise ctx.fail(f"truncated checkpoint (storage {key!r} cut short)")
    ctx.add_storage(nbytes)
    storage.data = np.frombuffer(data, dtype=storage.dtype, count=numel, offset=pos) if numel \
        else np.zeros(0, storage.dtype)
    return pos + nbytes


def read_checkpoint(path: str | os.PathLike) -> Any:
    """Reads any supported checkpoint into dicts/lists of numpy arrays.

    Raises:
      CheckpointError: one readable line naming the file and what is wrong with it; no other
        exception escapes, whatever the file holds.
    """
    path = os.fspath(path)
    ctx = _Context(path)
    if not os.path.isfile(path):  # follows symlinks: a FIFO or device is refused here
        raise ctx.fail("not a regular file" if os.path.lexists(path) else "no such file")
    try:
        with open(path, "rb") as f:
            # torch writes zip checkpoints from the first byte; sniffing the end (as
            # `zipfile.is_zipfile` does) could take a legacy file's raw floats for a zip.
            if f.read(4) == b"PK\x03\x04":
                return _read_zip(f, os.fstat(f.fileno()).st_size, ctx)
            f.seek(0)
            data = f.read()
        if len(data) < 3 or data[0] != 0x80:
            raise ctx.fail("not a PyTorch checkpoint or network pickle")
        # Legacy torch.save streams start with the pickled magic number (a long integer).
        if data[2] == 0x8A:
            return _finalize(_read_legacy(data, ctx), ctx, {})
        result, _ = _unpickle(data, 0, ctx, _refuse_persistent(ctx))
        return _finalize(result, ctx, {})
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 -- a hostile file may provoke any exception type
        raise ctx.fail(f"unreadable or truncated checkpoint ({type(e).__name__}: {e})") from None


class _KeyBudget:
    """Caps the keys a tree walk produces: shared subtrees may repeat, so count what is made."""

    def __init__(self, what: str):
        self.what, self.keys, self.chars = what, 0, 0

    def spend(self, key: str) -> None:
        self.keys += 1
        self.chars += len(key)
        if self.keys > MAX_KEYS or self.chars > MAX_KEY_CHARS:
            raise CheckpointError(f"{self.what}: more than {MAX_KEYS} keys or {MAX_KEY_CHARS} "
                                  "characters of keys")


def nvlabs_state_dict(record: PersistentRecord) -> dict[str, np.ndarray]:
    """Flattens an NVlabs persistent module record the way `nn.Module.state_dict()` orders it."""
    if not isinstance(record, dict) or ("state" not in record and "_modules" not in record):
        raise CheckpointError("not an NVlabs network record")
    out: dict[str, np.ndarray] = {}
    _visit_module(record, "", out, _KeyBudget("NVlabs network record"), 0)
    return out


def _module_state(rec, prefix: str) -> dict:
    state = rec.get("state") if isinstance(rec, PersistentRecord) else rec
    if not isinstance(state, dict):
        raise CheckpointError(f"NVlabs record {_clean(prefix or '<root>', 120)} has no state dict")
    return state


def _named_items(state: dict, field: str, prefix: str):
    value = state.get(field) or {}
    if not isinstance(value, dict):
        raise CheckpointError(f"NVlabs record {_clean(prefix or '<root>', 120)}: {field} is a "
                              f"{type(value).__name__}, not a dict")
    for name, item in value.items():
        if not isinstance(name, str):
            raise CheckpointError(f"NVlabs record {_clean(prefix or '<root>', 120)}: "
                                  f"{field} key {_name(name)} is not a string")
        if item is not None:
            yield name, item


def _visit_module(rec, prefix: str, out: dict, budget: _KeyBudget, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise CheckpointError(f"NVlabs modules nested deeper than {MAX_DEPTH} levels")
    state = _module_state(rec, prefix)
    skip = state.get("_non_persistent_buffers_set") or ()
    if not isinstance(skip, (set, frozenset, list, tuple)):
        raise CheckpointError(f"NVlabs record {_clean(prefix or '<root>', 120)}: bad buffer set")
    tensors = list(_named_items(state, "_parameters", prefix))
    tensors += [(n, v) for n, v in _named_items(state, "_buffers", prefix) if n not in skip]
    for name, value in tensors:
        if not isinstance(value, (np.ndarray, np.generic)):
            raise CheckpointError(f"NVlabs tensor '{_clean(prefix + name, 120)}' is a "
                                  f"{type(value).__name__}, not an array")
        budget.spend(prefix + name)
        out[prefix + name] = value
    for name, child in _named_items(state, "_modules", prefix):
        if not isinstance(child, dict):
            raise CheckpointError(f"NVlabs module '{_clean(prefix + name, 120)}' is a "
                                  f"{type(child).__name__}, not a record")
        _visit_module(child, f"{prefix}{name}.", out, budget, depth + 1)


def flatten_state_dict(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts of arrays -> {'a.b.c': array}; non-array leaves are dropped."""
    out: dict[str, np.ndarray] = {}
    _flatten(tree, prefix, out, _KeyBudget("state dict"), 0)
    return out


def _flatten(tree: Any, prefix: str, out: dict, budget: _KeyBudget, depth: int) -> None:
    budget.spend(prefix)  # every node, dropped leaves too: a shared subtree repeats them all
    if isinstance(tree, np.ndarray):
        out[prefix[:-1]] = tree
    elif isinstance(tree, dict):
        if depth >= MAX_DEPTH:
            raise CheckpointError(f"state dict nested deeper than {MAX_DEPTH} levels")
        for k, v in tree.items():
            _flatten(v, f"{prefix}{k}.", out, budget, depth + 1)
