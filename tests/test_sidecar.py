"""The recovery sidecar schema: what it accepts, what it refuses (naming the field), how it is
read from disk, and a seeded fuzz of mutated sidecars through the validation function."""

import copy
import json
import math
import os
import random

import pytest

from ifadit_jax import keys, sidecar
from ifadit_jax.sidecar import SidecarError

SIZE = [400, 600]  # height, width


def valid() -> dict:
    """A hand-written photo-mode sidecar: one face, a similarity of scale 0.5 (a 128 px crop)
    rotated by 90 degrees whose crop centre lands at (300, 200)."""
    return {
        "format": "ifadit-jax-anonymized/2", "conventions": "official",
        "weights_id": "0123456789abcdef",
        "key": {"path": "kdf", "kdf": {"algorithm": "argon2id", "memory_cost": 65536, "iterations": 3,
                                       "lanes": 4, "salt": b"0123456789".hex(), "output_bytes": 512}},
        "refine": True, "mode": "photo", "size": list(SIZE),
        "faces": [{"box": [250.0, 150.0, 350.0, 250.0],
                   "transform": [[0.0, -0.5, 300.0 + 64.0], [0.5, 0.0, 200.0 - 64.0]]}],
    }


def test_valid_sidecar_round_trips():
    s = sidecar.validate(valid())
    assert s.size == (400, 600) and len(s.faces) == 1 and s.refine is True
    assert s.to_dict() == valid()
    sidecar.check_size(s, (400, 600))
    with pytest.raises(SidecarError, match="size"):
        sidecar.check_size(s, (600, 400))


def _set(path, value):
    def edit(d):
        *parents, last = path
        for p in parents:
            d = d[p]
        d[last] = value
    return edit


@pytest.mark.parametrize("edit,field", [
    (_set(["source"], "Tom_Hanks_54745.png"), "unknown field 'source'"),
    (lambda d: d.pop("size"), "sidecar.size: missing"),
    (_set(["refine"], 1), "refine"),
    (_set(["size"], [400.0, 600]), "size"),
    (_set(["size"], [0, 600]), "size"),
    (_set(["mode"], "video"), "mode"),
    (_set(["weights_id"], "\x1b[31mred"), "weights_id"),
    (_set(["key", "kdf", "memory_cost"], 2**32), "memory_cost"),
    (_set(["key", "kdf", "memory_cost"], 3 * 1024 * 1024), "cap"),
    (_set(["key", "kdf", "iterations"], 10**9), "cap"),
    (_set(["key", "kdf", "iterations"], 0), "iterations"),
    (_set(["key", "kdf", "lanes"], True), "lanes"),
    (_set(["key", "kdf", "salt"], "zz"), "salt"),
    (_set(["key", "check"], "not-hex"), "key.check"),
    (_set(["key", "path"], "magic"), "key.path"),
    (_set(["faces"], [copy.deepcopy(valid()["faces"][0])] * (sidecar.MAX_FACES + 1)), "at most"),
    (_set(["faces", 0, "transform", 0, 0], math.nan), "finite"),
    (_set(["faces", 0, "transform"], [[1e6, 0.0, 0.0], [0.0, 1e6, 0.0]]), "scale"),
    (_set(["faces", 0, "transform"], [[0.0, 0.0, 300.0], [0.0, 0.0, 200.0]]), "scale"),
    (_set(["faces", 0, "transform"], [[0.5, 0.0, 0.0], [0.0, -0.5, 300.0]]), "rotation"),
    (_set(["faces", 0, "transform"], [[0.5, 0.0, 5000.0], [0.0, 0.5, 0.0]]), "outside"),
    (_set(["faces", 0, "box"], [250.0, 150.0, 650.0, 250.0]), "inside the image"),
    (_set(["faces", 0, "box"], [350.0, 150.0, 250.0, 250.0]), "inside the image"),
    (_set(["faces", 0, "extra"], 1), "unknown field"),
])
def test_each_violation_names_its_field(edit, field):
    d = valid()
    edit(d)
    with pytest.raises(SidecarError, match=field):
        sidecar.validate(d)


def test_costly_kdf_needs_the_explicit_flag():
    d = valid()
    d["key"]["kdf"]["memory_cost"] = keys.CAP_MEMORY_KIB + 1
    with pytest.raises(SidecarError, match="cap"):
        sidecar.validate(d)
    assert sidecar.validate(d, allow_costly=True).key["kdf"]["memory_cost"] == keys.CAP_MEMORY_KIB + 1


def test_aligned_mode_has_no_faces_and_the_crop_size():
    d = valid()
    d.update(mode="aligned", size=[256, 256], faces=[])
    assert sidecar.validate(d).mode == "aligned"
    d["size"] = [257, 256]
    with pytest.raises(SidecarError, match="size"):
        sidecar.validate(d)


@pytest.mark.parametrize("text", [b'{"a": NaN}', b'{"a": 1, "a": 2}', b"[" * 100000, b"\xff\xfe",
                                  b'{"size": ' + b"9" * 5000 + b"}", b""])
def test_parse_is_strict_json(text):
    with pytest.raises(SidecarError, match="not valid JSON"):
        sidecar.parse(text)


def test_read_accepts_only_small_regular_files(tmp_path):
    good = tmp_path / "a.png.json"
    good.write_text(json.dumps(valid()))
    assert sidecar.read(str(good)).size == (400, 600)
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (sidecar.MAX_BYTES + 1))
    with pytest.raises(SidecarError, match="larger than"):
        sidecar.read(str(big))
    os.mkfifo(tmp_path / "fifo.json")
    os.symlink(tmp_path / "fifo.json", tmp_path / "link.json")
    os.symlink("/dev/zero", tmp_path / "zero.json")
    for name in ("fifo.json", "link.json", "zero.json"):
        with pytest.raises(SidecarError, match="not a regular file"):
            sidecar.read(str(tmp_path / name))
    with pytest.raises(SidecarError, match="cannot open"):
        sidecar.read(str(tmp_path / "missing.json"))


def test_printable_escapes_terminal_codes():
    assert sidecar.printable("\x1b[2Jid\n") == "\\x1b[2Jid\\n"
    assert len(sidecar.printable("x" * 10_000)) == 80


# ----------------------------------------------------------------------------------------------
# Fuzz


_NASTY = [None, True, 0, -1, 2**64, 10**400, 1e308, -1e308, math.nan, math.inf, "", "x" * 100_000,
          "\x00\x1b", [], {}, [1, 2], {"a": 1}, 0.5]


def _paths(obj, prefix=()):
    yield prefix
    if len(prefix) > 6:  # deep nesting put there by an earlier mutation: not walked
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _deep(n):
    x = []
    for _ in range(n):
        x = [x]
    return x


def _mutate(rng: random.Random, d: dict) -> dict:
    d = copy.deepcopy(d)
    for _ in range(rng.randint(1, 3)):
        paths = [p for p in _paths(d) if p]
        if not paths:
            break
        *parents, last = rng.choice(paths)
        target = d
        for p in parents:
            target = target[p]
        op = rng.randrange(6)
        if op == 0 and isinstance(target, dict):
            del target[last]
        elif op == 1:
            target[last] = rng.choice(_NASTY)
        elif op == 2:
            target[last] = _deep(rng.choice([10, 500, 5000]))
        elif op == 3 and isinstance(target, dict):
            target["extra_" + str(rng.randrange(100))] = rng.choice(_NASTY)
        elif op == 4 and isinstance(target[last], (int, float)) and not isinstance(target[last], bool):
            target[last] = target[last] * rng.choice([-1, 0, 1e-9, 1e9, 2**40]) + rng.choice([0, 1e-3])
        else:
            flat = not isinstance(target[last], (list, dict))
            target[last] = (str(target[last])[:100] if flat else "text") if rng.random() < 0.5 else [target[last]]
    return d


def test_fuzzed_sidecars_are_accepted_or_refused_with_the_one_error_type():
    rng = random.Random(20261206)
    accepted = refused = 0
    for i in range(600):
        d = _mutate(rng, valid() if i % 3 else {**valid(), "mode": "aligned", "size": [256, 256], "faces": []})
        try:
            sidecar.validate(d)
            accepted += 1
        except SidecarError:
            refused += 1
        # The same through the text parser (NaN and infinities are refused there).
        try:
            text = json.dumps(d).encode()
        except (ValueError, RecursionError):
            continue
        try:
            sidecar.validate(sidecar.parse(text))
        except SidecarError:
            pass
    assert refused > 300 and accepted > 0  # the mutations reach both outcomes
    raw = json.dumps(valid()).encode()
    for _ in range(300):
        b = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        try:
            sidecar.validate(sidecar.parse(bytes(b)))
        except SidecarError:
            pass
