"""The anonymize / recover command lines: aligned faces, folders, in-the-wild photos, sidecars,
secrets, paths that must not be overwritten, and bad input."""

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ifadit_jax import commands, imageio, keys, sidecar
from ifadit_jax.errors import InputError, NoFaceError, SecretError, WeightsError
from tests.helpers import ROOT, fixture, run_cli, xla_env

SECRET = "tr0ub4dor&3-unique-marker"
# Fast KDF for tests: Argon2id's minimum useful cost; the CLI default is >= 50 ms.
FAST_KDF = ["--kdf-memory-kib", "64", "--kdf-iterations", "1"]


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("secret") / "secret.txt"
    p.write_text(SECRET + "\n")
    return p


@pytest.fixture(scope="module")
def other_secret(tmp_path_factory):
    p = tmp_path_factory.mktemp("secret2") / "other.txt"
    p.write_text("a different secret")
    return p


def aligned_face(path, seed=0):
    """A smooth synthetic 256x256 image (no detector needed in --aligned mode)."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(size=(8, 8, 3))
    img = Image.fromarray((small * 255).astype(np.uint8)).resize((256, 256), Image.BILINEAR)
    img.save(path)
    return path


def anon(*args):
    return commands.anonymize_main([str(a) for a in args] + ["--quiet"])


def rec(*args):
    return commands.recover_main([str(a) for a in args] + ["--quiet"])


def test_aligned_round_trip_and_sidecar_holds_no_names(tmp_path, release_weights, secret_file):
    src = aligned_face(tmp_path / "Tom_Hanks_54745.png")
    out, back = tmp_path / "anon.png", tmp_path / "rec.png"
    assert anon(src, out, "--weights", release_weights, "--aligned", "--secret-file", secret_file, *FAST_KDF) == 0
    text = (tmp_path / "anon.png.json").read_text()
    side = json.loads(text)
    assert sorted(side) == sorted(["format", "conventions", "weights_id", "key", "refine", "mode",
                                   "size", "faces"])
    assert "Tom_Hanks" not in text and str(tmp_path) not in text
    assert side["mode"] == "aligned" and side["key"]["path"] == "kdf" and side["faces"] == []
    assert side["key"]["kdf"]["memory_cost"] == 64 and "check" not in side["key"]
    assert rec(out, back, "--weights", release_weights, "--secret-file", secret_file) == 0
    back_side = json.loads((tmp_path / "rec.png.json").read_text())
    assert sorted(back_side) == ["format", "mode", "weights_id"]
    a, b, c = (imageio.read_rgb(p) for p in (src, out, back))
    assert a.shape == b.shape == c.shape == (256, 256, 3)
    assert np.abs(a - b).max() > 0.05  # something changed
    # The recovered image is what the pipeline gives for the anonymized file and the same key.
    from ifadit_jax import pipeline

    pipe = pipeline.load(release_weights)
    k = pipe.key_from_secret(SECRET.encode(), keys.KdfParams.from_dict(side["key"]["kdf"]))
    want, _ = pipe.recover(b[None], k)
    assert np.abs(imageio.to_uint8(want[0]).astype(int) - imageio.to_uint8(c).astype(int)).max() <= 1


def test_photo_mode_detects_aligns_and_pastes_back(tmp_path, release_weights, secret_file):
    photo = fixture("mtcnn_images/astronaut.png")
    out = tmp_path / "anon.png"
    assert anon(photo, out, "--weights", release_weights, "--secret-file", secret_file, *FAST_KDF) == 0
    side = json.loads((tmp_path / "anon.png.json").read_text())
    assert side["mode"] == "photo" and len(side["faces"]) == 1
    assert sorted(side["faces"][0]) == ["box", "transform"]
    box = np.array(side["faces"][0]["box"])
    a, b = imageio.read_rgb(photo), imageio.read_rgb(out)
    assert side["size"] == list(a.shape[:2])
    changed = np.abs(a - b).max(axis=2) > 2 / 255
    ys, xs = np.nonzero(changed)
    # Only the face changed: every changed pixel lies near the detected box.
    w, h = box[2] - box[0], box[3] - box[1]
    assert xs.min() > box[0] - w and xs.max() < box[2] + w
    assert ys.min() > box[1] - h and ys.max() < box[3] + h
    assert changed[int(box[1]):int(box[3]), int(box[0]):int(box[2])].mean() > 0.3
    assert not changed[:, :100].any() and not changed[400:].any()
    back = tmp_path / "rec.png"
    assert rec(out, back, "--weights", release_weights, "--secret-file", secret_file) == 0
    assert imageio.read_rgb(back).shape == a.shape
    # A face smaller than --min-face-size is not a face.
    with pytest.raises(NoFaceError):
        anon(photo, tmp_path / "none.png", "--weights", release_weights, "--secret-file", secret_file,
             "--min-face-size", "400", *FAST_KDF)


def test_folder_mirrors_the_tree_resumes_and_cleans_up(tmp_path, release_weights, secret_file):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    aligned_face(src / "a.png", 1)
    aligned_face(src / "sub" / "b.jpg", 2)
    aligned_face(src / ".tmp-ifadit-partial.png", 3)  # a killed run's leftover: never an input
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert anon(src, out, "--weights", release_weights, "--aligned", "--secret-file", secret_file,
                "--batch", "2", *FAST_KDF) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "a.png", "a.png.json", "sub", "sub/b.png", "sub/b.png.json"]
    mode = 0o666 & ~_umask()
    assert (out / "a.png").stat().st_mode & 0o777 == mode
    before = (out / "a.png").stat().st_mtime_ns
    (out / ".tmp-ifadit-killed.png").write_bytes(b"partial")
    # A second run skips finished outputs (resumable), leaves them alone, removes leftovers.
    assert anon(src, out, "--weights", release_weights, "--aligned", "--secret-file", secret_file, *FAST_KDF) == 0
    assert (out / "a.png").stat().st_mtime_ns == before
    assert not (out / ".tmp-ifadit-killed.png").exists()
    # Other KDF settings or another secret (with key checks) must not be mixed into the folder.
    with pytest.raises(InputError, match="other key settings"):
        anon(src, out, "--weights", release_weights, "--aligned", "--secret-file", secret_file,
             "--kdf-memory-kib", "128", "--kdf-iterations", "1")
    back = tmp_path / "back"
    os.unlink(out / "sub" / "b.png.json")  # one bad item: listed, the others recovered
    assert rec(out, back, "--weights", release_weights, "--secret-file", secret_file) == InputError.exit_code
    assert (back / "a.png").exists() and not (back / "sub" / "b.png").exists()


def _umask():
    m = os.umask(0o022)
    os.umask(m)
    return m


def test_key_check_says_wrong_secret_and_guards_a_resumed_folder(tmp_path, release_weights, secret_file,
                                                                 other_secret):
    src = tmp_path / "in"
    src.mkdir()
    aligned_face(src / "a.png", 1)
    out = tmp_path / "out"
    assert anon(src, out, "--weights", release_weights, "--aligned", "--secret-file", secret_file,
                "--key-check", *FAST_KDF) == 0
    check = json.loads((out / "a.png.json").read_text())["key"]["check"]
    assert len(check) == 16 and SECRET not in check
    aligned_face(src / "b.png", 2)
    with pytest.raises(SecretError, match="different secret"):
        anon(src, out, "--weights", release_weights, "--aligned", "--secret-file", other_secret,
             "--key-check", *FAST_KDF)
    assert not (out / "b.png").exists()
    with pytest.raises(SecretError, match="wrong secret"):
        rec(out / "a.png", tmp_path / "r.png", "--weights", release_weights, "--secret-file", other_secret)
    assert not (tmp_path / "r.png").exists()


def _save(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path)
    return path


@pytest.mark.parametrize("case,error", [
    ("text", "cannot read image"),
    ("wrong_size", "aligned input must be 256x256"),
])
def test_bad_images_are_refused_and_nothing_is_written(tmp_path, release_weights, secret_file, case, error):
    src = tmp_path / "in.png"
    if case == "text":
        src.write_text("hello")
    else:
        _save(src, np.zeros((200, 256, 3), np.uint8))
    original = src.read_bytes()
    out = tmp_path / "out.png"
    with pytest.raises(InputError, match=error):
        anon(src, out, "--weights", release_weights, "--aligned", "--secret-file", secret_file, *FAST_KDF)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]
    assert src.read_bytes() == original


def test_grayscale_with_alpha_keeps_its_kind(tmp_path, release_weights, secret_file):
    rgb = np.asarray(Image.open(aligned_face(tmp_path / "rgb.png")).convert("L"))
    alpha = np.tile(np.arange(256, dtype=np.uint8), (256, 1))
    src = tmp_path / "la.png"
    Image.merge("LA", (Image.fromarray(rgb), Image.fromarray(alpha))).save(src)
    out = tmp_path / "out.png"
    assert anon(src, out, "--weights", release_weights, "--aligned", "--secret-file", secret_file, *FAST_KDF) == 0
    with Image.open(out) as im:
        assert im.mode == "LA"
        np.testing.assert_array_equal(np.asarray(im.getchannel("A")), alpha)


def test_no_face_policy_and_tiny_photo(tmp_path, release_weights, secret_file):
    gray = _save(tmp_path / "gray.png", np.full((300, 300, 3), 128, np.uint8))
    with pytest.raises(NoFaceError, match="no face found"):
        anon(gray, tmp_path / "o.png", "--weights", release_weights, "--secret-file", secret_file, *FAST_KDF)
    assert anon(gray, tmp_path / "skip.png", "--weights", release_weights, "--secret-file", secret_file,
                "--no-face", "skip", *FAST_KDF) == 0
    assert not (tmp_path / "skip.png").exists()
    assert anon(gray, tmp_path / "copy.png", "--weights", release_weights, "--secret-file", secret_file,
                "--no-face", "copy", *FAST_KDF) == 0
    np.testing.assert_array_equal(imageio.read_rgb(tmp_path / "copy.png"), imageio.read_rgb(gray))
    assert json.loads((tmp_path / "copy.png.json").read_text())["faces"] == []
    tiny = _save(tmp_path / "tiny.png", np.full((10, 10, 3), 128, np.uint8))
    with pytest.raises(InputError, match="smaller than"):
        anon(tiny, tmp_path / "o.png", "--weights", release_weights, "--secret-file", secret_file, *FAST_KDF)
    assert not (tmp_path / "o.png").exists()


def test_empty_secret_and_secret_on_argv(tmp_path, release_weights):
    src = aligned_face(tmp_path / "face.png")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SecretError, match="empty"):
        anon(src, tmp_path / "o.png", "--weights", release_weights, "--aligned", "--secret-file", empty, *FAST_KDF)
    with pytest.raises(SecretError, match="command line"):
        anon(src, tmp_path / "o.png", "--weights", release_weights, "--aligned", "--secret", SECRET)
    assert not (tmp_path / "o.png").exists()


def test_force_replaces_only_our_outputs(tmp_path, release_weights, secret_file, monkeypatch):
    src = aligned_face(tmp_path / "face.png")
    out = tmp_path / "out.png"
    out.write_bytes(b"keep me")
    for force in ([], ["--force"]):
        with pytest.raises(InputError, match="not written by ifadit-jax"):
            anon(src, out, "--weights", release_weights, "--aligned", "--secret-file", secret_file, *force, *FAST_KDF)
    assert out.read_bytes() == b"keep me"
    ours = tmp_path / "ours.png"
    assert anon(src, ours, "--weights", release_weights, "--aligned", "--secret-file", secret_file, *FAST_KDF) == 0
    with pytest.raises(InputError, match="--force"):
        anon(src, ours, "--weights", release_weights, "--aligned", "--secret-file", secret_file, *FAST_KDF)
    assert anon(src, ours, "--weights", release_weights, "--aligned", "--secret-file", secret_file,
                "--force", *FAST_KDF) == 0
    # A replacement whose image cannot be written leaves the pair as it was: the sidecar is not
    # rewritten (its new record would say refine: false) and no temporary file stays.
    pair = {p: p.read_bytes() for p in (ours, tmp_path / "ours.png.json")}

    def disk_full(*args, **kwargs):
        raise InputError("disk full")

    monkeypatch.setattr(imageio, "write_rgb", disk_full)
    with pytest.raises(InputError, match="disk full"):
        anon(src, ours, "--weights", release_weights, "--aligned", "--secret-file", secret_file,
             "--force", "--no-refine", *FAST_KDF)
    assert {p: p.read_bytes() for p in pair} == pair
    assert sorted(os.listdir(tmp_path)) == ["face.png", "ours.png", "ours.png.json", "out.png"]


def test_paths_are_compared_after_resolving_symlinks(tmp_path, release_weights, secret_file):
    photos = tmp_path / "photos"
    photos.mkdir()
    aligned_face(photos / "a.png", 1)
    original = (photos / "a.png").read_bytes()
    args = ("--weights", release_weights, "--aligned", "--secret-file", secret_file, "--force", *FAST_KDF)
    os.symlink(photos, tmp_path / "link")
    with pytest.raises(InputError, match="must not be the input folder"):
        anon(photos, tmp_path / "link", *args)
    with pytest.raises(InputError, match="must not be the input folder"):
        anon(photos, tmp_path / "link" / "out", *args)
    os.symlink(photos / "a.png", tmp_path / "same.png")
    with pytest.raises(InputError, match="overwrite the input"):
        anon(photos / "a.png", tmp_path / "same.png", *args)
    assert (photos / "a.png").read_bytes() == original
    assert sorted(p.name for p in photos.iterdir()) == ["a.png"]


def test_same_stem_collisions_are_listed_up_front(tmp_path, release_weights, secret_file):
    src = tmp_path / "in"
    src.mkdir()
    aligned_face(src / "a.jpg", 1)
    aligned_face(src / "a.png", 2)
    with pytest.raises(InputError, match="written twice") as e:
        anon(src, tmp_path / "out", "--weights", release_weights, "--aligned", "--secret-file", secret_file, *FAST_KDF)
    assert "a.jpg" in str(e.value) and "a.png" in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit,field", [
    (lambda s: s.update(size=[300, 256]), "size"),
    (lambda s: s["key"]["kdf"].update(memory_cost=3 * 1024 * 1024), "memory_cost"),
    (lambda s: s.update(source="Tom_Hanks.png"), "unknown field"),
    (lambda s: s.update(refine="yes"), "refine"),
])
def test_recover_refuses_a_bad_sidecar_before_any_network_runs(tmp_path, release_weights, secret_file, edit, field):
    src = aligned_face(tmp_path / "face.png")
    out = tmp_path / "anon.png"
    assert anon(src, out, "--weights", release_weights, "--aligned", "--secret-file", secret_file, *FAST_KDF) == 0
    side = json.loads((tmp_path / "anon.png.json").read_text())
    edit(side)
    (tmp_path / "anon.png.json").write_text(json.dumps(side))
    with pytest.raises(sidecar.SidecarError, match=field):
        rec(out, tmp_path / "rec.png", "--weights", release_weights, "--secret-file", secret_file)
    assert not (tmp_path / "rec.png").exists()


def test_recover_refuses_a_fifo_sidecar_without_blocking(tmp_path, release_weights, secret_file):
    src = aligned_face(tmp_path / "anon.png")
    os.mkfifo(tmp_path / "anon.png.json")
    with pytest.raises(sidecar.SidecarError, match="not a regular file"):
        rec(src, tmp_path / "rec.png", "--weights", release_weights, "--secret-file", secret_file)
    os.unlink(tmp_path / "anon.png.json")
    os.symlink("/dev/zero", tmp_path / "anon.png.json")
    with pytest.raises(sidecar.SidecarError, match="not a regular file"):
        rec(src, tmp_path / "rec.png", "--weights", release_weights, "--secret-file", secret_file)


def test_recover_has_no_aligned_flag(tmp_path, release_weights, secret_file):
    """The mode comes from each sidecar; `--aligned` is refused, not silently ignored."""
    with pytest.raises(SystemExit) as e:
        rec(tmp_path / "a.png", tmp_path / "b.png", "--weights", release_weights, "--aligned",
            "--secret-file", secret_file)
    assert e.value.code == 2


def test_missing_detector_weights(tmp_path, release_weights, secret_file):
    partial = tmp_path / "w"
    partial.mkdir()
    for f in release_weights.iterdir():
        if f.name != "mtcnn.safetensors":
            os.symlink(f, partial / f.name)
    with pytest.raises(WeightsError, match="convert_mtcnn.py"):
        anon(fixture("mtcnn_images/astronaut.png"), tmp_path / "o.png", "--weights", partial,
             "--secret-file", secret_file, *FAST_KDF)


def test_cli_one_line_exit_codes_and_no_secret_anywhere(tmp_path, release_weights):
    """Through the real command line: the secret from an environment variable never appears in
    stdout, stderr or any file written; success prints the output path; a lossy output warns;
    bad input is one line with its own exit code."""
    src = aligned_face(tmp_path / "face.png")
    out = tmp_path / "out" / "anon.jpg"
    out.parent.mkdir()
    env = {"IFADIT_SECRET": SECRET}
    proc = run_cli("-m", "ifadit_jax.anonymize", str(src), str(out), "--weights", str(release_weights),
                   "--aligned", "--secret-env", "IFADIT_SECRET", *FAST_KDF, env=env)
    assert proc.stdout.strip() == str(out)
    assert "lossy" in proc.stderr and "recovery" in proc.stderr
    back = tmp_path / "out" / "rec.png"
    proc2 = run_cli("-m", "ifadit_jax.recover", str(out), str(back), "--weights", str(release_weights),
                    "--secret-env", "IFADIT_SECRET", "--quiet", env=env)
    assert proc2.stdout == "" and back.exists()
    for text in (proc.stdout, proc.stderr, proc2.stdout, proc2.stderr):
        assert SECRET not in text
    for p in (tmp_path / "out").iterdir():
        assert SECRET.encode() not in p.read_bytes(), p
    folder = tmp_path / "photos"
    folder.mkdir()
    _save(folder / "gray.png", np.full((300, 300, 3), 128, np.uint8))
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    bad = run_cli("-m", "ifadit_jax.anonymize", str(folder), str(tmp_path / "x"), "--weights",
                  str(release_weights), "--secret-env", "IFADIT_SECRET", *FAST_KDF, env=env, check=False)
    assert bad.returncode == InputError.exit_code, bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)
    assert lines[0].startswith(f"error: {folder / 'broken.jpg'}: cannot read image")
    assert lines[1] == f"error: {folder / 'gray.png'}: no face found"
    assert lines[2] == "error: 2 of 2 files failed, nothing written for them"
    assert SECRET not in bad.stderr and not list((tmp_path / "x").glob("*.png"))


@pytest.mark.parametrize("extra,env,code,text", [
    (["--secret", SECRET], {}, 6, "command line"),
    (["--kdf-memory-kib", "4294967296", "--secret-env", "S"], {}, 4, "memory_cost"),
    (["--kdf-memory-kib", str(2 * 1024 * 1024), "--secret-env", "S"], {}, 4, "cap"),
    (["--kdf-iterations", "0", "--secret-env", "S"], {}, 4, "iterations"),
])
def test_refused_before_anything_loads(tmp_path, extra, env, code, text):
    """Bad secrets and KDF costs are refused before the weights load: the weights folder given
    does not even exist, yet the error is about the flag."""
    src = aligned_face(tmp_path / "face.png")
    proc = run_cli("-m", "ifadit_jax.anonymize", str(src), str(tmp_path / "o.png"), "--weights",
                   str(tmp_path / "no-weights"), "--aligned", *extra, env=env, check=False)
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0]
    assert SECRET not in proc.stderr and not (tmp_path / "o.png").exists()


def test_non_utf8_secret_env_is_one_line(tmp_path, release_weights):
    src = aligned_face(tmp_path / "face.png")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    envb = {k.encode(): v.encode() for k, v in env.items()}
    envb[b"IFADIT_SECRET"] = b"\xff\xfesecret"
    proc = subprocess.run([sys.executable, "-m", "ifadit_jax.anonymize", str(src), str(tmp_path / "o.png"),
                           "--weights", str(release_weights), "--aligned", "--secret-env", "IFADIT_SECRET",
                           *FAST_KDF], cwd=ROOT, env=envb, capture_output=True, text=True, timeout=600)
    assert proc.returncode == SecretError.exit_code
    assert proc.stderr.strip().splitlines() == ["error: the environment variable IFADIT_SECRET is not valid UTF-8"]


def test_version_and_help(tmp_path):
    proc = run_cli("-m", "ifadit_jax.recover", "--version")
    assert proc.stdout.split()[-1][0].isdigit()
    proc = run_cli("-m", "ifadit_jax.anonymize", "--help")
    for flag in ("--no-face", "--min-face-size", "--det-threshold", "--key-check", "--device",
                 "--quiet", "--verbose", "--no-compile-cache"):
        assert flag in proc.stdout


def test_output_reaching_into_the_input_through_a_symlinked_folder(tmp_path, release_weights, secret_file):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    aligned_face(photos / "sub" / "a.png", 1)
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(photos, out / "sub")  # out/sub/a.png -> photos/a.png, inside the input tree
    with pytest.raises(InputError, match="inside the input folder"):
        anon(photos, out, "--weights", release_weights, "--aligned", "--secret-file", secret_file, *FAST_KDF)
    assert sorted(p.name for p in photos.rglob("*")) == ["a.png", "sub"]


def test_recover_cli_refuses_a_device_sidecar_in_one_line(tmp_path):
    """Through the real command line: a sidecar that is a symlink to /dev/zero is refused before
    the weights load (the weights folder given does not exist), without blocking."""
    src = aligned_face(tmp_path / "anon.png")
    os.symlink("/dev/zero", tmp_path / "anon.png.json")
    proc = run_cli("-m", "ifadit_jax.recover", str(src), str(tmp_path / "rec.png"), "--weights",
                   str(tmp_path / "no-weights"), "--secret-env", "S", check=False)
    assert proc.returncode == InputError.exit_code
    assert proc.stderr.strip().splitlines() == [f"error: {src}.json: not a regular file"]


def test_output_problems_are_found_before_any_work(tmp_path, monkeypatch):
    """Refused while planning, before the weights load (the weights folder does not exist)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    aligned_face(photos / "a.png", 1)
    args = ("--weights", tmp_path / "no-weights", "--aligned", "--secret-env", "S", *FAST_KDF)
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(InputError, match="must be a folder"):
        anon(photos, tmp_path / "file", *args)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"someone else's")
    for force in ([], ["--force"]):
        with pytest.raises(InputError, match="in the way"):
            anon(photos, out, *args, *force)
    assert (out / "a.png").read_bytes() == b"someone else's"
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(commands.shutil, "disk_usage", lambda path: usage(1000, 0, 1000))
    with pytest.raises(InputError, match="not enough free space"):
        anon(photos, tmp_path / "new", *args)
    assert not (tmp_path / "new").exists()


def test_resumed_folder_refuses_other_weights(tmp_path, release_weights, secret_file):
    src = tmp_path / "in"
    src.mkdir()
    aligned_face(src / "a.png", 1)
    out = tmp_path / "out"
    assert anon(src, out, "--weights", release_weights, "--aligned", "--secret-file", secret_file, *FAST_KDF) == 0
    side = json.loads((out / "a.png.json").read_text())
    side["weights_id"] = "0" * 16
    (out / "a.png.json").write_text(json.dumps(side))
    aligned_face(src / "b.png", 2)
    with pytest.raises(InputError, match="other weights"):
        anon(src, out, "--weights", release_weights, "--aligned", "--secret-file", secret_file, *FAST_KDF)
    assert not (out / "b.png").exists()


def test_recover_cli_refuses_a_sidecar_of_another_image_before_loading(tmp_path):
    """The recorded size is checked against the image's header before the weights load."""
    src = aligned_face(tmp_path / "anon.png")
    side = {"format": sidecar.FORMAT, "conventions": "official", "weights_id": "0" * 16,
            "key": {"path": "vector"}, "refine": True, "mode": "photo", "size": [512, 512], "faces": []}
    (tmp_path / "anon.png.json").write_text(json.dumps(side))
    proc = run_cli("-m", "ifadit_jax.recover", str(src), str(tmp_path / "rec.png"), "--weights",
                   str(tmp_path / "no-weights"), "--key-vector", "u.npy", check=False)
    assert proc.returncode == InputError.exit_code
    assert proc.stderr.strip().splitlines() == [
        f"error: {src}.json: size: records 512x512 but the image is 256x256 (a sidecar of another image?)"]


def test_key_vector_header_is_checked_before_any_allocation(tmp_path, release_weights):
    """A 100-byte .npy whose header claims 10^9 floats (4 GB) is refused from its header; a
    good [512] vector is the official key path k = f(u)."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                               "shape": (10 ** 9,)})
    (tmp_path / "evil.npy").write_bytes(buf.getvalue() + b"\0" * 64)
    np.save(tmp_path / "u.npy", np.full(512, 0.75, np.float32))
    face = aligned_face(tmp_path / "face.png")
    with pytest.raises(InputError, match=r"evil.npy: key vector must be \[512\]"):
        anon(face, tmp_path / "a.png", "--weights", release_weights, "--aligned", "--key-vector",
             tmp_path / "evil.npy")
    assert not (tmp_path / "a.png").exists()
    assert anon(face, tmp_path / "b.png", "--weights", release_weights, "--aligned", "--key-vector",
                tmp_path / "u.npy") == 0
    assert sidecar.read(str(tmp_path / "b.png.json")).key == {"path": "vector"}


# ----------------------------------------------------------------------------------------------
# Folders that mix photos and videos; the producer, the padded batches and the devices


def _mixed_folder(root):
    """in/a.png (the astronaut photo), in/sub/b.png (a small frame of the clip, one face),
    in/clips/pan (the synthetic clip, no extension: a video by content), notes.txt."""
    from tests.helpers import clip_frames, clip_pts, face_frame, write_clip

    src = root / "in"
    (src / "sub").mkdir(parents=True)
    (src / "clips").mkdir()
    (src / "a.png").write_bytes(fixture("mtcnn_images/astronaut.png").read_bytes())
    Image.fromarray(face_frame(2)).resize((258, 194), Image.BILINEAR).save(src / "sub" / "b.png")
    write_clip(root / "pan.mkv", clip_frames(), clip_pts())
    os.rename(root / "pan.mkv", src / "clips" / "pan")
    (src / "notes.txt").write_text("not an image")
    return src


def test_folder_mixes_photos_and_videos(tmp_path, release_weights, secret_file, capsys):
    from tests.helpers import CLIP_FACE_FRAMES, CLIP_FRAMES, read_clip

    src, out, back = _mixed_folder(tmp_path), tmp_path / "out", tmp_path / "back"
    (src / "clips" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    common = ["--weights", release_weights, "--secret-file", secret_file]
    assert anon(src, out, *common, *FAST_KDF) == InputError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"error: {src / 'clips' / 'broken.mp4'}: ") and len(err) == 2
    assert err[1] == "error: 1 of 4 files failed, nothing written for them"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "a.png", "a.png.json", "clips", "clips/pan.mkv", "clips/pan.mkv.json", "sub", "sub/b.png",
        "sub/b.png.json"]
    side = sidecar.read_video(str(out / "clips" / "pan.mkv.json"))
    assert side.frames == CLIP_FRAMES and [e[0] for e in side.tracks[0]] == CLIP_FACE_FRAMES
    assert json.loads((out / "a.png.json").read_text())["mode"] == "photo"
    frames_in, _ = read_clip(src / "clips" / "pan")
    frames_out, _ = read_clip(out / "clips" / "pan.mkv")
    assert len(frames_out) == CLIP_FRAMES
    for i in range(CLIP_FRAMES):  # FFV1 by default: face-free frames pass through bit-exact
        assert np.array_equal(frames_in[i], frames_out[i]) == (i not in CLIP_FACE_FRAMES), i
    # Resume: the finished photo and video are kept (checked against this run's key settings).
    os.unlink(src / "clips" / "broken.mp4")
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.*")}
    assert anon(src, out, *common, *FAST_KDF) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.*")} == stamps
    with pytest.raises(InputError, match="other key settings"):
        anon(src, out, *common, "--kdf-memory-kib", "128", "--kdf-iterations", "1")
    # Recovery finds the video by its video sidecar and recovers every item.
    assert rec(out, back, *common) == 0
    assert sorted(p.relative_to(back).as_posix() for p in back.rglob("*")) == [
        "a.png", "a.png.json", "clips", "clips/pan.mkv", "clips/pan.mkv.json", "sub", "sub/b.png",
        "sub/b.png.json"]
    assert json.loads((back / "clips" / "pan.mkv.json").read_text())["mode"] == "video"
    frames_back, _ = read_clip(back / "clips" / "pan.mkv")
    assert len(frames_back) == CLIP_FRAMES
    assert all(np.array_equal(frames_in[i], frames_back[i]) for i in range(CLIP_FRAMES)
               if i not in CLIP_FACE_FRAMES)


def test_folder_videos_follow_the_force_rules(tmp_path):
    """Planning only (no networks): a video output in the way that this tool did not write is
    refused even with --force; ours is kept (resume) or, with --force, redone."""
    src = _mixed_folder(tmp_path)
    out = tmp_path / "out"
    (out / "clips").mkdir(parents=True)
    (out / "clips" / "pan.mkv").write_bytes(b"someone else's video")
    for force in (False, True):
        with pytest.raises(InputError, match=r"in the way.*pan\.mkv: exists and was not written"):
            commands.plan(str(src), str(out), force)
    record = {"format": sidecar.VIDEO_FORMAT}
    (out / "clips" / "pan.mkv.json").write_text(json.dumps(record))
    plan = commands.plan(str(src), str(out), force=False)
    assert [(os.path.relpath(j.src, src), j.video) for j in plan.jobs] == [("a.png", False),
                                                                           ("sub/b.png", False)]
    assert [(os.path.relpath(j.dst, out), j.video) for j in plan.done] == [("clips/pan.mkv", True)]
    plan = commands.plan(str(src), str(out), force=True)
    assert [os.path.relpath(j.dst, out) for j in plan.jobs] == ["a.png", "clips/pan.mkv", "sub/b.png"]
    # The same stem as a photo's output is no clash (.png and .mkv); two clips of one stem are.
    os.link(src / "clips" / "pan", src / "clips" / "pan.mp4")
    with pytest.raises(InputError, match="written twice"):
        commands.plan(str(src), str(tmp_path / "out2"), force=False)


def test_video_flags_are_a_help_group():
    groups = {g.title: [a.option_strings[0] for a in g._group_actions if a.option_strings]
              for g in commands._anonymize_parser()._action_groups}
    assert groups["video options"] == ["--codec", "--crf", "--keep-audio"]


def test_prefetch_keeps_order_carries_errors_and_stops(tmp_path):
    import threading

    seen = []

    def prepare(job):
        seen.append(job)
        if job == 2:
            raise InputError("bad item 2")
        return job * 10

    with commands.prefetched(list(range(5)), prepare, depth=1) as results:
        got = list(results)
    assert [j for j, _ in got] == list(range(5))
    assert [r for j, r in got if j != 2] == [0, 10, 30, 40] and isinstance(got[2][1], InputError)
    # The consumer fails after the first item: the producer, blocked on the full queue, stops.
    seen.clear()
    with pytest.raises(KeyboardInterrupt), commands.prefetched(list(range(1000)), prepare, depth=1) as results:
        next(results)
        raise KeyboardInterrupt
    assert len(seen) <= 3
    assert not [t for t in threading.enumerate() if t.name == "ifadit-prefetch"]


def test_a_folder_compiles_each_network_once(tmp_path, release_weights, secret_file, monkeypatch):
    """5 aligned faces at batch 4: two calls, the second padded, one program lowered and
    compiled (a persistent-cache hit still lowers, so lowerings count every compile)."""
    import jax
    from jax import monitoring

    from ifadit_jax import pipeline

    lowered = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            lowered.append(kwargs.get("fun_name"))

    def fresh_anonymize(nets, images, k, refine):  # a new function: JAX has not cached it
        return pipeline.anonymize(nets, images, k, refine=refine)

    monkeypatch.setattr(commands, "_ANONYMIZE", jax.jit(fresh_anonymize, static_argnames=("refine",)))
    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):
        aligned_face(src / f"{i}.png", i)
    monitoring.register_event_duration_secs_listener(listen)
    try:
        assert anon(src, tmp_path / "out", "--weights", release_weights, "--aligned",
                    "--secret-file", secret_file, "--batch", "4", *FAST_KDF) == 0
    finally:
        monitoring.unregister_event_duration_listener(listen)
    assert len(list((tmp_path / "out").glob("*.png"))) == 5
    assert lowered.count("jit(fresh_anonymize)") == 1, [n for n in lowered if "stage" not in n]


def test_two_devices_give_the_same_images_as_one(tmp_path, release_weights, secret_file):
    """The folder CLI on 2 fake CPU devices (batch 3 rounded up to 4, split 2 + 2) writes the
    same images as on one device."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):
        aligned_face(src / f"{i}.png", 10 + i)
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"out{n}"
        proc = run_cli("-m", "ifadit_jax.anonymize", str(src), str(out), "--weights", str(release_weights),
                       "--aligned", "--secret-file", str(secret_file), "--batch", "3", "--verbose",
                       *FAST_KDF, env=xla_env(n))
        want = f"networks: 2 calls of {3 if n == 1 else 4} images on {n} device(s)"
        assert want in proc.stderr, proc.stderr
        outs[n] = {p.name: imageio.to_uint8(imageio.read_rgb(p)).astype(int) for p in out.glob("*.png")}
    assert sorted(outs[1]) == sorted(outs[2]) == [f"{i}.png" for i in range(5)]
    for name in outs[1]:
        assert np.abs(outs[1][name] - outs[2][name]).max() <= 1, name
