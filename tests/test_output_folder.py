"""A read-only output folder through the real command lines: one `error:` line, exit 4, before
any weights are read, nothing written.

A real read-only file system (a tmpfs mounted `ro` in a private mount namespace of the command's
process, via util-linux `unshare`): permission bits would not do, since root (CI's user) writes
through them. Where no mount namespace can be made, the test is skipped."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ROOT


def run_on_read_only(folder, *args):
    """`python ARGS` with `folder` replaced by an empty read-only file system for that process
    only (the mount vanishes with it)."""
    if shutil.which("unshare") is None:
        pytest.skip("util-linux unshare not installed")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no mount namespaces here (unprivileged user namespaces disabled)")
    script = 'mount -t tmpfs -o ro,size=1m tmpfs "$0" && exec "$@"'
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, str(folder), sys.executable, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "HOME": "/nonexistent"})


@pytest.fixture
def photo(tmp_path):
    p = tmp_path / "in" / "a.png"
    p.parent.mkdir()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(p)
    return p


@pytest.mark.parametrize("layout", ["file", "folder", "subfolder"])
def test_read_only_output_folder_is_refused_before_any_work(tmp_path, photo, layout):
    out = tmp_path / "out"
    out.mkdir()
    secret = tmp_path / "s.txt"
    secret.write_text("a secret")
    src, dst = {"file": (photo, out / "a.png"), "folder": (photo.parent, out),
                "subfolder": (photo.parent, out / "new")}[layout]
    proc = run_on_read_only(out, "-m", "ifadit_jax.anonymize", str(src), str(dst),
                            "--weights", str(tmp_path / "no-weights-here"), "--secret-file", str(secret))
    assert proc.returncode == 4, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "writ" in lines[0] and "no-weights-here" not in lines[0]  # refused before the weights
    assert list(out.iterdir()) == []  # the real folder below the mount is untouched too
