"""Helpers for tests: fixture paths, official NCHW arrays, and running the real CLIs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


def fixture(name: str) -> Path:
    path = FIXTURES / name
    if not path.exists():
        pytest.fail(f"missing test fixture {path}")
    return path


def load_npz(name: str) -> dict[str, np.ndarray]:
    with np.load(fixture(name)) as d:
        return {k: d[k] for k in d.files}


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.transpose(x, (0, 2, 3, 1))


def run_cli(*args: str, check: bool = True, env: dict | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Runs `python ARGS...` from the repository root, as a user would."""
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("JAX_PLATFORMS", "cpu")
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          env=full_env, input=input, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def load_config(phase: int, arg: str | None = "smoke"):
    """configs/phase{phase}.py's config for `arg` (loaded by path, as the training CLI does)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"cfg{phase}", ROOT / "configs" / f"phase{phase}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def smoke(phase: int, data, arg: str = "smoke", **fields):
    """A smoke training config of `phase` on the images in `data`, 3 checkpoints kept, with
    `fields` set."""
    c = load_config(phase, arg)
    c.data.path = str(data)
    c.keep_checkpoints = 3
    for k, v in fields.items():
        c[k] = v
    return c


def leaves(tree) -> dict[str, np.ndarray]:
    """{key path: leaf} of a pytree, as numpy arrays."""
    import jax

    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def convert(script: str, *args: str, out: Path) -> Path:
    """Runs the real converter CLI `ports/<script>` and returns the written file."""
    run_cli(f"ports/{script}", *args, str(out))
    assert out.exists()
    return out


# Official release file name -> fixture file (random weights in the official formats).
RELEASE_FIXTURES = {
    "attr_best.pth": "ifadit_attr_best.pth",
    "mlp_best.pth": "ifadit_mlp_latent_mapper.pth",
    "G_net_15.pth": "ifadit_inn_G_net.pth",
    "fuse_mlp_15.pth": "ifadit_icl_fusion_mapper10.pth",
    "550000.pt": "ifadit_stylegan2_256_style512.pt",
    "model_ir_se50.pth": "ifadit_model_ir_se50.pth",
    "79999_iter.pth": "bisenet_faceparsing.pth",
}


def small_weights_folder(root: Path) -> Path:
    """A weights folder of the small random fixture networks plus the MTCNN detector, built with
    the real converters (what the anonymize / recover CLIs load) -> root / "weights"."""
    from ports import release

    official = root / "official"
    official.mkdir()
    for name, src in RELEASE_FIXTURES.items():
        os.symlink(fixture(src), official / name)
    release.convert_release(str(official), str(root / "weights"))
    run_cli("ports/convert_mtcnn.py", str(fixture("mtcnn_weights")), str(root / "weights" / "mtcnn.safetensors"))
    return root / "weights"
