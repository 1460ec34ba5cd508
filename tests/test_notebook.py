"""The research notebook (experiments/notebooks/ifadit_walkthrough.py, jupytext percent format)
runs end to end as a script: it converts the fixture checkpoints (official formats, random
weights), anonymizes, recovers, computes metrics and tables, and draws its plots with Pillow."""

import csv
import json

import jax
import numpy as np
from PIL import Image

from tests.helpers import run_cli


def test_walkthrough_notebook_runs_on_the_fixtures(tmp_path):
    env = {"IFADIT_NOTEBOOK_OUT": str(tmp_path),
           "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}
    proc = run_cli("experiments/notebooks/ifadit_walkthrough.py", env=env)
    assert "wrote" in proc.stdout and "conventions 'official'" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["random_weights"] is True and summary["kdf"]["memory_cost"] == 64
    manifest = json.loads((tmp_path / "weights" / "manifest.json").read_text())
    assert summary["weights_id"] == manifest["weights_id"]
    for key in ("cos_anonymized", "cos_recovered", "cos_wrong_key"):
        assert len(summary[key]) == 2 and all(-1 <= v <= 1 for v in summary[key])
    assert all(0 < v <= 180 for v in summary["kffa_3_keys"])  # three different keys
    assert all(0 <= v <= 1 for v in summary["ssim_recovered"]) and all(v >= 0 for v in summary["lpips_recovered"])
    # PSNR and MSE of the same recoveries: PSNR = 10 log10(1 / MSE)
    with open(tmp_path / "tables" / "table3_per_image.csv") as f:
        rows = list(csv.DictReader(f))
    mse = np.array([float(r["rec_mse"]) for r in rows])
    np.testing.assert_allclose([float(r["rec_psnr"]) for r in rows], 10 * np.log10(1 / mse), atol=1e-4)
    md = (tmp_path / "tables" / "table1.md").read_text()
    assert "| skipped |" in md and "AdaFace columns skipped" in md
    assert Image.open(tmp_path / "walkthrough_grid.png").size == (6 * 192, 2 * (192 + 16))
    for name in ("identity_cosines.png", "identity_scatter.png", "tables/table4_samples.png"):
        assert Image.open(tmp_path / name).size[0] > 300
