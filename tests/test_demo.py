"""`make demo` end to end (the built-in default, small batch)."""

import numpy as np
from PIL import Image

from tests.helpers import run_cli


def test_demo_writes_a_labelled_grid(tmp_path):
    out = tmp_path / "grid.png"
    proc = run_cli("-m", "ifadit_jax.demo", "--n", "4", "--out", str(out))
    assert "RANDOM weights" in proc.stdout and "images/s" in proc.stdout
    img = np.asarray(Image.open(out))
    assert img.shape == (24 + 256, 4 * 256, 3)
    assert img[24:].std() > 10  # rendered, not blank


def test_demo_bad_weights_path_is_one_line(tmp_path):
    out = tmp_path / "grid.png"
    proc = run_cli("-m", "ifadit_jax.demo", "--weights", str(tmp_path / "missing.safetensors"),
                   "--out", str(out), check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith("error: weights file not found")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()
