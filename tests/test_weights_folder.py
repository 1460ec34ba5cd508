"""Weights folders: the manifest schema, what --force may replace, and crash-safe replacement."""

import hashlib
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from ifadit_jax import weights_folder
from ifadit_jax.errors import InputError, WeightsError
from tests.helpers import ROOT

# Two roles, every tensor filled with one value, so a folder tells which write produced it.
_NETWORKS = '''
import numpy as np
from ifadit_jax import weights

def networks(value):
    return {role: (f"{role}.safetensors",
                   {"params": {"w": np.full((4, 3), value, np.float32)}},
                   weights.Meta(kind="icl", config={"n": 1}, source_file="src.pth"))
            for role in ("mapper", "icl")}
'''
namespace: dict = {}
exec(_NETWORKS, namespace)
networks = namespace["networks"]

# Child process: writes OUT with value VALUE and SIGKILLs itself at the KILL_AT-th step of the
# writer (0: never; it then prints how many steps there were). FALLBACK=1 disables the atomic
# exchange, as on a system without renameat2.
_CHILD = _NETWORKS + '''
import os, signal, sys
from ifadit_jax import weights_folder
out, kill_at, value, fallback = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
calls = []

def step(name):
    calls.append(name)
    if len(calls) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

weights_folder._step = step
if fallback == "1":
    weights_folder._exchange = lambda a, b: False
weights_folder.write(out, networks(value), "official", force=True)
print(len(calls))
'''


def _child(out, kill_at, value, fallback=False):
    return subprocess.run([sys.executable, "-c", _CHILD, str(out), str(kill_at), str(value),
                           "1" if fallback else "0"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def _n_steps(folder, replace, fallback=False):
    """How many steps a write has (run to the end in a child, without killing it)."""
    if replace:
        weights_folder.write(folder, networks(5.0), "official")
    proc = _child(folder, 0, 6.0, fallback)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip())


def _tensor(path):
    """The one tensor of a toy network file (read raw: the toy config is no real network's, so
    `weights.read`, which validates against the network's schema, would refuse it)."""
    from safetensors.numpy import load_file

    return load_file(str(path))["params/w"]


def _value_of(folder):
    """The one value every tensor of a complete folder holds."""
    assert weights_folder.is_own_folder(str(folder)), sorted(os.listdir(folder))
    manifest = weights_folder.read_manifest(folder)
    values = set()
    for entry in manifest["files"].values():
        values |= set(np.unique(_tensor(folder / entry["file"])).tolist())
    assert len(values) == 1, values
    return values.pop()


def test_manifest_records_each_file_and_its_sha256(tmp_path):
    out = tmp_path / "w"
    manifest = weights_folder.write(out, networks(1.0), "official")
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == weights_folder.FORMAT and manifest["conventions"] == "official"
    assert sorted(os.listdir(out)) == ["icl.safetensors", "manifest.json", "mapper.safetensors"]
    for role in ("mapper", "icl"):
        entry = manifest["files"][role]
        assert entry["file"] == f"{role}.safetensors" and entry["kind"] == "icl"
        assert entry["sha256"] == hashlib.sha256((out / entry["file"]).read_bytes()).hexdigest()
    assert len(manifest["weights_id"]) == 16 and int(manifest["weights_id"], 16) >= 0
    assert weights_folder.read_manifest(out) == manifest


def _good_manifest():
    entry = {"file": "icl.safetensors", "kind": "icl", "sha256": "0" * 64}
    return {"format": weights_folder.FORMAT, "conventions": "official",
            "weights_id": "0123456789abcdef", "files": {"icl": entry}}


def _with(path, value):
    """The good manifest with `value` set at `path` (a tuple of keys)."""
    manifest = _good_manifest()
    node = manifest
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return manifest


@pytest.mark.parametrize("manifest, message", [
    ([], "not a JSON object"),
    ({**_good_manifest(), "extra": 1}, "unknown field"),
    (_with(("format",), "ifadit-jax-weights/0"), "'format'"),
    (_with(("conventions",), "mine"), "'conventions'"),
    (_with(("weights_id",), "xyz"), "'weights_id'"),
    (_with(("weights_id",), "0123456789ABCDEF"), "'weights_id'"),
    (_with(("files",), {}), "'files'"),
    (_with(("files",), []), "'files'"),
    (_with(("files", "icl"), "icl.safetensors"), "not an object"),
    (_with(("files", "icl", "file"), "../icl.safetensors"), "not a plain"),
    (_with(("files", "icl", "file"), "sub/icl.safetensors"), "not a plain"),
    (_with(("files", "icl", "file"), "/etc/passwd"), "not a plain"),
    (_with(("files", "icl", "file"), "icl.pth"), "not a plain"),
    (_with(("files", "icl", "file"), 7), "not a plain"),
    (_with(("files", "icl", "sha256"), "abc"), "sha256"),
    (_with(("files", "icl", "kind"), None), "kind"),
    (_with(("files", "icl", "config"), [1]), "config"),
    (_with(("files", "icl", "more"), 1), "unknown field"),
    (_with(("files", "../x"), {"file": "x.safetensors", "kind": "icl", "sha256": "0" * 64}),
     "not a role name"),
    (_with(("files", "mapper"), {"file": "icl.safetensors", "kind": "icl", "sha256": "0" * 64}),
     "named by two roles"),
])
def test_bad_manifest_is_one_line(tmp_path, manifest, message):
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(WeightsError, match=message) as info:
        weights_folder.read_manifest(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content, message", [
    (b"{", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b"[" * 200_000 + b"]" * 200_000, "not valid JSON"),          # RecursionError in json
    (b" " * (weights_folder.MAX_MANIFEST_BYTES + 1), "more than a manifest may have"),
])
def test_unreadable_manifest_is_one_line(tmp_path, content, message):
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(WeightsError, match=message):
        weights_folder.read_manifest(tmp_path)


def test_manifest_that_is_a_fifo_or_folder_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "manifest.json")
    result = []
    reader = threading.Thread(target=lambda: result.append(_raises(tmp_path)), daemon=True)
    reader.start()
    reader.join(20)
    assert result == ["not a regular file"]
    os.unlink(tmp_path / "manifest.json")
    os.mkdir(tmp_path / "manifest.json")
    assert _raises(tmp_path) == "not a regular file"


def _raises(folder):
    try:
        weights_folder.read_manifest(folder)
    except WeightsError as e:
        return "not a regular file" if "not a regular file" in str(e) else str(e)
    return "no error"


def test_force_replaces_only_a_folder_this_tool_wrote(tmp_path):
    out = tmp_path / "w"
    weights_folder.write(out, networks(1.0), "official")
    with pytest.raises(InputError, match="output exists"):
        weights_folder.write(out, networks(2.0), "official")
    weights_folder.write(out, networks(2.0), "official", force=True)
    assert _value_of(out) == 2.0

    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="notes.txt"):
        weights_folder.write(out, networks(3.0), "official", force=True)
    assert (out / "notes.txt").read_text() == "mine" and _value_of_files(out) == 2.0

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "a.jpg").write_bytes(b"x")
    with pytest.raises(InputError, match="no manifest.json"):
        weights_folder.write(foreign, networks(3.0), "official", force=True)
    assert os.listdir(foreign) == ["a.jpg"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        weights_folder.write(tmp_path / "file", networks(3.0), "official", force=True)
    os.symlink(out, tmp_path / "link")
    with pytest.raises(InputError, match="not a folder"):
        weights_folder.write(tmp_path / "link", networks(3.0), "official", force=True)
    assert (tmp_path / "file").read_text() == "x"


def _value_of_files(folder):
    return float(np.unique(_tensor(folder / "icl.safetensors"))[0])


def test_a_replaced_file_of_the_wrong_kind_or_a_symlinked_entry_is_not_ours(tmp_path):
    out = tmp_path / "w"
    weights_folder.write(out, networks(1.0), "official")
    os.unlink(out / "icl.safetensors")
    os.symlink(tmp_path / "elsewhere", out / "icl.safetensors")
    with pytest.raises(InputError, match="icl.safetensors"):
        weights_folder.write(out, networks(2.0), "official", force=True)
    assert os.path.islink(out / "icl.safetensors")


@pytest.mark.parametrize("layout", ["same", "out_contains_src", "out_inside_src", "via_symlink"])
def test_output_never_overlaps_a_source(tmp_path, layout):
    src = tmp_path / "proj" / "official"
    src.mkdir(parents=True)
    (src / "mlp_best.pth").write_bytes(b"checkpoint")
    out = {"same": src, "out_contains_src": tmp_path / "proj",
           "out_inside_src": src / "weights", "via_symlink": tmp_path / "alias"}[layout]
    if layout == "via_symlink":
        os.symlink(src, out)
    for force in (False, True):
        with pytest.raises(InputError, match="the source"):
            weights_folder.write(out, networks(1.0), "official", force=force, sources=[src])
    assert os.listdir(src) == ["mlp_best.pth"] and (src / "mlp_best.pth").read_bytes() == b"checkpoint"


def test_sigkill_at_every_step_leaves_old_or_new_complete(tmp_path):
    out = tmp_path / "w"
    weights_folder.write(out, networks(1.0), "official")
    n_steps = _n_steps(tmp_path / "count", replace=True)
    assert n_steps >= 10
    seen = set()
    for kill_at in range(1, n_steps + 1):
        proc = _child(out, kill_at, 2.0)
        assert proc.returncode == -9, (kill_at, proc.stderr)
        seen.add(_value_of(out))
        # The next write cleans up what the killed one left, and nothing else.
        weights_folder.write(out, networks(1.0), "official", force=True)
        assert sorted(os.listdir(tmp_path)) == ["count", "w"], kill_at
    assert seen == {1.0, 2.0}  # killed before and after the swap


def test_sigkill_of_a_first_write_leaves_nothing_or_the_new_folder(tmp_path):
    n_steps = _n_steps(tmp_path / "count", replace=False)
    for kill_at in range(1, n_steps + 1):
        out = tmp_path / f"w{kill_at}"
        assert _child(out, kill_at, 2.0).returncode == -9
        if out.exists():
            assert _value_of(out) == 2.0
        weights_folder.clean_leftovers(str(tmp_path), out.name)
        assert not [e for e in os.listdir(tmp_path) if e.startswith(".")], kill_at


def test_sigkill_without_atomic_exchange_is_repaired_by_the_next_run(tmp_path):
    out = tmp_path / "w"
    weights_folder.write(out, networks(1.0), "official")
    n_steps = _n_steps(tmp_path / "count", replace=True, fallback=True)
    for kill_at in range(1, n_steps + 1):
        assert _child(out, kill_at, 2.0, fallback=True).returncode == -9
        weights_folder.clean_leftovers(str(tmp_path), "w")
        assert _value_of(out) in (1.0, 2.0), kill_at
        assert sorted(os.listdir(tmp_path)) == ["count", "w"], kill_at
        weights_folder.write(out, networks(1.0), "official", force=True)


def test_only_provable_leftovers_are_removed(tmp_path):
    def leftover(name, files):
        path = tmp_path / name
        path.mkdir()
        for file_name, text in files.items():
            (path / file_name).write_text(text)
        return path

    marker = ".ifadit-jax-incomplete"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    removed = [leftover(".tmp-ifadit-w-abcd1234", {marker: json.dumps({"pid": int(dead)}),
                                                   "x.safetensors": "partial"}),
               leftover(".tmp-ifadit-w-empty___", {})]
    kept = [leftover(".tmp-ifadit-w-user0000", {"thesis.tex": "mine"}),          # no marker
            leftover(".tmp-ifadit-w-live0000", {marker: json.dumps({"pid": os.getppid()})}),
            leftover(".tmp-ifadit-w-b-abcd1234", {marker: json.dumps({"pid": int(dead)})}),
            leftover(".tmp-ifadit-w-abcd12345", {marker: json.dumps({"pid": int(dead)})}),
            leftover(".tmp-ifadit-w-bad00000", {marker: "not json"})]
    weights_folder.write(tmp_path / "w", networks(1.0), "official")
    assert all(not p.exists() for p in removed)
    assert all(p.exists() for p in kept)
    assert (kept[0] / "thesis.tex").read_text() == "mine"


def test_export_and_release_share_one_weights_id_rule(tmp_path):
    """The id is the sha256 over role, tensor names and bytes (hand-computed here)."""
    nets = networks(1.0)
    digest = hashlib.sha256()
    for role in ("icl", "mapper"):
        digest.update(role.encode())
        digest.update(b"params/w")
        digest.update(np.full((4, 3), 1.0, np.float32).tobytes())
    manifest = weights_folder.write(tmp_path / "w", nets, "paper")
    assert manifest["weights_id"] == digest.hexdigest()[:16] == weights_folder.weights_id(nets)
