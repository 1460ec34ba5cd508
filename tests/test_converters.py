"""Every converter through its real command line: the shared API, OUT handling (--force) and
hostile checkpoints (issue 12), each ending in one `error:` line with the README's exit code."""

import hashlib
import os
import struct
import zipfile

import numpy as np
import pytest

from ifadit_jax import weights
from ifadit_jax.errors import InputError, WeightsError
from ports import common
from tests.helpers import fixture, run_cli


class Tensor:
    def __init__(self, arr):
        self.arr = np.ascontiguousarray(arr, np.float32)


class Raw(bytes):
    """Pickle opcodes written as they are."""


class Global:
    def __init__(self, module, name):
        self.module, self.name = module, name


class Call:
    """A pickled call of an importable global (never executed by our reader's allow-list)."""

    def __init__(self, module, name, *args):
        self.module, self.name, self.args = module, name, args


def _emit(obj, storages) -> bytes:
    """Pickle opcodes (protocol 2) for dicts, lists, tuples, str, int, bool, None and Tensors, the
    way torch.save writes them: tensors as _rebuild_tensor_v2 of a persistent storage."""
    if isinstance(obj, Raw):
        return bytes(obj)
    if isinstance(obj, Tensor):
        key = str(len(storages))
        storages[key] = obj.arr
        strides = tuple(s // 4 for s in obj.arr.strides)
        storage = _emit(("storage", Global("torch", "FloatStorage"), key, "cpu", obj.arr.size),
                        storages) + b"Q"  # BINPERSID: the reader's persistent_load
        rest = (0, obj.arr.shape, strides, False, Call("collections", "OrderedDict"))
        return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage
                + b"".join(_emit(a, storages) for a in rest) + b"tR")
    if isinstance(obj, Global):
        return f"c{obj.module}\n{obj.name}\n".encode()
    if isinstance(obj, Call):
        glob = f"c{obj.module}\n{obj.name}\n".encode()
        return glob + b"(" + b"".join(_emit(a, storages) for a in obj.args) + b"tR"
    if isinstance(obj, dict):
        return b"}(" + b"".join(_emit(k, storages) + _emit(v, storages) for k, v in obj.items()) + b"u"
    if isinstance(obj, list):
        return b"](" + b"".join(_emit(v, storages) for v in obj) + b"e"
    if isinstance(obj, tuple):
        return b"(" + b"".join(_emit(v, storages) for v in obj) + b"t"
    if isinstance(obj, bool):
        return b"\x88" if obj else b"\x89"
    if isinstance(obj, int):
        return b"J" + struct.pack("<i", obj)
    if isinstance(obj, str):
        data = obj.encode("utf-8")
        return b"X" + struct.pack("<I", len(data)) + data
    if obj is None:
        return b"N"
    raise TypeError(type(obj))


def save_pt(path, tree):
    """A torch >= 1.6 zip checkpoint of `tree`, written without torch."""
    storages = {}
    data = b"\x80\x02" + _emit(tree, storages) + b"."
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data)
        z.writestr("archive/byteorder", "little")
        for key, arr in storages.items():
            z.writestr(f"archive/data/{key}", arr.tobytes())
    return path


def test_pickle_writer_round_trips_through_the_reader(tmp_path):
    from ports.reader import read_checkpoint

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    tree = read_checkpoint(save_pt(tmp_path / "x.pt", {"a": Tensor(a), "n": 3, "s": [True, "x"]}))
    np.testing.assert_array_equal(tree["a"], a)
    assert tree["n"] == 3 and tree["s"] == [True, "x"]


def _one_error_line(proc, code, *words):
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------ the API


def test_converters_are_plain_functions_and_release_calls_them():
    import inspect

    from ports import (convert_adaface, convert_arcface, convert_bisenet, convert_inception,
                       convert_lpips, convert_mobilefacenet, convert_mtcnn, convert_psp,
                       convert_stylegan2, ifadit, release)

    for fn in (convert_adaface.convert, convert_arcface.convert, convert_bisenet.convert,
               convert_inception.convert, convert_lpips.convert, convert_mobilefacenet.convert,
               convert_mtcnn.convert, convert_psp.convert, convert_stylegan2.convert,
               ifadit.convert_inn, ifadit.convert_mapper, ifadit.convert_icl):
        first = next(iter(inspect.signature(fn).parameters))
        assert first in ("src", "trunk", "src_dir"), fn
    assert set(release.CONVERTERS.values()) >= {ifadit.convert_inn, convert_stylegan2.convert}
    source = inspect.getsource(release)
    assert "Namespace(" not in source


def test_no_import_cycle_under_ports():
    """Each ports module imports only modules that do not import it back (directly or not)."""
    import ast
    from pathlib import Path

    folder = Path(common.__file__).parent
    graph = {}
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "ports":
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ports."):
                names.add(node.module.split(".")[1])
        graph[path.stem] = names

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, (*seen, n)))
                   for n in graph.get(start, ()))

    assert graph["release"] and "convert_ifadit" not in graph["release"]
    assert not [m for m in graph if reaches(m, m)]


@pytest.mark.parametrize("value, ok", [(4096, True), (4097, False), (0, False), (-1, False)])
def test_limits_table(value, ok):
    if ok:
        common.check_config({"features": [value]}, "x")
    else:
        with pytest.raises(WeightsError, match="outside the supported range"):
            common.check_config({"features": [value]}, "x")
    with pytest.raises(WeightsError, match="resolution = 2048"):
        common.check_config({"resolution": 2048}, "x")
    with pytest.raises(WeightsError, match="n_blocks = 65"):
        common.check_config({"n_blocks": 65}, "x")


# ------------------------------------------------------------------------------ OUT and --force

SINGLE = [
    ("convert_ifadit.py", "mapper", "ifadit_mlp_latent_mapper.pth"),
    ("convert_stylegan2.py", None, "rosinality_sg2_256.pt"),
    ("convert_arcface.py", None, "arcface_ir_se50.pth"),
    ("convert_psp.py", None, "psp_ffhq_encode_256.pt"),
    ("convert_bisenet.py", None, "bisenet_faceparsing.pth"),
    ("convert_mobilefacenet.py", None, "mobilefacenet_model_best.pth.tar"),
    ("convert_adaface.py", None, "adaface_ir50_random.ckpt"),
    ("convert_inception.py", None, "pt_inception_fid_random_div4.pth"),
    ("convert_mtcnn.py", None, "mtcnn_weights"),
]


def _argv(script, command, src):
    return [f"ports/{script}", *([command] if command else []), str(fixture(src))]


@pytest.mark.parametrize("script, command, src", SINGLE)
def test_every_converter_refuses_an_existing_out_without_force(tmp_path, script, command, src):
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"precious")
    _one_error_line(run_cli(*_argv(script, command, src), str(out), check=False),
                    InputError.exit_code, "use --force")
    # --force does not make it replaceable: it is not a file this tool converted.
    _one_error_line(run_cli(*_argv(script, command, src), str(out), "--force", check=False),
                    InputError.exit_code, "not a file this tool converted")
    assert out.read_bytes() == b"precious"


def test_a_killed_conversions_temporary_is_removed_by_the_next(tmp_path):
    dead = run_cli("-c", "import os; print(os.getpid())").stdout.strip()
    stale = tmp_path / f".tmp-ifadit-{dead}-abc.safetensors"
    stale.write_bytes(b"partial")
    run_cli("ports/convert_ifadit.py", "icl", str(fixture("ifadit_icl_fusion_mapper10.pth")),
            str(tmp_path / "icl.safetensors"))
    assert sorted(os.listdir(tmp_path)) == ["icl.safetensors"]


def test_lpips_refuses_an_existing_out_and_its_inputs(tmp_path):
    args = ["ports/convert_lpips.py", "--net", "alex", "--trunk",
            str(fixture("lpips_alex_trunk_torchvision.pth")), "--lin",
            str(fixture("lpips_weights/v0.1/alex.pth"))]
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"precious")
    _one_error_line(run_cli(*args, str(out), check=False), InputError.exit_code, "use --force")
    lin = tmp_path / "lin.pth"
    os.symlink(fixture("lpips_weights/v0.1/alex.pth"), lin)
    _one_error_line(run_cli(*args, str(lin), "--force", check=False), InputError.exit_code,
                    "is an input")
    assert out.read_bytes() == b"precious"


def test_force_replaces_only_a_converted_file_and_never_src_or_a_folder(tmp_path):
    argv = _argv("convert_ifadit.py", "mapper", "ifadit_mlp_latent_mapper.pth")
    out = tmp_path / "m.safetensors"
    run_cli(*argv, str(out))
    first, inode = weights.flatten(weights.read(out)[0]), out.stat().st_ino
    run_cli(*argv, str(out), "--force")
    again = weights.flatten(weights.read(out)[0])
    assert common.is_converted_file(str(out)) and out.stat().st_ino != inode
    assert first.keys() == again.keys() and all(np.array_equal(first[k], again[k]) for k in first)
    # SRC reached through a symlink, and through its real path.
    src_copy = tmp_path / "mlp_best.pth"
    src_copy.write_bytes(fixture("ifadit_mlp_latent_mapper.pth").read_bytes())
    os.symlink(src_copy, tmp_path / "alias.safetensors")
    for target in (src_copy, tmp_path / "alias.safetensors"):
        proc = run_cli("ports/convert_ifadit.py", "mapper", str(src_copy), str(target), "--force",
                       check=False)
        _one_error_line(proc, InputError.exit_code, "is an input")
    assert src_copy.read_bytes() == fixture("ifadit_mlp_latent_mapper.pth").read_bytes()
    (tmp_path / "dir.safetensors").mkdir()
    _one_error_line(run_cli(*argv, str(tmp_path / "dir.safetensors"), "--force", check=False),
                    InputError.exit_code, "is a folder")
    # A symlink to a converted file is not replaced either (the link is not ours).
    os.symlink(out, tmp_path / "link.safetensors")
    _one_error_line(run_cli(*argv, str(tmp_path / "link.safetensors"), "--force", check=False),
                    InputError.exit_code, "not a file this tool converted")


def _tree_digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def release_copy(tmp_path):
    names = {"attr_best.pth": "ifadit_attr_best.pth", "mlp_best.pth": "ifadit_mlp_latent_mapper.pth",
             "G_net_15.pth": "ifadit_inn_G_net.pth", "fuse_mlp_15.pth": "ifadit_icl_fusion_mapper10.pth",
             "550000.pt": "ifadit_stylegan2_256_style512.pt", "model_ir_se50.pth": "ifadit_model_ir_se50.pth",
             "79999_iter.pth": "bisenet_faceparsing.pth"}
    src = tmp_path / "proj" / "official"
    src.mkdir(parents=True)
    for name, fixture_name in names.items():
        (src / name).write_bytes(fixture(fixture_name).read_bytes())
    return src


def test_release_never_replaces_its_source(release_copy, tmp_path):
    before = _tree_digest(release_copy)
    for out in (release_copy, release_copy.parent, release_copy / "weights"):
        proc = run_cli("ports/convert_ifadit.py", "release", str(release_copy), str(out), "--force",
                       check=False)
        _one_error_line(proc, InputError.exit_code, "the source")
    assert _tree_digest(release_copy) == before
    assert sorted(os.listdir(release_copy.parent)) == ["official"]
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"jpeg")
    proc = run_cli("ports/convert_ifadit.py", "release", str(release_copy), str(photos), "--force",
                   check=False)
    _one_error_line(proc, InputError.exit_code, "not a weights folder this tool wrote")
    assert os.listdir(photos) == ["a.jpg"]


# ------------------------------------------------------------------------------ hostile files


def _rosinality_levels(levels):
    """A few KB: a StyleGAN2 layout with `levels` upsampling levels of 1x1 kernels."""
    g = {"style.1.weight": Tensor(np.zeros((8, 8))), "input.input": Tensor(np.zeros((1, 4, 4, 4)))}
    for i in range(2 * levels):
        g[f"convs.{i}.conv.weight"] = Tensor(np.zeros((1, 4, 4, 1, 1)))
    return {"g_ema": g}


def _mapper(in_features):
    return {"fc0.weight": Tensor(np.zeros((1, in_features))), "fc0.bias": Tensor(np.zeros(1)),
            "fc1.weight": Tensor(np.zeros((2, 1))), "fc1.bias": Tensor(np.zeros(2))}


def _nvlabs(state):
    record = {"type": "class", "version": 4, "module_src": "", "class_name": "Generator"}
    if state is not None:
        record["state"] = state
    return {"G_ema": Call("torch_utils.persistence", "_reconstruct_persistent_obj", record)}


_SYNTH = {"state": {"block_resolutions": [4], "_modules": {"b4": {"state": {}}}}}
HOSTILE = {
    # 13 levels would ask the noise fallback for 32768^2 values.
    "13 levels": ("convert_stylegan2.py", _rosinality_levels(13), "resolution = 32768"),
    "mapper in_features": ("convert_ifadit.py mapper", _mapper(5000), "in_features = 5000"),
    "nvlabs without state": ("convert_stylegan2.py", _nvlabs(None), "state"),
    "nvlabs state not a dict": ("convert_stylegan2.py", _nvlabs([1, 2]), "state"),
    "nvlabs without tensors": ("convert_stylegan2.py",
                               _nvlabs({"_modules": {"synthesis": _SYNTH}, "img_resolution": 4,
                                        "z_dim": 8, "w_dim": 8, "img_channels": 3}), ""),
    "nvlabs huge resolution": ("convert_stylegan2.py",
                               _nvlabs({"_modules": {"synthesis": {"state": {
                                   "block_resolutions": list(range(4, 40)), "_modules": {}}}}}),
                               "block_resolutions"),
    "escape codes in names": ("convert_ifadit.py mapper", {"\x1b[2Jevil": Tensor(np.zeros((2, 2, 2)))},
                              "evil"),
    "not a dict": ("convert_bisenet.py", [Tensor(np.zeros(3))], "state dict"),
    "inn of strings": ("convert_ifadit.py inn", {"a": "b"}, "no tensors"),
    # 100,000 nested lists: RecursionError in whoever walks the tree.
    "deep nesting": ("convert_arcface.py", {"state_dict": Raw(b"(" * 100_000 + b"l" * 100_000)}, ""),
    "unknown codec": ("convert_bisenet.py", {"a": Call("_codecs", "encode", "x", "no-such-codec")}, ""),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_checkpoint_is_one_weights_error_line(tmp_path, case):
    script, tree, words = HOSTILE[case]
    src = save_pt(tmp_path / "evil.pt", tree)
    assert src.stat().st_size < 256_000  # small files, whatever they ask for
    out = tmp_path / "out.safetensors"
    script, *command = script.split()
    proc = run_cli(f"ports/{script}", *command, str(src), str(out), check=False)
    line = _one_error_line(proc, WeightsError.exit_code, *([words] if words else []))
    assert "\x1b" not in line
    assert sorted(os.listdir(tmp_path)) == ["evil.pt"]
