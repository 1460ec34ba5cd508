"""Weights folders: one converted file per role plus `manifest.json`, written and read in one place.

The release converter (`ports/release.py`) and the trainer's export both write through `write`;
`pipeline.load` reads the manifest through `read_manifest`. One weights-id rule for both: the
sha256 of every tensor's name and bytes, role by role (so the id names the numbers, not where
they came from).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import numpy as np

from ifadit_jax import weights
from ifadit_jax.errors import InputError, WeightsError

MANIFEST = "manifest.json"
FORMAT = "ifadit-jax-weights/1"


def weights_id(networks: Mapping[str, tuple[str, Mapping[str, Any], weights.Meta]]) -> str:
    """16 hex digits of the sha256 over each role's tensors (sorted names and raw bytes)."""
    digest = hashlib.sha256()
    for role, (_, variables, _) in sorted(networks.items()):
        digest.update(role.encode())
        for key, arr in sorted(weights.flatten(variables).items()):
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()[:16]


def write(out_dir: str | os.PathLike,
          networks: Mapping[str, tuple[str, Mapping[str, Any], weights.Meta]],
          conventions: str, *, force: bool = False) -> dict:
    """Writes `networks` {role: (file name, variables, meta)} and the manifest as one folder.

    The folder is built beside `out_dir` and renamed into place, so it appears whole or not at
    all. Returns the manifest.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir)
    if not os.path.isdir(parent):
        raise InputError(f"output directory does not exist: {parent}")
    if os.path.exists(out_dir) and not force:
        raise InputError(f"output exists, not overwriting (use --force): {out_dir}")
    tmp = tempfile.mkdtemp(prefix=".tmp-weights-", dir=parent)
    try:
        files = {}
        for role, (name, variables, meta) in sorted(networks.items()):
            weights.save(os.path.join(tmp, name), variables, meta)
            files[role] = {"file": name, "kind": meta.kind, "source_file": meta.source_file,
                           "source_sha256": meta.source_sha256, "config": meta.config}
        manifest = {"format": FORMAT, "conventions": conventions,
                    "weights_id": weights_id(networks), "files": files}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
        return manifest
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def read_manifest(weights_dir: str | os.PathLike) -> dict:
    """Reads `weights_dir/manifest.json` -> the manifest dict; WeightsError if it is not one."""
    weights_dir = os.fspath(weights_dir)
    path = os.path.join(weights_dir, MANIFEST)
    if not os.path.isfile(path):
        raise WeightsError(f"{weights_dir}: not an ifadit-jax weights folder (no {MANIFEST}; make "
                           "one with: python ports/convert_ifadit.py release SRC_DIR OUT_DIR)")
    with open(path) as f:
        return json.load(f)
