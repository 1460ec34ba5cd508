"""Converted weights on disk: one safetensors file per network, with its kind and config.

Layout: tensor names are `collection/path/to/leaf` (e.g. `params/mapping/fc0/kernel`,
`consts/synthesis/b8/conv0/noise_const`); the safetensors metadata holds
`format`, `kind`, `config` (JSON), `source_file`, `source_sha256` and `converter_version`.
`ifadit_jax.load(path)` dispatches on `kind` to the network's own loader.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
from typing import Any, Callable, Mapping

import numpy as np

from ifadit_jax.errors import WeightsError
from ifadit_jax.files import atomic_path

FORMAT = "ifadit-jax/1"

# kind -> "module:function"; the function takes (variables, meta) and returns the loaded network.
# Imported lazily so `ifadit_jax.load` of one network does not import every other one.
_LOADERS: dict[str, str] = {
    "stylegan2": "ifadit_jax.nets.stylegan2:from_weights",
    "sif": "ifadit_jax.flow:from_weights",
    "latent_mapper": "ifadit_jax.nets.mappers:latent_mapper_from_weights",
    "icl": "ifadit_jax.nets.mappers:icl_from_weights",
    "arcface": "ifadit_jax.nets.arcface:from_weights",
    "psp_encoder": "ifadit_jax.nets.psp:from_weights",
    "bisenet": "ifadit_jax.nets.bisenet:from_weights",
    "mobilefacenet": "ifadit_jax.nets.mobilefacenet:from_weights",
    "lpips": "ifadit_jax.nets.lpips:from_weights",
    "mtcnn": "ifadit_jax.nets.mtcnn:from_weights",
    "adaface": "ifadit_jax.nets.adaface:from_weights",
    "inception": "ifadit_jax.nets.inception:from_weights",
}


@dataclasses.dataclass(frozen=True)
class Meta:
    kind: str
    config: dict
    source_file: str = ""
    source_sha256: str = ""
    converter_version: str = ""
    extra: dict = dataclasses.field(default_factory=dict)


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
        "config": json.dumps(meta.config, sort_keys=True),
        "source_file": meta.source_file,
        "source_sha256": meta.source_sha256,
        "converter_version": meta.converter_version,
        "extra": json.dumps(meta.extra, sort_keys=True),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def read(path: str | os.PathLike, kind: str | None = None) -> tuple[dict[str, Any], Meta]:
    """Reads a converted file; `kind`, if given, must match the file's kind."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(
            f"weights file not found: {path} (convert an official checkpoint with ports/convert_*.py; "
            "see README 'Weights')")
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a converted ifadit-jax weights file ({e})") from None
    if metadata.get("format") != FORMAT:
        raise WeightsError(f"{path}: not a converted ifadit-jax weights file (no '{FORMAT}' metadata)")
    meta = Meta(
        kind=metadata["kind"],
        config=json.loads(metadata["config"]),
        source_file=metadata.get("source_file", ""),
        source_sha256=metadata.get("source_sha256", ""),
        converter_version=metadata.get("converter_version", ""),
        extra=json.loads(metadata.get("extra", "{}")),
    )
    if kind is not None and meta.kind != kind:
        raise WeightsError(f"{path}: holds a '{meta.kind}' network, expected '{kind}'")
    return unflatten(flat), meta


def loader(kind: str) -> Callable[[dict, Meta], Any]:
    """The function that turns (variables, meta) of network `kind` into a loaded network."""
    try:
        target = _LOADERS[kind]
    except KeyError:
        raise WeightsError(f"unknown network kind '{kind}'") from None
    module_name, fn_name = target.split(":")
    return getattr(importlib.import_module(module_name), fn_name)


def load(path: str | os.PathLike) -> Any:
    """Loads any converted network; what it returns depends on the kind stored in the file."""
    variables, meta = read(path)
    try:
        fn = loader(meta.kind)
    except WeightsError:
        raise WeightsError(f"{path}: unknown network kind '{meta.kind}'") from None
    return fn(variables, meta)


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
