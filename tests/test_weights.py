"""Load-time validation of converted files, for every network kind (issue 12 item 4).

Each bad file is built here from a small valid one; every one must be refused at `weights.read`
(and `ifadit_jax.load`) with one WeightsError line naming the file and the field or tensor,
never accepted and never a different exception at first use.
"""

from __future__ import annotations

import json
import os
import struct

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import ifadit_jax
from ifadit_jax import flow, weights
from ifadit_jax.errors import WeightsError
from tests.helpers import run_cli

# One small config per kind (the JSON the converters write), and a field set out of range with
# the documented limit it breaks (README "Weights").
CONFIGS = {
    "stylegan2": {"resolution": 8, "z_dim": 8, "w_dim": 8, "n_mapping": 2, "lr_mul": 0.01,
                  "channels": [[4, 8], [8, 8]], "flavor": "rosinality", "conv_clamp": None,
                  "img_channels": 3},
    "sif": {"variant": "allinone", "n_blocks": 2, "dim": 8, "cond_dim": 4, "hidden": [8],
            "negative_slope": 0.01, "c": 1.0, "clamp": 2.0, "freia": "0.2"},
    "latent_mapper": {"in_features": 8, "features": [4, 4], "negative_slope": 0.2},
    "icl": {"in_features": 4, "features": [8, 4], "negative_slope": 0.2},
    "arcface": {"in_channels": 3, "widths": [16, 16, 16, 16], "units": [1, 1, 1, 1], "se": True,
                "emb_dim": 8, "input_size": 112, "bn1d_affine": True},
    "psp_encoder": {"in_channels": 3, "widths": [16, 16, 16, 16], "units": [1, 1, 1, 1], "se": True,
                    "n_styles": 3, "style_width": 4, "w_dim": 8, "input_range": [0.0, 1.0],
                    "start_from_latent_avg": False},
    "bisenet": {"n_classes": 3, "stem_width": 4, "layer_widths": [4, 4, 8, 8],
                "layer_blocks": [1, 1, 1, 1], "context_width": 4, "fusion_width": 4,
                "fusion_attention_width": 2, "head_widths": [4, 4, 4]},
    "mobilefacenet": {"embedding_size": 136},
    "lpips": {"net": "alex", "widths": [4, 4, 4, 4, 4], "version": "0.1"},
    "mtcnn": {"pnet_widths": [2, 2, 2], "rnet_widths": [2, 2, 2, 4], "onet_widths": [2, 2, 2, 2, 4]},
    "adaface": {"num_layers": 18, "widths": [4, 4, 4, 8], "units": [2, 2, 2, 2], "emb_dim": 8,
                "input_size": 112},
    "inception": {"widths": {"stem": [2, 2, 2, 2, 2], "a": [2] * 6, "a_pool": [2] * 3,
                             "b": [2] * 4, "c": [2] * 3, "c7": [2] * 4, "d": [2] * 3,
                             "e": [1, 2, 2, 3, 4]},
                  "feature_dim": 1 + 2 * 2 + 2 * 3 + 4},
}
OUT_OF_RANGE = {
    "stylegan2": ("resolution", 2048),  # resolution <= 1024
    "sif": ("n_blocks", 10 ** 6),
    "latent_mapper": ("in_features", 10 ** 9),  # the 4.2 GB mapper of issue 12
    "icl": ("features", [10 ** 9]),  # widths <= 4096
    "arcface": ("emb_dim", 4097),
    "psp_encoder": ("n_styles", 19),
    "bisenet": ("layer_blocks", [1, 1, 1, 10 ** 6]),
    "mobilefacenet": ("embedding_size", 0),
    "lpips": ("net", "vgg16"),
    "mtcnn": ("pnet_widths", [2, 2]),
    "adaface": ("input_size", 113),
    "inception": ("feature_dim", 99),  # does not match the widths
}
KINDS = sorted(CONFIGS)
assert set(KINDS) == set(weights.KINDS)

_CACHE: dict[str, dict] = {}


def valid_variables(kind: str) -> dict[str, np.ndarray]:
    """Flat float32 tensors of the right shapes (a real flow for "sif": its permutations must be
    permutations)."""
    if kind not in _CACHE:
        if kind == "sif":
            params = flow.init_sif(jax.random.key(0), flow.SifConfig.from_json(CONFIGS[kind]))
            flat = weights.flatten(flow.to_variables(params))
        else:
            config = weights.network_class(kind).CONFIG.from_json(CONFIGS[kind])
            gen = np.random.default_rng(0)
            flat = {k: gen.uniform(0.5, 1.0, v.shape).astype(v.dtype)
                    for k, v in weights.flatten(config.variable_shapes()).items()}
        _CACHE[kind] = {k: np.asarray(v) for k, v in flat.items()}
    return dict(_CACHE[kind])


def write(path, tensors: dict, metadata: dict) -> str:
    save_file({k: np.array(v, order="C") for k, v in tensors.items()}, str(path), metadata=metadata)
    return str(path)


def metadata(kind: str | None, config) -> dict:
    meta = {"format": weights.FORMAT, "config": config if isinstance(config, str) else json.dumps(config),
            "source_file": "x.pth", "source_sha256": "", "converter_version": "1", "extra": "{}"}
    if kind is not None:
        meta["kind"] = kind
    return meta


def first_float(tensors: dict) -> str:
    return next(k for k, v in sorted(tensors.items()) if v.dtype == np.float32)


def refused(path: str, match: str, kind: str | None = None) -> str:
    with pytest.raises(WeightsError, match=match) as info:
        weights.read(path, kind=kind)
    message = str(info.value)
    assert "\n" not in message and path in message, message
    if kind is None:
        with pytest.raises(WeightsError):
            ifadit_jax.load(path)
    return message


@pytest.mark.parametrize("kind", KINDS)
def test_valid_file_loads_and_keeps_its_json(kind, tmp_path):
    path = write(tmp_path / "ok.safetensors", valid_variables(kind), metadata(kind, CONFIGS[kind]))
    variables, meta = weights.read(path, kind=kind)
    net = ifadit_jax.load(path)
    assert isinstance(net, weights.network_class(kind))
    # The config object writes back the JSON the converters wrote: files round-trip.
    assert net.config.to_json() == CONFIGS[kind] == json.loads(json.dumps(dict(net.config)))


def _bad_metadata(kind, case):
    other = KINDS[(KINDS.index(kind) + 1) % len(KINDS)]
    field, value = OUT_OF_RANGE[kind]
    return {
        "missing kind": (metadata(None, CONFIGS[kind]), "no 'kind'", None),
        "unknown kind": (metadata("resnet9000\x1b[2J", CONFIGS[kind]), "unknown network kind", None),
        "wrong kind": (metadata(kind, CONFIGS[kind]), f"holds a '{kind}' network, expected '{other}'",
                       other),
        "non-JSON config": (metadata(kind, "{widths: [1,"), "metadata 'config'", None),
        "config not an object": (metadata(kind, "[1, 2]"), "metadata 'config'", None),
        "unknown config key": (metadata(kind, {**CONFIGS[kind], "bogus": 1}),
                               "unknown config field 'bogus'", None),
        "out-of-range config": (metadata(kind, {**CONFIGS[kind], field: value}),
                                f"config field '{field}", None),
        "missing config key": (metadata(kind, {k: v for k, v in CONFIGS[kind].items() if k != field}),
                               f"config field '{field}", None),
        "mistyped config": (metadata(kind, {**CONFIGS[kind], field: "12"}), f"config field '{field}",
                            None),
    }[case]


@pytest.mark.parametrize("case", ["missing kind", "unknown kind", "wrong kind", "non-JSON config",
                                  "config not an object", "unknown config key",
                                  "out-of-range config", "missing config key", "mistyped config"])
@pytest.mark.parametrize("kind", KINDS)
def test_bad_metadata_is_refused_naming_the_field(kind, case, tmp_path):
    meta, match, expect_kind = _bad_metadata(kind, case)
    path = write(tmp_path / "bad.safetensors", valid_variables(kind), meta)
    message = refused(path, match, expect_kind)
    assert "\x1b" not in message  # names from files are escaped before they reach a terminal


def _bad_tensors(kind, case):
    tensors = valid_variables(kind)
    name = first_float(tensors)
    if case == "missing tensor":
        del tensors[name]
        return tensors, f"missing tensor {name}"
    if case == "extra tensor":
        tensors["params/extra"] = np.zeros(3, np.float32)
        return tensors, "unexpected tensor params/extra"
    if case == "misshapen tensor":
        tensors[name] = np.zeros(tensors[name].size + 1, np.float32)
        return tensors, f"tensor {name} has shape"
    if case in ("float16 tensor", "int8 tensor", "float64 tensor"):
        dtype = {"float16 tensor": np.float16, "int8 tensor": np.int8, "float64 tensor": np.float64}[case]
        tensors[name] = tensors[name].astype(dtype)
        return tensors, f"tensor {name} has dtype"
    value = {"NaN tensor": np.nan, "inf tensor": -np.inf}[case]
    tensors[name] = tensors[name].copy()
    tensors[name].reshape(-1)[-1] = value
    return tensors, f"tensor {name} has non-finite values"


@pytest.mark.parametrize("case", ["missing tensor", "extra tensor", "misshapen tensor",
                                  "float16 tensor", "int8 tensor", "float64 tensor", "NaN tensor",
                                  "inf tensor"])
@pytest.mark.parametrize("kind", KINDS)
def test_bad_tensors_are_refused_naming_the_tensor(kind, case, tmp_path):
    tensors, match = _bad_tensors(kind, case)
    path = write(tmp_path / "bad.safetensors", tensors, metadata(kind, CONFIGS[kind]))
    refused(path, match)
    # The loaders validate in-memory variables the same way (no file involved).
    variables = weights.unflatten(tensors)
    with pytest.raises(WeightsError, match=match.split(" has ")[0]):
        weights.loader(kind)(variables, weights.Meta(kind=kind, config=CONFIGS[kind]))


@pytest.mark.parametrize("kind", KINDS)
def test_header_too_large_is_refused_before_reading_it(kind, tmp_path):
    good = write(tmp_path / "good.safetensors", valid_variables(kind), metadata(kind, CONFIGS[kind]))
    data = open(good, "rb").read()
    for size in (2 ** 40, weights.MAX_HEADER_BYTES + 1, len(data)):  # huge, over the cap, past EOF
        path = tmp_path / f"big{size}.safetensors"
        path.write_bytes(struct.pack("<Q", size) + data[8:])
        refused(str(path), "header of")


def test_header_nesting_and_non_json_are_refused(tmp_path):
    for name, header in (("deep", b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}"),
                         ("not-json", b"{nope"), ("not-object", b"[1, 2, 3]"),
                         ("not-utf8", b'{"\xff": 1}')):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(struct.pack("<Q", len(header)) + header)
        refused(str(path), "nests deeper|header is not")


def test_deep_config_json_is_refused_before_parsing(tmp_path):
    deep = "[" * 100000 + "]" * 100000
    for name in ("config", "extra"):
        meta = metadata("icl", CONFIGS["icl"])
        meta[name] = deep
        path = write(tmp_path / f"{name}.safetensors", valid_variables("icl"), meta)
        refused(path, f"metadata '{name}' nests deeper")


def test_metadata_must_be_strings_and_the_format_ours(tmp_path):
    header = json.dumps({"__metadata__": {"format": weights.FORMAT, "kind": 3}}).encode()
    path = tmp_path / "meta.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    refused(str(path), "no 'ifadit-jax/1' metadata")
    foreign = write(tmp_path / "foreign.safetensors", {"w": np.zeros(2, np.float32)}, {"a": "b"})
    refused(foreign, "not a converted ifadit-jax weights file")


def test_only_regular_files_are_read(tmp_path):
    refused_dir = tmp_path / "dir.safetensors"
    refused_dir.mkdir()
    with pytest.raises(WeightsError, match="not a regular file"):
        weights.read(refused_dir)
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)  # opening it would block forever
    with pytest.raises(WeightsError, match="not a regular file"):
        weights.read(fifo)
    link = tmp_path / "link.safetensors"
    link.symlink_to(fifo)
    with pytest.raises(WeightsError, match="not a regular file"):
        weights.read(link)
    with pytest.raises(WeightsError, match="not found"):
        weights.read(tmp_path / "absent.safetensors")


def test_a_tensor_inside_a_tensor_is_refused(tmp_path):
    tensors = valid_variables("icl")
    name = first_float(tensors)
    tensors[name + "/child"] = np.zeros(1, np.float32)
    path = write(tmp_path / "nested.safetensors", tensors, metadata("icl", CONFIGS["icl"]))
    refused(path, "also a group|inside another tensor")


def test_psp_latent_avg_is_required_only_when_used(tmp_path):
    config = {**CONFIGS["psp_encoder"], "start_from_latent_avg": True}
    path = write(tmp_path / "psp.safetensors", valid_variables("psp_encoder"),
                 metadata("psp_encoder", config))
    refused(path, "missing tensor consts/latent_avg")
    tensors = {**valid_variables("psp_encoder"), "consts/latent_avg": np.zeros((3, 8), np.float32)}
    path = write(tmp_path / "psp2.safetensors", tensors, metadata("psp_encoder", config))
    assert ifadit_jax.load(path).latent_avg.shape == (3, 8)
    tensors["consts/latent_avg"] = np.zeros((3, 9), np.float32)
    path = write(tmp_path / "psp3.safetensors", tensors, metadata("psp_encoder", config))
    refused(path, "consts/latent_avg has shape")


def test_a_config_that_builds_no_network_is_one_error(tmp_path):
    # In range field by field, but IR-SE's squeeze-excitation divides widths by 16: 4 -> 0.
    config = {**CONFIGS["arcface"], "widths": [4, 4, 4, 4]}
    path = write(tmp_path / "se.safetensors", valid_variables("arcface"), metadata("arcface", config))
    refused(path, "does not build a network of kind .arcface.")


def test_config_limits_hold_for_direct_construction_of_known_values():
    # Hand-checked bounds: the documented limits themselves are accepted.
    sg = weights.network_class("stylegan2").CONFIG.from_json(
        {**CONFIGS["stylegan2"], "resolution": 1024,
         "channels": [[2 ** i, 8] for i in range(2, 11)]})
    assert sg.n_latent == 18
    mapper = weights.network_class("latent_mapper").CONFIG.from_json(
        {**CONFIGS["latent_mapper"], "features": [4096, 4096]})
    assert mapper.features == (4096, 4096)
    with pytest.raises(WeightsError, match="'channels'"):
        weights.network_class("stylegan2").CONFIG.from_json(
            {**CONFIGS["stylegan2"], "channels": [[4, 8], [16, 8]]})
    with pytest.raises(WeightsError, match="true or false"):
        weights.network_class("arcface").CONFIG.from_json({**CONFIGS["arcface"], "se": 1})


@pytest.mark.parametrize("kind", ["icl", "sif", "stylegan2"])
def test_mutated_files_read_or_fail_with_weights_error(kind, tmp_path):
    """Seeded byte flips, overwritten runs and truncations of a valid file: each one either
    reads (to tensors that passed every check) or is one WeightsError; nothing else escapes."""
    good = write(tmp_path / "good.safetensors", valid_variables(kind), metadata(kind, CONFIGS[kind]))
    data = bytearray(open(good, "rb").read())
    header_end = 8 + struct.unpack("<Q", bytes(data[:8]))[0]
    gen = np.random.default_rng(12)
    path = tmp_path / "mutant.safetensors"
    outcomes = {"read": 0, "refused": 0}
    for i in range(150):
        mutant = bytearray(data)
        if i % 5 == 4:
            mutant = mutant[:int(gen.integers(0, len(mutant)))]
        else:
            # Mostly inside the header (where parsing happens), sometimes in the tensor data.
            lo, hi = (0, header_end) if gen.random() < 0.8 else (header_end, len(mutant))
            for _ in range(int(gen.integers(1, 4))):
                at = int(gen.integers(lo, hi))
                mutant[at] = int(gen.integers(0, 256))
        path.write_bytes(bytes(mutant))
        try:
            variables, _ = weights.read(path, kind=kind)
        except WeightsError as e:
            assert "\n" not in str(e)
            outcomes["refused"] += 1
        else:
            assert all(np.all(np.isfinite(v)) for v in weights.flatten(variables).values()
                       if v.dtype == np.float32)
            outcomes["read"] += 1
    assert outcomes["refused"] > 50, outcomes


def test_names_from_files_reach_the_terminal_escaped(tmp_path):
    tensors = {**valid_variables("icl"), "params/\x1b]0;pwned\x07": np.zeros(1, np.float32)}
    path = write(tmp_path / "esc.safetensors", tensors, metadata("icl", CONFIGS["icl"]))
    message = refused(path, "unexpected tensor")
    assert "\x1b" not in message and "\x07" not in message
    tensors = {**valid_variables("icl"), "params/\x1b[31m": np.zeros(1, np.float16)}
    path = write(tmp_path / "esc16.safetensors", tensors, metadata("icl", CONFIGS["icl"]))
    assert "\x1b" not in refused(path, "has dtype F16")


def test_float32_weights_load_under_x64_and_float64_only_in_memory(tmp_path):
    # Under jax_enable_x64, eval_shape reports float64 for some parameters (PReLU slopes); the
    # float32 file must still load, and float64 in-memory variables are a float64 computation.
    path = write(tmp_path / "ok.safetensors", valid_variables("arcface"), metadata("arcface", CONFIGS["arcface"]))
    with jax.enable_x64(True):
        weights.read(path, kind="arcface")
        wide = {k: v.astype(np.float64) for k, v in valid_variables("icl").items()}
        weights.loader("icl")(weights.unflatten(wide), weights.Meta(kind="icl", config=CONFIGS["icl"]))
    with pytest.raises(WeightsError, match="has dtype float64"):
        weights.loader("icl")(weights.unflatten(wide), weights.Meta(kind="icl", config=CONFIGS["icl"]))


def test_a_cli_reports_a_bad_file_as_one_error_line_with_exit_code_3(tmp_path):
    tensors, _ = _bad_tensors("stylegan2", "NaN tensor")
    path = write(tmp_path / "g.safetensors", tensors, metadata("stylegan2", CONFIGS["stylegan2"]))
    out = tmp_path / "ffhq_star"
    proc = run_cli("-m", "ifadit_jax.data.synthesize", "--weights", path, "--n", "1", "--out",
                   str(out), "--quiet", check=False)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "non-finite" in proc.stderr and path in proc.stderr
    assert not out.exists()


def test_header_and_tensors_come_from_the_one_file_opened(tmp_path, monkeypatch):
    """The file is opened once: swapping another valid file in under its name right after that
    open changes nothing (a second open by name would read the other file's tensors)."""
    kind = "icl"
    mine = valid_variables(kind)
    path = write(tmp_path / "w.safetensors", mine, metadata(kind, CONFIGS[kind]))
    other = write(tmp_path / "other.safetensors", {k: v + 1 for k, v in mine.items()},
                  metadata(kind, CONFIGS[kind]))
    real_open, opened = os.open, []

    def open_then_swap(file, *args, **kwargs):
        fd = real_open(file, *args, **kwargs)
        if os.fspath(file) == path:
            opened.append(file)
            os.replace(other, path)
        return fd

    monkeypatch.setattr(os, "open", open_then_swap)
    variables, _ = weights.read(path, kind=kind)
    assert len(opened) == 1
    got = weights.flatten(variables)
    assert got.keys() == mine.keys()
    assert all(np.array_equal(got[k], mine[k]) for k in mine)


def test_loading_validates_the_tensors_once(tmp_path, monkeypatch):
    from ifadit_jax.nets import base

    kind = "arcface"
    path = write(tmp_path / "w.safetensors", valid_variables(kind), metadata(kind, CONFIGS[kind]))
    calls = []
    real = base.check_variables
    monkeypatch.setattr(base, "check_variables", lambda *a, **k: calls.append(1) or real(*a, **k))
    ifadit_jax.load(path)
    assert len(calls) == 1
    weights.read(path)  # reading alone validates too
    assert len(calls) == 2
