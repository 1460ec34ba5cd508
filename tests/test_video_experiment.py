"""experiments/video.py: the video experiment's measures by hand, and one demo run through the
command line (random networks: the numbers are checked for range and bookkeeping, not quality)."""

from __future__ import annotations

import csv
import json
import math

import av
import numpy as np
import pytest
from PIL import Image

from experiments import run
from experiments import video as vx
from ifadit_jax import video
from ifadit_jax.errors import InputError


def test_pairwise_consistency_by_hand():
    e = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])  # not unit: normalized inside
    mean, low = vx.pairwise_consistency(e)
    # cosines: (1, 2) 0, (1, 3) 1/sqrt(2), (2, 3) 1/sqrt(2)
    assert mean == pytest.approx(math.sqrt(2) / 3) and low == pytest.approx(0.0, abs=1e-12)
    assert all(math.isnan(v) for v in vx.pairwise_consistency(e[:1]))


def test_face_box_and_flicker_by_hand():
    a = np.array([[0.5, 0.0, 10.0], [0.0, 0.5, 20.0]])  # crop (u, v) -> (10 + u/2, 20 + v/2)
    # crop 64..192 -> x 42..106, y 52..116
    assert vx.face_box(a, (200, 200)) == (52, 116, 42, 106)
    assert vx.face_box(a, (100, 80)) == (52, 100, 42, 80)
    assert vx.face_box(a, (40, 40)) is None
    prev = np.zeros((10, 10, 3), np.uint8)
    cur = prev.copy()
    cur[2:4, 2:6] = 51  # inside the box: 8 of its 16 pixels change by 51 / 255 = 0.2
    assert vx.flicker(prev, cur, (2, 6, 2, 6)) == pytest.approx(0.1)
    assert vx.psnr_from_mse(0.01) == pytest.approx(20.0) and vx.psnr_from_mse(0.0) == math.inf


def test_demo_clip_faces_are_known_by_content(tmp_path):
    path = str(tmp_path / "demo.mkv")
    known = vx.demo_clip(path, frames=3)
    with av.open(path) as c:
        frames = [f.rgb for f in video.decode(c, path)]
    assert len(frames) == 5
    for i, rgb in enumerate(frames):
        boxes, _, lm = known.detect(rgb)
        assert len(boxes) == (1 if i < 3 else 0)
        if i < 3:  # the landmarks inside the box, the box inside the frame
            x0, y0, x1, y1 = boxes[0]
            assert np.all((lm[0][:, 0] > x0) & (lm[0][:, 0] < x1) & (lm[0][:, 1] > y0) & (lm[0][:, 1] < y1))
            assert 0 <= x0 and 0 <= y0 and x1 <= rgb.shape[1] and y1 <= rgb.shape[0]
    # The known landmarks follow the pan: the face moves left as the window moves right.
    assert known.detect(frames[2])[2][0][0, 0] < known.detect(frames[0])[2][0][0, 0]


@pytest.mark.parametrize("argv, message", [
    (["--demo", "--videos", "nowhere"], "--mtcnn"),
    (["--demo", "--crf", "60"], "--crf"),
    (["--demo", "--images", "x"], "--videos, not --images"),
    ([], "--weights DIR or --demo"),
])
def test_bad_arguments_fail_before_work(tmp_path, argv, message):
    with pytest.raises(InputError, match=message):
        run.main(["video", "--out", str(tmp_path / "out"), *argv])
    assert not (tmp_path / "out").exists()


def _cells(row: dict, key: str) -> float:
    cell = row[key]
    return cell["value"] if "value" in cell else cell["mean"]


def test_demo_run_writes_every_file_with_numbers_in_range(tmp_path):
    out = tmp_path / "out"
    assert run.main(["video", "--demo", "--out", str(out), "--crf", "28", "--quiet"]) == 0
    names = ["video.md", "video.csv", "video_per_image.csv", "video.json", "video_samples.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    result = json.loads((out / "video.json").read_text())
    clip = result["clips"]["astronaut_pan.mkv"]
    assert clip["frames"] == 8 and clip["tracks"] == 1 and clip["size"] == [144, 192]
    rows = result["rows"]
    assert [r["output"] for r in rows] == ["ffv1", "h264 crf 28"] and all(r["n"] == 6 for r in rows)
    for r in rows:
        for view in ("original", "anon"):
            mean, low = _cells(r, f"id_mean_{view}"), _cells(r, f"id_min_{view}")
            assert -1 <= low <= mean <= 1
            assert 0 <= _cells(r, f"flicker_{view}") <= 1
        assert _cells(r, "flicker_original") > 0  # the window pans: the original moves
        assert 0 < _cells(r, "rec_psnr") < vx.PSNR_CAP and -1 <= _cells(r, "rec_ssim") <= 1
        assert -1 <= _cells(r, "rec_cos_arcface") <= 1 and _cells(r, "frame_psnr") > 0
        assert _cells(r, "fps_anonymize") > 0 and _cells(r, "fps_recover") > 0
    # The original's columns do not depend on the output.
    assert rows[0]["id_mean_original"] == rows[1]["id_mean_original"]
    timing = clip["timing"]
    assert set(timing) == {"anonymize", "recover ffv1", "recover h264 crf 28"}
    for job in timing.values():
        assert set(job["stages"]) == set(video.STAGES)
        assert sum(s["share"] for s in job["stages"].values()) <= 1 + 1e-6
        assert job["stages"]["networks"]["seconds"] > 0 and job["stages"]["decode"]["seconds"] > 0
    assert timing["anonymize"]["stages"]["detect"]["seconds"] > 0
    assert timing["recover ffv1"]["stages"]["detect"]["seconds"] == 0  # recovery never detects
    with open(out / "video_per_image.csv") as f:
        lines = list(csv.DictReader(f))
    assert [(line["output"], line["track"], line["frames"]) for line in lines] == [
        ("ffv1", "0", "6"), ("h264 crf 28", "0", "6")]
    assert "DEMO" in (out / "video.md").read_text()
    with Image.open(out / "video_samples.png") as im:
        assert im.size[0] == 4 * 160 and im.size[1] > 3 * 160  # three frames, four columns


def test_faceless_odd_sized_clip_with_the_weights_folder(tmp_path, release_weights):
    """A user's clip (odd size, no face) through --weights and --videos: no track, so every face
    column is n/a; the FFV1 round trip is bit-exact (frame PSNR undefined), H.264 (padded to even
    sides for 4:2:0, compared at the original size) is not."""
    clips = tmp_path / "clips"
    clips.mkdir()
    rng = np.random.default_rng(5)
    with av.open(str(clips / "room.mkv"), "w") as out:
        s = out.add_stream("ffv1", rate=25)
        s.height, s.width, s.pix_fmt = 49, 67, "bgr0"
        for i in range(3):
            f = av.VideoFrame.from_ndarray(rng.integers(0, 256, (49, 67, 3), dtype=np.uint8), format="rgb24")
            f.pts = i
            out.mux(s.encode(f))
        out.mux(s.encode())
    (clips / "notes.txt").write_text("not a video")
    out = tmp_path / "out"
    assert run.main(["video", "--weights", str(release_weights), "--videos", str(clips), "--out",
                     str(out), "--crf", "23", "--quiet"]) == 0
    result = json.loads((out / "video.json").read_text())
    assert list(result["clips"]) == ["room.mkv"] and result["clips"]["room.mkv"]["tracks"] == 0
    ffv1, h264 = result["rows"]
    assert ffv1["n"] == 0 and "na" in ffv1["id_mean_anon"] and ffv1["rec_psnr"]["mean"] is None
    assert ffv1["frame_psnr"] == {"na": "every frame identical"}
    assert 10 < h264["frame_psnr"]["value"] < 100
