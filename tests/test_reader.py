"""The torch-free checkpoint reader: every format, exact values, and refusal of code."""

import io
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

from ports.reader import CheckpointError, PersistentRecord, nvlabs_state_dict, read_checkpoint
from tests.helpers import fixture


class _Call:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


class _Writer(pickle.Pickler):
    """Writes torch-style pickles by hand: globals by name, storages as persistent ids."""

    def __init__(self, f, persistent):
        super().__init__(f, protocol=2)
        self._persistent = persistent

    def persistent_id(self, obj):
        return self._persistent(obj)


def _global(module, name):
    # A function object whose pickled reference is module.name.
    fn = lambda *a: None  # noqa: E731
    fn.__module__, fn.__qualname__, fn.__name__ = module, name, name
    return fn


class _StorageRef:
    def __init__(self, key, dtype_name, numel):
        self.key, self.dtype_name, self.numel = key, dtype_name, numel


def _register(fn):
    import sys
    import types
    for name in (fn.__module__, *_parents(fn.__module__)):
        if name not in sys.modules:
            _ADDED.append(name)
    mod = sys.modules.setdefault(fn.__module__, types.ModuleType(fn.__module__))
    _REPLACED.append((mod, fn.__name__, getattr(mod, fn.__name__, _MISSING)))
    setattr(mod, fn.__name__, fn)
    parent, _, child = fn.__module__.rpartition(".")
    while parent:
        pm = sys.modules.setdefault(parent, types.ModuleType(parent))
        setattr(pm, child, sys.modules[f"{parent}.{child}"])
        parent, _, child = parent.rpartition(".")
    return fn


def _parents(module: str):
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


_ADDED: list[str] = []  # fake modules this test module put into sys.modules
_REPLACED: list = []  # (module, name, previous value) of every attribute it set
_MISSING = object()


@pytest.fixture(scope="module", autouse=True)
def _remove_fake_modules():
    """A fake `torch` left in sys.modules would fool later `import torch` checks in the same
    worker (tensorboardX's, for one), and a replaced numpy function would break later pickles."""
    import sys

    yield
    for mod, name, old in reversed(_REPLACED):
        if old is _MISSING:
            delattr(mod, name)
        else:
            setattr(mod, name, old)
    for name in _ADDED:
        sys.modules.pop(name, None)
    _ADDED.clear()
    _REPLACED.clear()


@pytest.fixture(scope="module")
def torch_globals():
    """Stand-ins registered under torch's names so pickle can write references to them."""
    return {
        "rebuild": _register(_global("torch._utils", "_rebuild_tensor_v2")),
        "FloatStorage": _register(_global("torch", "FloatStorage")),
        "HalfStorage": _register(_global("torch", "HalfStorage")),
    }


def _tensor(g, ref, offset, size, stride):
    from collections import OrderedDict
    return _Call(g["rebuild"], (ref, offset, size, stride, False, OrderedDict()))


def _write_zip(path, obj, storages, torch_globals):
    buf = io.BytesIO()

    def pid(o):
        if isinstance(o, _StorageRef):
            return ("storage", torch_globals[o.dtype_name], o.key, "cpu", o.numel)
        return None

    _Writer(buf, pid).dump(obj)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        for key, arr in storages.items():
            z.writestr(f"archive/data/{key}", arr.tobytes())


def test_zip_format_values_strides_and_dtypes(tmp_path, torch_globals):
    base = np.arange(12, dtype=np.float32)
    half = np.array([0.5, -2.0, 3.25], np.float16)
    g = torch_globals
    obj = {
        "plain": _tensor(g, _StorageRef("0", "FloatStorage", 12), 0, (3, 4), (4, 1)),
        # A transposed view with an offset: elements base[1 + 4*j + i] for [i, j].
        "view": _tensor(g, _StorageRef("0", "FloatStorage", 12), 1, (2, 2), (1, 4)),
        "half": _tensor(g, _StorageRef("1", "HalfStorage", 3), 0, (3,), (1,)),
    }
    path = tmp_path / "ckpt.pt"
    _write_zip(path, obj, {"0": base, "1": half}, g)
    out = read_checkpoint(path)
    np.testing.assert_array_equal(out["plain"], base.reshape(3, 4))
    np.testing.assert_array_equal(out["view"], np.array([[1, 5], [2, 6]], np.float32))
    assert out["half"].dtype == np.float16
    np.testing.assert_array_equal(out["half"], half)


def _write_legacy(path, obj, storages, torch_globals, truncate=0):
    buf = io.BytesIO()
    plain = lambda o: None  # noqa: E731
    _Writer(buf, plain).dump(0x1950A86A20F9469CFC6C)
    _Writer(buf, plain).dump(1001)
    _Writer(buf, plain).dump({"protocol_version": 1001, "little_endian": True})

    def pid(o):
        if isinstance(o, _StorageRef):
            return ("storage", torch_globals[o.dtype_name], o.key, "cpu", o.numel, None)
        return None

    _Writer(buf, pid).dump(obj)
    _Writer(buf, plain).dump(list(storages))
    for arr in storages.values():
        buf.write(struct.pack("<q", arr.size))
        buf.write(arr.tobytes())
    data = buf.getvalue()
    path.write_bytes(data[:len(data) - truncate])


def test_legacy_format_values(tmp_path, torch_globals):
    w = np.linspace(-1, 1, 6, dtype=np.float32)
    obj = {"conv1.weight": _tensor(torch_globals, _StorageRef("k0", "FloatStorage", 6), 0, (2, 3), (3, 1))}
    path = tmp_path / "legacy.pt"
    _write_legacy(path, obj, {"k0": w}, torch_globals)
    np.testing.assert_array_equal(read_checkpoint(path)["conv1.weight"], w.reshape(2, 3))
    # The same file cut short is a clear error, not garbage.
    _write_legacy(path, obj, {"k0": w}, torch_globals, truncate=5)
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(path)


def test_real_legacy_file_reads():
    """The released LPIPS v0.1 lin weights are a real legacy-format (pre-1.6) file: five 1x1
    convs over AlexNet's channel counts, non-negative by construction of LPIPS training."""
    state = read_checkpoint(fixture("lpips_weights/v0.1/alex.pth"))
    assert [state[f"lin{i}.model.1.weight"].shape for i in range(5)] == [
        (1, c, 1, 1) for c in (64, 192, 384, 256, 256)]
    assert all((state[f"lin{i}.model.1.weight"] >= 0).all() for i in range(5))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ifadit_jax_pwned",))


def test_code_in_pickle_is_refused_and_not_run(tmp_path):
    marker = "/tmp/ifadit_jax_pwned"
    if os.path.exists(marker):
        os.unlink(marker)
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G_ema": _Evil()}, protocol=4))
    with pytest.raises(CheckpointError, match=r"refusing to load global '(posix|os)\.system'"):
        read_checkpoint(path)
    assert not os.path.exists(marker)
    # The same payload inside a zip checkpoint.
    zpath = tmp_path / "evil.pt"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": _Evil()}, protocol=2))
    with pytest.raises(CheckpointError, match="refusing to load global"):
        read_checkpoint(zpath)
    assert not os.path.exists(marker)


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        read_checkpoint(p)
    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint(tmp_path / "missing.pt")
    # A FIFO would block a reader forever; a folder is no file either.
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    for path in (fifo, tmp_path):
        with pytest.raises(CheckpointError, match="not a regular file"):
            read_checkpoint(path)


def test_truncated_zip(tmp_path):
    data = fixture("rosinality_sg2_256.pt").read_bytes()
    p = tmp_path / "cut.pt"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        read_checkpoint(p)


def _nvlabs_scalar_pickle(numpy_module: str) -> bytes:
    """A persistence record holding a numpy float64 scalar, referenced through numpy 1's or
    numpy 2's module path, as NVlabs pickles written under either do."""
    scalar = _register(_global(numpy_module, "scalar"))
    recon = _register(_global("torch_utils.persistence", "_reconstruct_persistent_obj"))
    dtype = np.dtype("f8")
    meta = {"type": "class", "version": 6, "module_src": "import os\nos.system('boom')\n",
            "class_name": "training.networks.Thing",
            "state": {"act_gain": _Call(scalar, (dtype, np.float64(1.5).tobytes())),
                      "_parameters": {}, "_buffers": {}, "_modules": {}}}
    return pickle.dumps({"G_ema": _Call(recon, (meta,))}, protocol=4)


@pytest.mark.parametrize("numpy_module", ["numpy.core.multiarray", "numpy._core.multiarray"])
def test_nvlabs_numpy_scalar_paths(tmp_path, numpy_module):
    p = tmp_path / "net.pkl"
    p.write_bytes(_nvlabs_scalar_pickle(numpy_module))
    rec = read_checkpoint(p)["G_ema"]
    assert isinstance(rec, PersistentRecord)
    assert rec["state"]["act_gain"] == 1.5
    assert "os.system" in rec["module_src"]  # kept as inert text


def test_nvlabs_pickle_flattens_like_state_dict():
    ckpt = read_checkpoint(fixture("ada_network_snapshot_256.pkl"))
    sd = nvlabs_state_dict(ckpt["G_ema"])
    # torch's state_dict order: a module's parameters, then its buffers, then its children.
    keys = list(sd)
    assert keys[:3] == ["synthesis.b4.const", "synthesis.b4.resample_filter", "synthesis.b4.conv1.weight"]
    assert keys[-1] == "mapping.fc7.bias" and "mapping.w_avg" in keys
    assert sd["synthesis.b4.conv1.noise_const"].shape == (4, 4)
    assert len(sd) == 144
    # G and G_ema differ (the training copy was perturbed); both are readable.
    g = nvlabs_state_dict(ckpt["G"])
    assert not np.array_equal(g["synthesis.b4.conv1.weight"], sd["synthesis.b4.conv1.weight"])


# ---- Hostile files (issue 12): each class is built here, byte by byte where it must be. ----

P2 = b"\x80\x02"  # protocol 2 header of a hand-written pickle


def _zip_raw(path, pkl: bytes, storages=None, compress=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        for key, raw in (storages or {}).items():
            z.writestr(f"archive/data/{key}", raw, compress_type=compress)


def _rewrite_zip(src, dst, replace):
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for info in a.infolist():
            b.writestr(info.filename, replace.get(info.filename, a.read(info.filename)))


def _one_view(tmp_path, g, offset, size, stride, numel=12):
    path = tmp_path / "view.pt"
    obj = {"w_avg": _tensor(g, _StorageRef("0", "FloatStorage", numel), offset, size, stride)}
    _write_zip(path, obj, {"0": np.arange(numel, dtype=np.float32)}, g)
    return path


@pytest.mark.parametrize("offset,size,stride,match", [
    (0, (12,), (-1,), "stride must be an integer in"),    # backwards from element 0: the heap
    (11, (12,), (-1,), "stride must be an integer in"),   # backwards but inside: still refused
    (0, (4,), (-2 ** 40,), "stride must be an integer in"),  # was a segfault
    (-1, (2,), (1,), "offset must be an integer in"),
    (0, (13,), (1,), "reaches element 12 of storage '0', which holds 12"),
    (12, (), (), "reaches element 12"),
    (0, (3, 5), (4, 1), "reaches element 12"),           # last = 2*4 + 4*1
    (2 ** 70, (1,), (1,), "reaches element"),
    (0, (2, 2, 2), (4, 1), "3 sizes but 2 strides"),
    (0, (1.5,), (1,), "size must be an integer in"),
    ("0", (2,), (1,), "offset must be an integer in"),
    (0, (2,) * 40, (0,) * 40, "at most 32 integers"),
])
def test_views_outside_their_storage_are_refused(tmp_path, torch_globals, offset, size, stride, match):
    path = _one_view(tmp_path, torch_globals, offset, size, stride)
    with pytest.raises(CheckpointError, match=match) as err:
        read_checkpoint(path)
    assert str(path) in str(err.value) and "'w_avg'" in str(err.value)


def test_views_that_stay_inside_read_exactly(tmp_path, torch_globals):
    # Extent-1 dims may carry any stride (torch writes whatever it had); a zero-size tensor
    # needs no storage; the last element of the storage is reachable.
    path = _one_view(tmp_path, torch_globals, 11, (1, 1), (2 ** 39, 7))
    np.testing.assert_array_equal(read_checkpoint(path)["w_avg"], [[11.0]])
    path = _one_view(tmp_path, torch_globals, 12, (0, 5), (5, 1))
    assert read_checkpoint(path)["w_avg"].shape == (0, 5)
    path = _one_view(tmp_path, torch_globals, 3, (3, 3), (3, 1))
    np.testing.assert_array_equal(read_checkpoint(path)["w_avg"], np.arange(3, 12).reshape(3, 3))


def test_storage_size_must_match_its_record(tmp_path, torch_globals):
    g = torch_globals
    path = tmp_path / "short.pt"
    # The header announces 13 floats; the record holds 12 (48 bytes).
    _write_zip(path, {"w": _tensor(g, _StorageRef("0", "FloatStorage", 13), 0, (12,), (1,))},
               {"0": np.zeros(12, np.float32)}, g)
    with pytest.raises(CheckpointError, match="storage '0' holds 48 bytes, its header announces 13"):
        read_checkpoint(path)
    # Legacy: the element count before the raw bytes disagrees with the pickled one.
    legacy = tmp_path / "legacy.pt"
    obj = {"w": _tensor(g, _StorageRef("k0", "FloatStorage", 5), 0, (5,), (1,))}
    _write_legacy(legacy, obj, {"k0": np.zeros(6, np.float32)}, g)
    with pytest.raises(CheckpointError, match="storage 'k0' holds 6 elements, its header announces 5"):
        read_checkpoint(legacy)


def test_stride_zero_expansion_is_bounded_by_the_bytes_in_the_file(tmp_path, torch_globals):
    # One float expanded to 2^30 elements (4 GiB) by stride 0: refused before allocating.
    path = _one_view(tmp_path, torch_globals, 0, (2 ** 15, 2 ** 15), (0, 0), numel=1)
    with pytest.raises(CheckpointError, match=r"'w_avg' would allocate 4294967296 bytes"):
        read_checkpoint(path)
    # A small broadcast (within the 16 MiB slack) is a legitimate tensor.
    path = _one_view(tmp_path, torch_globals, 0, (4, 3), (0, 1), numel=3)
    np.testing.assert_array_equal(read_checkpoint(path)["w_avg"], np.tile(np.arange(3.0), (4, 1)))


def test_many_views_of_one_storage_share_one_budget(tmp_path, torch_globals):
    g = torch_globals
    n = 2 ** 18  # 1 MiB of float32; 20 separate full views would copy 20 MiB
    path = tmp_path / "views.pt"
    obj = {f"w{i}": _tensor(g, _StorageRef("0", "FloatStorage", n), 0, (n,), (1,)) for i in range(20)}
    _write_zip(path, obj, {"0": np.zeros(n, np.float32)}, g)
    with pytest.raises(CheckpointError, match="more than the file's storages hold"):
        read_checkpoint(path)
    # One tensor referenced twice (tied weights) is copied once and shared.
    one = _tensor(g, _StorageRef("0", "FloatStorage", n), 0, (n,), (1,))
    _write_zip(path, {f"w{i}": one for i in range(20)}, {"0": np.zeros(n, np.float32)}, g)
    out = read_checkpoint(path)
    assert out["w0"] is out["w19"] and out["w0"].shape == (n,)


def test_zip_bomb_is_refused_before_inflating(tmp_path, monkeypatch):
    path = tmp_path / "bomb.pt"
    pkl = (P2 + b"ctorch._utils\n_rebuild_tensor_v2\n(X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
           b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuJ\x00\x00\x00\x02tQK\x00J\x00\x00\x00\x02\x85K\x01"
           b"\x85\x89}tR.")
    _zip_raw(path, pkl, {"0": bytes(2 ** 25)}, compress=zipfile.ZIP_DEFLATED)  # 32 MiB -> 32 KiB
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open",
                        lambda self, name, *a, **k: opened.append(getattr(name, "filename", name))
                        or real_open(self, name, *a, **k))
    with pytest.raises(CheckpointError, match=r"'archive/data/0' would inflate more than 4x"):
        read_checkpoint(path)
    assert "archive/data/0" not in opened


@pytest.mark.parametrize("pkl,match", [
    (P2 + b"K\x01r\x00\x00\x00\x10.", "memo index 268435456 larger than the pickle"),
    (P2 + b"h\x05.", "memo index 5 read before it is written"),
    (P2 + b"K\x01\x82\x01.", "opcode EXT1 refused"),
    # Object count: 500,001 empty sets (each weighs 4 opcodes) pass the 2,000,000-opcode cap.
    (b"\x80\x04" + b"\x8f" * 500_001 + b".", "more than 2000000 opcodes"),
    (P2 + b"\xff.", "unreadable or truncated checkpoint"),
    (P2 + b"K\x01", "unreadable or truncated checkpoint"),
])
def test_hostile_pickle_opcodes(tmp_path, pkl, match):
    path = tmp_path / "ops.pkl"
    path.write_bytes(pkl)
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(path)


@pytest.mark.timeout(120)
def test_billion_laughs_stays_linear(tmp_path):
    # Level i is [level i-1, level i-1]: 2^40 leaves if every reference were copied.
    ops = [P2, b"K\x01q\x00"]
    for i in range(1, 41):
        ops.append(b"(h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"lq" + bytes([i]))
    path = tmp_path / "laughs.pkl"
    path.write_bytes(b"".join(ops) + b".")
    out = read_checkpoint(path)
    assert out[0] is out[1]
    node = out
    for _ in range(39):
        node = node[0]
    assert node == [1, 1]


@pytest.mark.timeout(120)
def test_shared_subtrees_cannot_blow_up_the_key_walks():
    leaf = {"x" * 4096: np.zeros(1, np.float32)}
    tree, record = leaf, PersistentRecord(state={"_parameters": {"p" * 4096: np.zeros(1)}})
    for _ in range(40):
        tree = {"a": tree, "b": tree}
        record = PersistentRecord(state={"_modules": {"a": record, "b": record}})
    with pytest.raises(CheckpointError, match="characters of keys"):
        from ports.reader import flatten_state_dict
        flatten_state_dict(tree)
    with pytest.raises(CheckpointError, match="characters of keys"):
        nvlabs_state_dict(record)


@pytest.mark.parametrize("pkl,match", [
    (P2 + b"]" * 100_000 + b"a" * 99_999 + b".", "nested deeper than 64 levels"),
    (P2 + b"}K\x00" + b"\x85" * 100_000 + b"K\x01s.", "dict or set key of type tuple refused"),
    (P2 + b"]q\x00h\x00a.", "contains itself"),
    (P2 + b"}q\x00X\x01\x00\x00\x00ah\x00s.", "contains itself"),
    (P2 + b"c_codecs\nencode\nX\x03\x00\x00\x00abcX\x0a\x00\x00\x00no-such-cd\x86R.",
     "codec 'no-such-cd' refused"),
    (P2 + b"c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R.", "codec 'rot13'"),
    (P2 + b"ctorch\nFloatStorage\n)\x81.", "NEWOBJ of a _StorageType refused"),
    (P2 + b"ctorch._utils\n_rebuild_parameter\nK\x01\x85R.", "instead of a tensor"),
    (P2 + b"cnumpy\ndtype\nX\x01\x00\x00\x00O\x85R.", "numpy dtype 'O' refused"),
    (P2 + b"ctorch\nFloatStorage\n.", "unexpected _StorageType at the top level"),
    (P2 + b"ctorch_utils.persistence\n_reconstruct_persistent_obj\nK\x01\x85R.",
     "NVlabs record built from a 1"),
    (P2 + b"ctorch_utils.persistence\n_reconstruct_persistent_obj\n}X\x04\x00\x00\x00typeK\x01s\x85R.",
     "NVlabs record at the top level has no state dict"),
])
def test_hostile_structures_are_one_checkpoint_error(tmp_path, pkl, match):
    path = tmp_path / "hostile.pkl"
    path.write_bytes(pkl)
    with pytest.raises(CheckpointError, match=match) as err:
        read_checkpoint(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_wrong_types_in_tensor_rebuild(tmp_path, torch_globals):
    path = tmp_path / "types.pt"
    g = torch_globals
    _write_zip(path, {"k": _Call(g["rebuild"], ("not a storage", 0, (1,), (1,), False, {}))}, {}, g)
    with pytest.raises(CheckpointError, match="'k' is rebuilt from a 'not a storage' instead"):
        read_checkpoint(path)


def test_nvlabs_records_of_the_wrong_shape(tmp_path):
    with pytest.raises(CheckpointError, match="not an NVlabs network record"):
        nvlabs_state_dict(PersistentRecord(type="class"))
    with pytest.raises(CheckpointError, match="has no state dict"):
        nvlabs_state_dict(PersistentRecord(state={"_modules": {"m": PersistentRecord(type="x")}}))
    with pytest.raises(CheckpointError, match="_modules is a list"):
        nvlabs_state_dict(PersistentRecord(state={"_modules": [1]}))
    with pytest.raises(CheckpointError, match="'w' is a str, not an array"):
        nvlabs_state_dict(PersistentRecord(state={"_parameters": {"w": "zzz"}}))


def _mapper_with_storage_build(tmp_path):
    """The issue's example: one BUILD on the shared storage-type stand-in (this file's tensors
    are float16), giving it a big-endian dtype."""
    src = fixture("ifadit_mlp_latent_mapper.pth")
    with zipfile.ZipFile(src) as z:
        name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        pkl = z.read(name)
    glob_op = b"ctorch\nHalfStorage\n"
    assert glob_op in pkl
    build = b"}X\x05\x00\x00\x00dtypeX\x03\x00\x00\x00>f2sb"
    hostile = tmp_path / "hostile.pth"
    _rewrite_zip(src, hostile, {name: pkl.replace(glob_op, glob_op + build, 1)})
    return hostile


def test_no_state_carried_from_a_hostile_file_to_the_next(tmp_path):
    good = fixture("ifadit_mlp_latent_mapper.pth")
    alone = read_checkpoint(good)
    with pytest.raises(CheckpointError, match="BUILD on a _StorageType refused"):
        read_checkpoint(_mapper_with_storage_build(tmp_path))
    # numpy's dtype singletons are not touched either (numpy pickles a dtype with BUILD).
    dtype_pkl = tmp_path / "dtype.pkl"
    dtype_pkl.write_bytes(pickle.dumps(np.dtype(">f8"), protocol=2))
    with pytest.raises(CheckpointError, match="numpy dtype state refused"):
        read_checkpoint(dtype_pkl)
    assert np.dtype("f8").byteorder == "=" and np.dtype("f4").byteorder == "="
    after = read_checkpoint(good)
    assert list(after) == list(alone)
    for key in alone:
        assert after[key].dtype == alone[key].dtype == np.float16
        assert after[key].tobytes() == alone[key].tobytes()


def test_recompressed_zip_reads_exactly(tmp_path):
    """A real checkpoint re-zipped with deflate (torch stores members) is within the ratio caps."""
    src = fixture("ifadit_icl_fusion_mapper10.pth")
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(tmp_path / "re.pth", "w", zipfile.ZIP_DEFLATED) as b:
        for info in a.infolist():
            b.writestr(info.filename, a.read(info.filename))
    want, got = read_checkpoint(src), read_checkpoint(tmp_path / "re.pth")
    assert list(got) == list(want) and len(want) == 8
    assert all(got[k].tobytes() == want[k].tobytes() for k in want)


def test_one_embedded_storage_blob_counts_once_in_the_budget(tmp_path, torch_globals):
    """NVlabs pickles embed each storage as a legacy blob; referencing one blob 20 times must
    not make its bytes count 20 times in the allocation budget."""
    g = torch_globals
    n = 2 ** 18  # 1 MiB of float32
    blob_path = tmp_path / "blob"
    _write_legacy(blob_path, _StorageRef("k0", "FloatStorage", n), {"k0": np.ones(n, np.float32)}, g)
    blob = blob_path.read_bytes()
    load = _register(_global("torch.storage", "_load_from_bytes"))
    path = tmp_path / "net.pkl"

    def dump(count):
        views = {f"w{i}": _Call(g["rebuild"], (_Call(load, (blob,)), 0, (n,), (1,), False, {}))
                 for i in range(count)}
        path.write_bytes(pickle.dumps(views, protocol=4))

    dump(2)
    out = read_checkpoint(path)
    assert out["w1"].shape == (n,) and (out["w1"] == 1).all()
    dump(20)
    with pytest.raises(CheckpointError, match="more than the file's storages hold"):
        read_checkpoint(path)
