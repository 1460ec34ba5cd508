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
    mod = sys.modules.setdefault(fn.__module__, types.ModuleType(fn.__module__))
    setattr(mod, fn.__name__, fn)
    parent, _, child = fn.__module__.rpartition(".")
    while parent:
        pm = sys.modules.setdefault(parent, types.ModuleType(parent))
        setattr(pm, child, sys.modules[f"{parent}.{child}"])
        parent, _, child = parent.rpartition(".")
    return fn


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
