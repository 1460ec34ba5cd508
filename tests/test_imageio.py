"""One image reader for everything: EXIF orientation, every common mode converted to 8-bit RGB,
the writer restoring grayscale and alpha, the pixel limit, and one-line errors."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ifadit_jax import files, imageio
from ifadit_jax.errors import InputError


def _gradient(h=6, w=4):
    """An RGB image whose every pixel differs: rows count in red, columns in green."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([y * 40, x * 60, np.full_like(x, 7)], -1).astype(np.uint8)


def test_exif_orientation_is_applied(tmp_path):
    pixels = _gradient()
    path = tmp_path / "rotated.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": stored as a landscape, shown as a portrait
    Image.fromarray(pixels).save(path, exif=exif)
    got = imageio.read_rgb(path)
    # Orientation 6 means the viewer turns the stored pixels 90 degrees clockwise.
    want = np.rot90(pixels, k=-1).astype(np.float32) / 255
    assert got.shape == (4, 6, 3)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mode,value,gray,alpha", [
    ("L", 200, True, None),
    ("LA", (200, 30), True, 30),
    ("RGBA", (10, 20, 30, 40), False, 40),
    ("CMYK", (0, 0, 0, 0), False, None),  # no ink: white
    ("1", 1, True, None),
])
def test_modes_become_8bit_rgb(tmp_path, mode, value, gray, alpha):
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    Image.new(mode, (5, 3), value).save(path)
    d = imageio.read_image(path)
    assert d.rgb.shape == (3, 5, 3) and d.rgb.dtype == np.float32 and d.gray is gray
    want = {"L": [200] * 3, "LA": [200] * 3, "RGBA": [10, 20, 30], "CMYK": [255] * 3, "1": [255] * 3}[mode]
    np.testing.assert_array_equal(d.rgb[1, 2], np.float32(want) / 255)
    assert (d.alpha is None) if alpha is None else (d.alpha == alpha).all()


def test_palette_with_transparency_and_16bit(tmp_path):
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 250, 100, 50] + [0] * 762)
    p.info["transparency"] = 1
    p.save(tmp_path / "p.png", transparency=1)
    d = imageio.read_image(tmp_path / "p.png")
    np.testing.assert_array_equal(d.rgb[0, 0], np.float32([250, 100, 50]) / 255)
    assert (d.alpha == 0).all()
    wide = np.array([[0, 257 * 100, 65535]], np.uint16)
    Image.fromarray(wide).save(tmp_path / "w.png")
    d = imageio.read_image(tmp_path / "w.png")
    assert d.gray
    np.testing.assert_array_equal(d.rgb[0, :, 0] * 255, [0, 100, 255])  # 65535 / 257 = 255


def test_writer_restores_grayscale_and_alpha(tmp_path):
    Image.new("LA", (4, 4), (90, 17)).save(tmp_path / "la.png")
    d = imageio.read_image(tmp_path / "la.png")
    imageio.write_rgb(tmp_path / "out.png", d.rgb, like=d)
    with Image.open(tmp_path / "out.png") as im:
        assert im.mode == "LA" and im.getpixel((1, 1)) == (90, 17)
    Image.new("RGBA", (4, 4), (1, 2, 3, 99)).save(tmp_path / "rgba.png")
    d = imageio.read_image(tmp_path / "rgba.png")
    imageio.write_rgb(tmp_path / "out2.png", d.rgb, like=d)
    with Image.open(tmp_path / "out2.png") as im:
        assert im.mode == "RGBA" and im.getpixel((0, 0)) == (1, 2, 3, 99)
    imageio.write_rgb(tmp_path / "out3.jpg", d.rgb, like=d)  # JPEG has no alpha: dropped
    with Image.open(tmp_path / "out3.jpg") as im:
        assert im.mode == "RGB"


def test_pixel_limit_and_undecodable_files_are_one_line(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    good = (tmp_path / "big.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(good[:60])
    (tmp_path / "text.jpg").write_text("hello")
    for name in ("cut.png", "text.jpg"):
        with pytest.raises(InputError, match="cannot read image") as e:
            imageio.read_rgb(tmp_path / name)
        assert "\n" not in str(e.value)
    monkeypatch.setattr(imageio, "MAX_PIXELS", 9999)
    with pytest.raises(InputError, match="above the limit of 9999 pixels"):
        imageio.read_rgb(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own bomb check (2x: error)
    monkeypatch.setattr(imageio, "MAX_PIXELS", 10**8)
    with pytest.raises(InputError, match="pixel limit"):
        imageio.read_rgb(tmp_path / "big.png")


def test_write_errors_are_one_line_and_leave_nothing(tmp_path, monkeypatch):
    def fail(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(InputError, match="No space left"):
        imageio.write_rgb(tmp_path / "x.png", np.zeros((4, 4, 3)))
    assert list(tmp_path.iterdir()) == []


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        imageio.write_rgb(tmp_path / "x.png", np.zeros((4, 4, 3)))
    finally:
        os.umask(old)
    assert (tmp_path / "x.png").stat().st_mode & 0o777 == 0o640


def test_stale_temporaries_are_removed_but_nothing_else(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / f"{files.TMP_PREFIX}abc.png").write_bytes(b"partial")
    (tmp_path / ".tmp-user-file.png").write_bytes(b"not ours")
    (tmp_path / "a.png").write_bytes(b"keep")
    assert files.remove_stale_temporaries(str(tmp_path)) == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == [".tmp-user-file.png", "a.png", "sub"]


def test_a_live_writers_temporaries_stay(tmp_path):
    """Temporaries carry their writer's process id: a concurrent run's are left alone, a dead
    process's are removed, and only the top folder is swept when not recursive."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / "sub").mkdir()
    (tmp_path / f"{files.TMP_PREFIX}{os.getpid()}-x.png").write_bytes(b"being written")
    (tmp_path / f"{files.TMP_PREFIX}{dead}-x.png").write_bytes(b"killed")
    (tmp_path / "sub" / f"{files.TMP_PREFIX}{dead}-y.png").write_bytes(b"killed, below")
    assert files.remove_stale_temporaries(str(tmp_path), recursive=False) == 1
    assert {p.name for p in tmp_path.rglob("*.png")} == {
        f"{files.TMP_PREFIX}{os.getpid()}-x.png", f"{files.TMP_PREFIX}{dead}-y.png"}
    with files.atomic_path(tmp_path / "z.png") as tmp:
        assert os.path.basename(tmp).startswith(f"{files.TMP_PREFIX}{os.getpid()}-")
        open(tmp, "wb").close()


def test_header_size_matches_the_decoded_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_gradient(6, 4)).save(tmp_path / "r.png", exif=exif)
    assert imageio.header_size(tmp_path / "r.png") == (6, 4)  # (width, height) upright
    assert imageio.read_rgb(tmp_path / "r.png").shape[:2] == (4, 6)
    (tmp_path / "bad.png").write_bytes(b"nope")
    assert imageio.header_size(tmp_path / "bad.png") is None
