"""`make demo` end to end on its built-in default (small random-weight networks, real photo)."""

import numpy as np
from PIL import Image

from tests.helpers import run_cli


def test_demo_writes_the_grid_and_reports(tmp_path):
    out = tmp_path / "demo.png"
    proc = run_cli("-m", "ifadit_jax.demo", "--out", str(out), "--kdf-memory-kib", "64")
    assert "RANDOM weights" in proc.stdout
    assert "anonymize+recover per second" in proc.stdout
    cosines = [line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert len(cosines) == 5 and all(-1 <= float(c) <= 1 for c in cosines)
    img = np.asarray(Image.open(out))
    assert img.shape == (22 + 256 + 16, 6 * 256, 3)
    original, anonymized = img[22:278, :256].astype(int), img[22:278, 256:512].astype(int)
    assert np.abs(original - anonymized).max() > 50  # the face changed
    # Far from the face (bottom-left corner) nothing changed.
    assert np.abs(original[200:, :60] - anonymized[200:, :60]).max() <= 2


def test_demo_bad_weights_folder_is_one_line(tmp_path):
    out = tmp_path / "demo.png"
    proc = run_cli("-m", "ifadit_jax.demo", "--weights", str(tmp_path), "--out", str(out), check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "manifest.json" in lines[0]
    assert not out.exists()
