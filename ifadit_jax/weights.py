"""Converted weights on disk: one safetensors file per network, with its kind and config.

Layout: tensor names are `collection/path/to/leaf` (e.g. `params/mapping/fc0/kernel`,
`consts/synthesis/b8/conv0/noise_const`); the safetensors metadata holds
`format`, `kind`, `config` (JSON), `source_file`, `source_sha256` and `converter_version`.
`ifadit_jax.load(path)` dispatches on `kind` to the network's own loader.

Files are untrusted: `read` validates the file, its header's bounds, the kind, the config schema
(`ifadit_jax.nets.base.NetConfig`) and every tensor's name, shape, dtype and finiteness against
`jax.eval_shape` of the network, and raises one WeightsError line otherwise (README "Weights").
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import re
import stat
from typing import Any, Callable, Mapping

import numpy as np

from ifadit_jax.errors import WeightsError
from ifadit_jax.files import atomic_path

FORMAT = "ifadit-jax/1"
# Bounds of the safetensors header read before anything else: our largest network (StyleGAN2
# 1024 px) needs about 60 KB; the nesting of a valid header is 3 (header, tensor, shape).
MAX_HEADER_BYTES = 8 << 20
MAX_HEADER_DEPTH = 3
MAX_CONFIG_DEPTH = 4  # config and extra JSON (Inception's widths: object, object, list)
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_OPEN = np.frombuffer(b"{[", np.uint8)
_CLOSE = np.frombuffer(b"}]", np.uint8)

# kind -> "module:class" of the loaded network: its `CONFIG` (schema) and `from_weights(variables,
# meta)`. Imported lazily so `ifadit_jax.load` of one network does not import every other one.
_LOADERS: dict[str, str] = {
    "stylegan2": "ifadit_jax.nets.stylegan2:StyleGAN2",
    "sif": "ifadit_jax.flow:Flow",
    "latent_mapper": "ifadit_jax.nets.mappers:LoadedLatentMapper",
    "icl": "ifadit_jax.nets.mappers:LoadedICL",
    "arcface": "ifadit_jax.nets.arcface:LoadedArcFace",
    "psp_encoder": "ifadit_jax.nets.psp:LoadedPSPEncoder",
    "bisenet": "ifadit_jax.nets.bisenet:LoadedBiSeNet",
    "mobilefacenet": "ifadit_jax.nets.mobilefacenet:LoadedMobileFaceNet",
    "lpips": "ifadit_jax.nets.lpips:LoadedLPIPS",
    "mtcnn": "ifadit_jax.nets.mtcnn:MTCNN",
    "adaface": "ifadit_jax.nets.adaface:LoadedAdaFace",
    "inception": "ifadit_jax.nets.inception:LoadedInception",
}
KINDS = tuple(_LOADERS)


@dataclasses.dataclass(frozen=True)
class Meta:
    kind: str
    config: dict
    source_file: str = ""
    source_sha256: str = ""
    converter_version: str = ""
    extra: dict = dataclasses.field(default_factory=dict)
    path: str = ""  # the converted file it was read from (for messages), if any


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:  # arrays, or ShapeDtypeStructs from jax.eval_shape
            out[f"{prefix}{k}"] = v if hasattr(v, "shape") else np.asarray(v)
    return out


def unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def save(path: str | os.PathLike, variables: Mapping[str, Any], meta: Meta) -> None:
    """Writes `variables` ({collection: nested dict of arrays}) atomically with `meta`."""
    from safetensors.numpy import save_file

    # Not np.ascontiguousarray: it turns 0-d arrays into 1-d ones.
    tensors = {k: np.array(v, order="C") for k, v in flatten(variables).items()}
    metadata = {
        "format": FORMAT,
        "kind": meta.kind,
        "config": json.dumps(dict(meta.config), sort_keys=True),
        "source_file": meta.source_file,
        "source_sha256": meta.source_sha256,
        "converter_version": meta.converter_version,
        "extra": json.dumps(meta.extra, sort_keys=True),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def read(path: str | os.PathLike, kind: str | None = None,
         validate_tensors: bool = True) -> tuple[dict[str, Any], Meta]:
    """Reads and validates a converted file; `kind`, if given, must match the file's kind.

    Everything a loader will rely on is checked here, before any network is built: a regular
    file with a bounded safetensors header, known kind, config schema, and every tensor's name,
    shape, dtype and finiteness against `jax.eval_shape` of the network built from the config.
    Any problem is one WeightsError naming the file and the field or tensor. The header and the
    tensors come from one open file (no second open that could meet another file).
    `validate_tensors=False` leaves the config and tensor checks to the caller: a loaded
    network (`loader(kind)`) runs them itself (`load` reads that way, so they run once).
    """
    path = os.fspath(path)
    header, data = _read_file(path)
    meta = _meta(path, _header_metadata(header, path))
    if kind is not None and meta.kind != kind:
        raise WeightsError(f"{path}: holds a '{meta.kind}' network, expected '{kind}'")
    variables = _unflatten_checked(_tensors(data, path), path)
    if validate_tensors:
        validate(variables, meta, path)
    return variables, meta


def _read_file(path: str) -> tuple[bytes, bytes]:
    """(the safetensors header's JSON, the whole file) after checking, on the open file, that it
    is a regular file whose header is bounded and fits in it."""
    try:
        # O_NONBLOCK: should the path be a FIFO, open does not block (fstat then refuses it).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise WeightsError(
            f"weights file not found: {path} (convert an official checkpoint with ports/convert_*.py; "
            "see README 'Weights')") from None
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e.strerror})") from None
    try:
        info = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise WeightsError(f"{path}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(info.st_mode):  # before fdopen, which refuses directories itself
        os.close(fd)
        raise WeightsError(f"{path}: not a regular file")
    try:
        with os.fdopen(fd, "rb") as f:
            head = f.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else -1
            if size < 2 or size > MAX_HEADER_BYTES or size + 8 > info.st_size:
                raise WeightsError(f"{path}: not a converted ifadit-jax weights file (safetensors "
                                   f"header of {size} bytes; at most {MAX_HEADER_BYTES} that fit "
                                   "in the file)")
            header = f.read(size)
            data = head + header + f.read(info.st_size - 8 - size)
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e.strerror})") from None
    return header, data


def _header_metadata(raw: bytes, path: str) -> dict[str, str]:
    """The safetensors header's metadata, after checking the header (depth, JSON, dtypes)."""
    header = _parse_header(raw, path)
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WeightsError(f"{path}: not a converted ifadit-jax weights file (no '{FORMAT}' metadata)")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if dtype not in ("F32", "I32"):
            raise WeightsError(f"{path}: tensor {_printable(name)} has dtype {_printable(str(dtype))}; converted weights are "
                               "float32 (F32), permutations int32 (I32)")
    return metadata


def _parse_header(raw: bytes, path: str) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WeightsError(f"{path}: not a converted ifadit-jax weights file (header is not "
                           "UTF-8)") from None
    if _json_depth(text) > MAX_HEADER_DEPTH:
        raise WeightsError(f"{path}: safetensors header nests deeper than {MAX_HEADER_DEPTH} levels")
    try:
        header = json.loads(text)
    except ValueError:
        raise WeightsError(f"{path}: not a converted ifadit-jax weights file (header is not "
                           "JSON)") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: not a converted ifadit-jax weights file (header is not a "
                           "JSON object)")
    return header


def _json_depth(text: str) -> int:
    """How deep brackets nest in JSON `text`, found without parsing it: no deep nesting ever
    reaches the (recursive) JSON decoder."""
    skeleton = np.frombuffer(_JSON_STRING.sub("", text).encode("utf-8"), np.uint8)
    if not skeleton.size:
        return 0
    opens = np.isin(skeleton, _OPEN).astype(np.int64) - np.isin(skeleton, _CLOSE)
    return int(np.max(np.cumsum(opens)))


def _meta(path: str, metadata: Mapping[str, str]) -> Meta:
    if metadata.get("format") != FORMAT:
        raise WeightsError(f"{path}: not a converted ifadit-jax weights file (no '{FORMAT}' metadata)")
    kind = metadata.get("kind")
    if kind is None:
        raise WeightsError(f"{path}: no 'kind' in the metadata (which network is this?)")
    if kind not in _LOADERS:
        raise WeightsError(f"{path}: unknown network kind {kind[:60]!r}")
    fields = {}
    for name, default in (("config", None), ("extra", "{}")):
        try:
            text = metadata.get(name, default) if default else metadata[name]
            if _json_depth(text) > MAX_CONFIG_DEPTH:
                raise WeightsError(f"{path}: metadata '{name}' nests deeper than {MAX_CONFIG_DEPTH} levels")
            fields[name] = json.loads(text)
        except (KeyError, ValueError):
            raise WeightsError(f"{path}: metadata '{name}' is missing or not JSON") from None
        if not isinstance(fields[name], dict):
            raise WeightsError(f"{path}: metadata '{name}' is not a JSON object")
    return Meta(kind=kind, config=fields["config"], source_file=metadata.get("source_file", ""),
                source_sha256=metadata.get("source_sha256", ""),
                converter_version=metadata.get("converter_version", ""), extra=fields["extra"],
                path=path)


def _tensors(data: bytes, path: str) -> dict[str, np.ndarray]:
    """The tensors of a whole safetensors file `data` (the library checks every offset against
    the buffer). Read-only arrays: views of `data`."""
    from safetensors import SafetensorError
    from safetensors.numpy import load as load_bytes

    try:
        return load_bytes(data)
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise WeightsError(f"{path}: not a converted ifadit-jax weights file ({e})") from None


def _unflatten_checked(flat: Mapping[str, np.ndarray], path: str) -> dict[str, Any]:
    """`unflatten`, refusing names that collide (a tensor both a leaf and a group)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise WeightsError(f"{path}: tensor {_printable(key)} is inside another tensor")
        if leaf in node:
            raise WeightsError(f"{path}: tensor {_printable(key)} is also a group of tensors")
        node[leaf] = value
    return tree


def _printable(text: str) -> str:
    """`text` as is if printable, else quoted with escapes (names from files reach the terminal)."""
    return text if text.isprintable() and len(text) <= 200 else repr(text[:200])


def network_class(kind: str):
    """The loaded-network class of `kind` (its `CONFIG`, `from_weights`)."""
    try:
        target = _LOADERS[kind]
    except KeyError:
        raise WeightsError(f"unknown network kind {kind[:60]!r}") from None
    module_name, name = target.split(":")
    return getattr(importlib.import_module(module_name), name)


def validate(variables: Mapping[str, Any], meta: Meta, what: str | None = None) -> None:
    """Checks `meta.config` against the kind's schema and every tensor against the network built
    from it (see `read`); WeightsError naming `what` (default: the file) and the field or tensor."""
    from ifadit_jax.nets import base

    what = what or meta.path or meta.source_file or f"{meta.kind} weights"
    cls = network_class(meta.kind)
    config = base.parse_config(cls.CONFIG, meta.config, what)
    base.check_against_config(config, variables, what)


def loader(kind: str) -> Callable[[dict, Meta], Any]:
    """The function that turns (variables, meta) of network `kind` into a loaded network
    (validating both)."""
    return network_class(kind).from_weights


def load(path: str | os.PathLike, kind: str | None = None) -> Any:
    """Loads any converted network (of `kind`, if given); what it returns depends on the kind
    stored in the file. Validated once: by the loaded network (`nets.base.Loaded`)."""
    variables, meta = read(path, kind=kind, validate_tensors=False)
    return loader(meta.kind)(variables, meta)


def check_tree(expected: Mapping[str, Any], got: Mapping[str, Any], what: str) -> None:
    """Raises WeightsError naming every missing, extra or misshapen leaf of `got` vs `expected`.

    `expected` leaves may be arrays or `jax.ShapeDtypeStruct`s (from `jax.eval_shape`).
    """
    exp = {k: tuple(v.shape) for k, v in flatten(expected).items()}
    have = {k: tuple(np.shape(v)) for k, v in flatten(got).items()}
    problems = [f"missing {k} {exp[k]}" for k in exp if k not in have]
    problems += [f"unexpected {k} {have[k]}" for k in have if k not in exp]
    problems += [f"{k} has shape {have[k]}, expected {exp[k]}" for k in exp
                 if k in have and have[k] != exp[k]]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise WeightsError(f"{what}: {shown}")
