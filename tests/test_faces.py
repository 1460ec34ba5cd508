"""The anonymize / recover command lines: aligned faces, folders, in-the-wild photos, sidecars,
secrets, and bad input."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from ifadit_jax import faces, imageio, keys
from ifadit_jax.errors import InputError, NoFaceError, SecretError, WeightsError
from tests.helpers import fixture, run_cli
from tests.test_pipeline import make_release_dir

SECRET = "tr0ub4dor&3-unique-marker"
# Fast KDF for tests: Argon2id's minimum useful cost; the CLI default is >= 50 ms.
FAST_KDF = ["--kdf-memory-kib", "64", "--kdf-iterations", "1"]


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    from ports import release

    release.convert_release(str(make_release_dir(root / "official")), str(root / "weights"))
    run_cli("ports/convert_mtcnn.py", str(fixture("mtcnn_weights")), str(root / "weights" / "mtcnn.safetensors"))
    return root / "weights"


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("secret") / "secret.txt"
    p.write_text(SECRET + "\n")
    return p


def aligned_face(path, seed=0):
    """A smooth synthetic 256x256 image (no detector needed in --aligned mode)."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(size=(8, 8, 3))
    img = Image.fromarray((small * 255).astype(np.uint8)).resize((256, 256), Image.BILINEAR)
    img.save(path)
    return path


def anon(*args):
    return faces.anonymize_main([str(a) for a in args])


def rec(*args):
    return faces.recover_main([str(a) for a in args])


def test_aligned_round_trip_and_sidecar(tmp_path, weights_dir, secret_file):
    src = aligned_face(tmp_path / "face.png")
    out, back = tmp_path / "anon.png", tmp_path / "rec.png"
    assert anon(src, out, "--weights", weights_dir, "--aligned", "--secret-file", secret_file, *FAST_KDF) == 0
    side = json.loads((tmp_path / "anon.png.json").read_text())
    assert side["mode"] == "aligned" and side["key"]["path"] == "kdf"
    assert side["key"]["kdf"]["memory_cost"] == 64 and side["weights_id"]
    assert rec(out, back, "--weights", weights_dir, "--aligned", "--secret-file", secret_file) == 0
    a, b, c = (imageio.read_rgb(p) for p in (src, out, back))
    assert a.shape == b.shape == c.shape == (256, 256, 3)
    assert np.abs(a - b).max() > 0.05  # something changed
    # The recovered image is what the pipeline gives for the anonymized file and the same key.
    from ifadit_jax import pipeline

    pipe = pipeline.load(weights_dir)
    k = pipe.key_from_secret(SECRET.encode(), keys.KdfParams.from_dict(side["key"]["kdf"]))
    want, _ = pipe.recover(b[None], k)
    assert np.abs(imageio.to_uint8(want[0]).astype(int) - imageio.to_uint8(c).astype(int)).max() <= 1


def test_photo_mode_detects_aligns_and_pastes_back(tmp_path, weights_dir, secret_file):
    photo = fixture("mtcnn_images/astronaut.png")
    out = tmp_path / "anon.png"
    assert anon(photo, out, "--weights", weights_dir, "--secret-file", secret_file, *FAST_KDF) == 0
    side = json.loads((tmp_path / "anon.png.json").read_text())
    assert side["mode"] == "photo" and len(side["faces"]) == 1
    box = np.array(side["faces"][0]["box"])
    a, b = imageio.read_rgb(photo), imageio.read_rgb(out)
    changed = np.abs(a - b).max(axis=2) > 2 / 255
    ys, xs = np.nonzero(changed)
    # Only the face changed: every changed pixel lies near the detected box.
    w, h = box[2] - box[0], box[3] - box[1]
    assert xs.min() > box[0] - w and xs.max() < box[2] + w
    assert ys.min() > box[1] - h and ys.max() < box[3] + h
    assert changed[int(box[1]):int(box[3]), int(box[0]):int(box[2])].mean() > 0.3
    assert not changed[:, :100].any() and not changed[400:].any()
    back = tmp_path / "rec.png"
    assert rec(out, back, "--weights", weights_dir, "--secret-file", secret_file) == 0
    assert imageio.read_rgb(back).shape == a.shape


def test_folder_mirrors_the_tree_and_resumes(tmp_path, weights_dir, secret_file):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    aligned_face(src / "a.png", 1)
    aligned_face(src / "sub" / "b.jpg", 2)
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert anon(src, out, "--weights", weights_dir, "--aligned", "--secret-file", secret_file,
                "--batch", "2", *FAST_KDF) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "a.png", "a.png.json", "sub", "sub/b.png", "sub/b.png.json"]
    before = (out / "a.png").stat().st_mtime_ns
    # A second run skips finished outputs (resumable) and leaves them alone.
    assert anon(src, out, "--weights", weights_dir, "--aligned", "--secret-file", secret_file, *FAST_KDF) == 0
    assert (out / "a.png").stat().st_mtime_ns == before
    back = tmp_path / "back"
    assert rec(out, back, "--weights", weights_dir, "--aligned", "--secret-file", secret_file) == 0
    assert (back / "sub" / "b.png").exists()


def _save(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path)
    return path


@pytest.mark.parametrize("case,error", [
    ("text", "cannot read image"),
    ("gray", "grayscale"),
    ("rgba", "RGBA"),
    ("16bit", "16-bit"),
    ("wrong_size", "aligned input must be 256x256"),
])
def test_bad_images_are_refused_and_nothing_is_written(tmp_path, weights_dir, secret_file, case, error):
    src = tmp_path / "in.png"
    if case == "text":
        src.write_text("hello")
    elif case == "gray":
        _save(src, np.zeros((256, 256), np.uint8))
    elif case == "rgba":
        _save(src, np.zeros((256, 256, 4), np.uint8))
    elif case == "16bit":
        Image.fromarray(np.zeros((256, 256), np.uint16)).save(src)
    else:
        _save(src, np.zeros((200, 256, 3), np.uint8))
    original = src.read_bytes()
    out = tmp_path / "out.png"
    with pytest.raises(InputError, match=error):
        anon(src, out, "--weights", weights_dir, "--aligned", "--secret-file", secret_file, *FAST_KDF)
    assert not out.exists() and not (tmp_path / "out.png.json").exists()
    assert src.read_bytes() == original


def test_no_face_and_tiny_photo(tmp_path, weights_dir, secret_file):
    gray = _save(tmp_path / "gray.png", np.full((300, 300, 3), 128, np.uint8))
    with pytest.raises(NoFaceError, match="no face found"):
        anon(gray, tmp_path / "o.png", "--weights", weights_dir, "--secret-file", secret_file, *FAST_KDF)
    tiny = _save(tmp_path / "tiny.png", np.full((10, 10, 3), 128, np.uint8))
    with pytest.raises(InputError, match="smaller than"):
        anon(tiny, tmp_path / "o.png", "--weights", weights_dir, "--secret-file", secret_file, *FAST_KDF)
    assert not (tmp_path / "o.png").exists()


def test_empty_secret_and_secret_on_argv(tmp_path, weights_dir):
    src = aligned_face(tmp_path / "face.png")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SecretError, match="empty"):
        anon(src, tmp_path / "o.png", "--weights", weights_dir, "--aligned", "--secret-file", empty)
    with pytest.raises(SecretError, match="command line"):
        anon(src, tmp_path / "o.png", "--weights", weights_dir, "--aligned", "--secret", SECRET)
    assert not (tmp_path / "o.png").exists()


def test_existing_output_is_kept_without_force(tmp_path, weights_dir, secret_file):
    src = aligned_face(tmp_path / "face.png")
    out = tmp_path / "out.png"
    out.write_bytes(b"keep me")
    with pytest.raises(InputError, match="--force"):
        anon(src, out, "--weights", weights_dir, "--aligned", "--secret-file", secret_file, *FAST_KDF)
    assert out.read_bytes() == b"keep me"
    with pytest.raises(InputError, match="overwrite the input"):
        anon(src, src, "--weights", weights_dir, "--aligned", "--secret-file", secret_file, "--force")


def test_missing_detector_weights(tmp_path, weights_dir, secret_file):
    partial = tmp_path / "w"
    partial.mkdir()
    for f in weights_dir.iterdir():
        if f.name != "mtcnn.safetensors":
            os.symlink(f, partial / f.name)
    with pytest.raises(WeightsError, match="convert_mtcnn.py"):
        anon(fixture("mtcnn_images/astronaut.png"), tmp_path / "o.png", "--weights", partial,
             "--secret-file", secret_file, *FAST_KDF)


def test_cli_one_line_exit_codes_and_no_secret_anywhere(tmp_path, weights_dir):
    """Through the real command line: the secret from an environment variable never appears in
    stdout, stderr or any file written; bad input is one line with its own exit code."""
    src = aligned_face(tmp_path / "face.png")
    out = tmp_path / "out" / "anon.png"
    out.parent.mkdir()
    env = {"IFADIT_SECRET": SECRET}
    proc = run_cli("-m", "ifadit_jax.anonymize", str(src), str(out), "--weights", str(weights_dir),
                   "--aligned", "--secret-env", "IFADIT_SECRET", *FAST_KDF, env=env)
    proc2 = run_cli("-m", "ifadit_jax.recover", str(out), str(tmp_path / "out" / "rec.png"),
                    "--weights", str(weights_dir), "--aligned", "--secret-env", "IFADIT_SECRET", env=env)
    for text in (proc.stdout, proc.stderr, proc2.stdout, proc2.stderr):
        assert SECRET not in text
    for p in (tmp_path / "out").iterdir():
        assert SECRET.encode() not in p.read_bytes(), p
    gray = _save(tmp_path / "gray.png", np.full((300, 300, 3), 128, np.uint8))
    bad = run_cli("-m", "ifadit_jax.anonymize", str(gray), str(tmp_path / "x.png"), "--weights",
                  str(weights_dir), "--secret-env", "IFADIT_SECRET", *FAST_KDF, env=env, check=False)
    assert bad.returncode == NoFaceError.exit_code
    assert bad.stderr.strip().splitlines() == [f"error: {gray}: no face found"]
    assert SECRET not in bad.stderr and not (tmp_path / "x.png").exists()
