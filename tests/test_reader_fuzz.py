"""Seeded fuzzing of the checkpoint reader with mutants of the real fixture checkpoints.

Mutations: bit flips anywhere, truncation, duplicated / swapped / moved / deleted pickle opcodes,
pickle integers (offsets, sizes, strides, element counts) set to edge values, and zip member edits
(dropped, renamed, resized, swapped, duplicated, recompressed, flipped with a valid CRC).

Every mutant either reads to exactly the original tensors or fails with `CheckpointError`: never
another exception, a crash or a hang. Where a mutation can legitimately change what a file says
(bytes of a legacy file, which has no checksum; a rewritten pickle or zip member, whose CRC is
recomputed), a successful read must still be well formed and within the reader's allocation
budget. The mutants run in a subprocess (this file run as a script) under an address-space limit,
each under a CPU-time limit, so a crash or runaway allocation fails the test instead of the run.
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import random
import resource
import signal
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SEED = 20261206
ADDRESS_SPACE = 3 * 2 ** 30
CPU_PER_MUTANT_S = 5.0
CPU_WHOLE_RUN_S = 300  # a guard only: the run takes about 10 s of CPU
# Small fixtures of each format: zip (torch >= 1.6), legacy (pre-1.6) and an NVlabs pickle, which
# is the slowest to read and gets fewer mutants.
PLAN = [
    ("ifadit_mlp_latent_mapper.pth", 450),
    ("ifadit_icl_fusion_mapper10.pth", 350),
    ("ifadit_inn_G_net.pth", 200),
    ("lpips_vgg_div8_lins.pth", 250),
    ("lpips_weights/v0.1/alex.pth", 350),
    ("mtcnn_weights/pnet.pt", 350),
    ("ada_network_snapshot_256.pkl", 60),
]
MIN_MUTANTS = 2000
# Mutations after which the file says the same thing or nothing readable: a read must be exact.
EXACT = {"flip_zip", "truncate", "deflate", "drop_member", "rename_member", "resize_member"}


class _Hang(BaseException):
    """Raised by the CPU timer; a BaseException so the reader's own handler cannot swallow it."""


# ---- the parent: pytest ----

def test_mutated_fixtures_read_exactly_or_fail_cleanly(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__, str(SEED), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, f"fuzz child died ({proc.returncode}):\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["failures"] == [], json.dumps(report, indent=1)[:6000]
    assert report["mutants"] >= MIN_MUTANTS
    # The mutations reach the reader's checks rather than all dying at the first byte: some
    # read exactly, many fail, and rewritten pickles sometimes read to something else.
    assert report["outcomes"]["exact"] >= 100 and report["outcomes"]["error"] >= 1000
    assert report["outcomes"]["different"] >= 10


# ---- the child: run as a script ----

def _pickle_ops(pkl: bytes) -> list[bytes]:
    """The pickle cut into its opcodes (each with its argument bytes)."""
    stream = io.BytesIO(pkl)
    starts = [pos for _op, _arg, pos in pickletools.genops(stream)]
    return [pkl[a:b] for a, b in zip(starts, starts[1:] + [stream.tell()])]


def _mutate_ops(ops: list[bytes], rng: random.Random) -> bytes:
    ops = list(ops)
    for _ in range(rng.randint(1, 3)):
        i, j = rng.randrange(len(ops)), rng.randrange(len(ops))
        kind = rng.choice(["dup", "swap", "delete", "move"])
        if kind == "dup":
            ops.insert(j, ops[i])
        elif kind == "swap":
            ops[i], ops[j] = ops[j], ops[i]
        elif kind == "delete" and len(ops) > 1:
            del ops[i]
        else:
            ops.insert(j, ops.pop(i))
    return b"".join(ops)


_INT_OPS = {ord("K"): 1, ord("M"): 2, ord("J"): 4}  # BININT1, BININT2, BININT: offsets, sizes


def _mutate_int(ops: list[bytes], rng: random.Random) -> bytes:
    """One integer of the pickle (an offset, size, stride or element count) set to an edge value."""
    ops = list(ops)
    candidates = [i for i, op in enumerate(ops) if op[0] in _INT_OPS]
    i = rng.choice(candidates)
    old = int.from_bytes(ops[i][1:], "little", signed=ops[i][0] == ord("J"))
    new = rng.choice([0, 1, -1, old + 1, old - 1, 2 * old, old * old, 2 ** 31 - 1, -2 ** 31,
                      2 ** 40, -2 ** 40, 2 ** 63, 2 ** 70])
    body = new.to_bytes((new.bit_length() + 8) // 8, "little", signed=True)
    ops[i] = b"\x8a" + bytes([len(body)]) + body  # LONG1 takes any size
    return b"".join(ops)


def _flip(data: bytes, rng: random.Random, start: int = 0, end: int | None = None) -> bytes:
    out = bytearray(data)
    end = len(out) if end is None else end
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(start, end)
        out[pos] ^= 1 << rng.randrange(8)
    return bytes(out)


def _zip_members(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def _zip_bytes(members, compress=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are one of the mutations
        with zipfile.ZipFile(buf, "w", compression=compress) as z:
            for name, raw in members:
                z.writestr(name, raw)
    return buf.getvalue()


def _mutate_zip(data: bytes, rng: random.Random, ops: list[bytes]) -> tuple[str, bytes]:
    members = _zip_members(data)
    pkl_index = next(i for i, (n, _) in enumerate(members) if n.endswith("/data.pkl"))
    kind = rng.choice(["flip_zip", "flip_zip", "truncate", "pkl_ops", "pkl_ops", "pkl_flip",
                       "pkl_flip", "pkl_int", "pkl_int", "pkl_int", "deflate", "drop_member",
                       "rename_member", "resize_member", "swap_members", "dup_member"])
    i = rng.randrange(len(members))
    name, raw = members[i]
    if kind == "flip_zip":
        return kind, _flip(data, rng)
    if kind == "truncate":
        return kind, data[:rng.randrange(len(data))]
    if kind == "pkl_ops":
        members[pkl_index] = (members[pkl_index][0], _mutate_ops(ops, rng))
    elif kind == "pkl_int":
        members[pkl_index] = (members[pkl_index][0], _mutate_int(ops, rng))
    elif kind == "pkl_flip":
        members[pkl_index] = (members[pkl_index][0], _flip(members[pkl_index][1], rng))
    elif kind == "deflate":
        return kind, _zip_bytes(members, zipfile.ZIP_DEFLATED)
    elif kind == "drop_member":
        del members[i]
    elif kind == "rename_member":
        members[i] = (name + rng.choice(["x", "/", "0"]), raw)
    elif kind == "resize_member":
        cut = rng.randrange(len(raw) + 1)
        members[i] = (name, raw[:cut] if cut < len(raw) else raw + bytes(rng.randint(1, 64)))
    elif kind == "swap_members":
        j = rng.randrange(len(members))
        members[i], members[j] = (name, members[j][1]), (members[j][0], raw)
    else:
        members.append((name, _flip(raw, rng) if raw else b"\0"))
    return kind, _zip_bytes(members)


def _legacy_object_span(data: bytes) -> tuple[int, int]:
    """Start and end of the fourth pickle of a legacy file: the one holding the tensors."""
    stream = io.BytesIO(data)
    for _ in range(3):
        for _op in pickletools.genops(stream):
            pass
    start = stream.tell()
    for _op in pickletools.genops(stream):
        pass
    return start, stream.tell()


def _mutate_stream(data: bytes, rng: random.Random, span: tuple[int, int],
                   ops: list[bytes]) -> tuple[str, bytes]:
    """Legacy files and NVlabs pickles: one pickle (plus raw storages for legacy) in a row."""
    kind = rng.choice(["flip", "flip_pickle", "truncate", "ops", "ops", "int", "int"])
    start, end = span
    if kind == "flip":
        return kind, _flip(data, rng)
    if kind == "flip_pickle":
        return kind, _flip(data, rng, start, end)
    if kind == "truncate":
        return kind, data[:rng.randrange(len(data))]
    mutated = _mutate_int(ops, rng) if kind == "int" else _mutate_ops(ops, rng)
    return kind, data[:start] + mutated + data[end:]


def _same(a, b) -> bool:
    if type(a).__name__ != type(b).__name__:
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (np.ndarray, np.generic)):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return a == b


_PLAIN = (type(None), bool, int, float, complex, str, bytes, np.generic, np.dtype, set, frozenset)


def _well_formed(tree, seen: dict) -> bool:
    """Plain containers of plain values and arrays; collects distinct arrays into `seen`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, np.ndarray):
            seen[id(node)] = node.nbytes
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
        elif not isinstance(node, _PLAIN):
            return False
    return True


def _judge(kind: str, path: Path, original, size: int, read, error_type) -> str:
    """'exact', 'different' or 'error', or raises AssertionError with what went wrong."""
    try:
        result = read(path)
    except error_type as e:
        # A cap that is missing shows up as the generic handler catching these.
        assert "(MemoryError" not in str(e) and "(RecursionError" not in str(e), str(e)
        assert "\n" not in str(e), "error message of more than one line"
        return "error"
    if _same(result, original):
        return "exact"
    assert kind not in EXACT, "read succeeded with different tensors"
    arrays: dict = {}
    assert _well_formed(result, arrays), "result holds something other than plain data"
    assert sum(arrays.values()) <= 4 * size + 16 * 2 ** 20, "allocation beyond the budget"
    return "different"


def _alarm(_signum, _frame):
    raise _Hang()


def _mutants(name: str, count: int, rng: random.Random):
    data = (FIXTURES / name).read_bytes()
    if zipfile.is_zipfile(io.BytesIO(data)):
        pkl = next(raw for n, raw in _zip_members(data) if n.endswith("/data.pkl"))
        ops = _pickle_ops(pkl)
        for _ in range(count):
            yield _mutate_zip(data, rng, ops)
        return
    span = _legacy_object_span(data) if data[2] == 0x8A else (0, len(data))
    ops = _pickle_ops(data[span[0]:span[1]])
    for _ in range(count):
        yield _mutate_stream(data, rng, span, ops)


def _run(seed: int, workdir: Path) -> dict:
    from ports.reader import CheckpointError, read_checkpoint

    signal.signal(signal.SIGPROF, _alarm)
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_WHOLE_RUN_S, CPU_WHOLE_RUN_S))
    rng = random.Random(seed)
    outcomes = {"exact": 0, "different": 0, "error": 0}
    failures, mutants = [], 0
    for name, count in PLAN:
        original = read_checkpoint(FIXTURES / name)
        for index, (kind, blob) in enumerate(_mutants(name, count, rng)):
            path = workdir / f"mutant{Path(name).suffix}"
            path.write_bytes(blob)
            mutants += 1
            signal.setitimer(signal.ITIMER_PROF, CPU_PER_MUTANT_S)
            try:
                outcomes[_judge(kind, path, original, len(blob), read_checkpoint, CheckpointError)] += 1
            except _Hang:
                failures.append([name, index, kind, f"over {CPU_PER_MUTANT_S} s of CPU"])
            except BaseException as e:  # noqa: BLE001 -- every escape is a finding to report
                failures.append([name, index, kind, f"{type(e).__name__}: {str(e)[:300]}"])
            finally:
                signal.setitimer(signal.ITIMER_PROF, 0)
    return {"mutants": mutants, "outcomes": outcomes, "failures": failures[:30]}


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(json.dumps(_run(int(sys.argv[1]), Path(sys.argv[2]))))
