"""Video: tracking, one pseudonym per track, FFV1 pass-through, timestamps, recovery, bad inputs.

The clip is made here from scikit-image's astronaut: a pan over her face, a two-frame cut to
face-free frames (a short gap: the track must survive it), more pan, and three face-free frames
at the end. Frame size 129x97 (odd on both sides). The random demo networks anonymize nothing
meaningful, so these tests check mechanics, not identity quality.
"""

from __future__ import annotations

import json
import re

import av
import numpy as np
import pytest
from PIL import Image

from ifadit_jax import commands, sidecar, video
from ifadit_jax.errors import InputError
from tests.helpers import CLIP_FACE_FRAMES as FACE_FRAMES
from tests.helpers import CLIP_FRAMES as N_FRAMES
from tests.helpers import CLIP_SIZE as SIZE
from tests.helpers import clip_frames, clip_pts, read_clip, run_cli, write_audio, write_clip
from tests.helpers import face_frame as _face_frame
from tests.helpers import plain_frame as _plain_frame

SECRET = "video test secret"
FAST_KDF = ["--kdf-memory-kib", "64", "--kdf-iterations", "1"]

@pytest.fixture(scope="module")
def secret_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("video_secret") / "secret.txt"
    p.write_text(SECRET + "\n")
    return p


@pytest.fixture(scope="module")
def run(tmp_path_factory, release_weights, secret_file):
    """Anonymizes the clip once through the command line (in process), spying on the identities
    each frame gets, then recovers it."""
    root = tmp_path_factory.mktemp("video_run")
    src, out, back = root / "Jane_Doe_holiday.mkv", root / "anon.mkv", root / "rec.mkv"
    write_clip(src, clip_frames(), clip_pts())
    given = {}
    real = video.render_frames

    def spy(pipe, frames, faces, refine, batch):
        given.setdefault("calls", []).extend([np.asarray(z).copy() for _, z in fs] for fs in faces)
        given.setdefault("groups", []).append(sum(len(fs) for fs in faces))
        return real(pipe, frames, faces, refine, batch)

    common = ["--weights", str(release_weights), "--secret-file", str(secret_file), "--quiet"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(video, "render_frames", spy)
        assert commands.anonymize_main([str(src), str(out), *common, *FAST_KDF]) == 0
    assert commands.recover_main([str(out), str(back), *common]) == 0
    return dict(src=src, out=out, back=back, calls=given["calls"], groups=given["groups"])


def test_one_track_through_the_pan_and_the_short_cut(run):
    side = json.loads(open(sidecar.path_for(str(run["out"]))).read())
    assert len(side["tracks"]) == 1
    assert [e[0] for e in side["tracks"][0]["frames"]] == FACE_FRAMES


def test_faces_of_several_frames_share_the_network_batches(run):
    # --batch 4 (the default), one face per frame: the 12 face-frames render in groups of four
    # frames (no face padded alone to a batch of four), face-free frames in the same groups.
    assert sum(run["groups"]) == len(FACE_FRAMES)
    assert all(n <= 4 for n in run["groups"]) and max(run["groups"]) == 4
    assert len(run["groups"]) < N_FRAMES


def test_every_frame_of_the_track_gets_the_same_identity(run):
    calls = run["calls"]
    assert len(calls) == N_FRAMES
    per_frame = [c for c in calls if c]
    assert len(per_frame) == len(FACE_FRAMES) and all(len(c) == 1 for c in per_frame)
    first = per_frame[0][0]
    assert all(np.array_equal(c[0], first) for c in per_frame)
    assert [i for i, c in enumerate(calls) if c] == FACE_FRAMES


def test_face_free_frames_are_bit_identical_and_faces_change(run):
    src, _ = read_clip(run["src"])
    out, _ = read_clip(run["out"])
    assert len(out) == N_FRAMES
    for i in range(N_FRAMES):
        if i in FACE_FRAMES:
            assert np.abs(out[i].astype(int) - src[i].astype(int)).max() > 20, i
        else:
            assert np.array_equal(out[i], src[i]), i


def test_frame_count_size_and_timestamps_kept_through_recovery(run):
    want = [p / 90 for p in clip_pts()]
    for path in (run["out"], run["back"]):
        frames, seconds = read_clip(path)
        assert len(frames) == N_FRAMES and frames[0].shape == (*SIZE, 3)
        # Matroska stores milliseconds.
        assert np.abs(np.array(seconds) - want).max() <= 0.0005 + 1e-9
    src, _ = read_clip(run["src"])
    back, _ = read_clip(run["back"])
    for i in range(N_FRAMES):
        if i not in FACE_FRAMES:
            assert np.array_equal(back[i], src[i]), i


def test_sidecar_schema_and_no_names(run):
    path = sidecar.path_for(str(run["out"]))
    text = open(path).read()
    assert "Jane_Doe" not in text and str(run["src"].parent) not in text and SECRET not in text
    side = sidecar.read_video(path)
    assert side.frames == N_FRAMES and side.size == SIZE and side.codec == "ffv1"
    # The source is Matroska, whose timestamps are in milliseconds.
    assert side.time_base == (1, 1000) and side.key["path"] == "kdf" and side.refine
    assert sidecar.written_by_us(str(run["out"]))


def test_ffv1_writer_is_lossless_for_odd_sizes(tmp_path):
    frames = [_plain_frame(100 + i) for i in range(3)]
    src = tmp_path / "noise.mkv"
    write_clip(src, frames, [0, 5, 9])
    with av.open(str(src)) as c:
        dst = tmp_path / "copy.mkv"
        writer = video.Writer(str(dst), c, video.EncodeOptions(), rotation=0)
        for f in video.decode(c, str(src)):
            writer.write(f.rgb, f)
        writer.close()
    got, seconds = read_clip(dst)
    assert all(np.array_equal(a, b) for a, b in zip(got, frames)) and len(got) == 3
    assert np.allclose(seconds, [0, 5 / 90, 9 / 90], atol=0.0005)


def test_box_iou_by_hand():
    iou = video.box_iou(np.array([[0, 0, 2, 2]]), np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]]))
    assert np.allclose(iou, [[1 / 7, 1.0, 0.0]])


def test_smoothing_is_a_centred_moving_average():
    lm = np.zeros((5, 5, 2))
    lm[:, 0, 0] = [0, 10, 20, 30, 100]
    out = video.smooth_landmarks(lm, radius=1)
    assert np.allclose(out[:, 0, 0], [5, 10, 20, 50, 65])


def _unit(i, dim=512):
    z = np.zeros(dim)
    z[i] = 1.0
    return z


def test_tracker_two_faces_crossing_ids_and_long_gap():
    t = video.Tracker()
    left, right = [0, 0, 10, 10], [50, 0, 60, 10]
    lm = np.zeros((5, 2))
    assert t.step(0, [left, right], [lm, lm], [_unit(0), _unit(1)]) == [0, 1]
    # Listed in the other order, shifted by one pixel: the ids follow the faces.
    assert t.step(1, [[51, 0, 61, 10], [1, 0, 11, 10]], [lm, lm], [_unit(1), _unit(0)]) == [1, 0]
    # Face 0 gone for MAX_GAP frames: same id when it returns.
    assert t.step(2 + video.MAX_GAP, [[1, 0, 11, 10]], [lm], [_unit(0)]) == [0]
    # Face 1 gone for longer: a new track.
    assert t.step(3 + video.MAX_GAP, [[51, 0, 61, 10]], [lm], [_unit(1)]) == [2]
    # No overlap and an orthogonal identity: not linked.
    assert t.step(4 + video.MAX_GAP, [[200, 200, 210, 210]], [lm], [_unit(5)]) == [3]


def _record(**change):
    a = [[0.1, 0.0, 40.0], [0.0, 0.1, 30.0]]
    rec = {"format": sidecar.VIDEO_FORMAT, "conventions": "official", "weights_id": "abc",
           "key": {"path": "vector"}, "refine": True, "codec": "ffv1", "frames": 4,
           "size": [97, 129], "time_base": [1, 90], "tracks": [{"frames": [[0, a], [2, a]]}]}
    rec.update(change)
    return rec


@pytest.mark.parametrize("change, field", [
    (dict(frames=0), "frames"),
    (dict(frames=True), "frames"),
    (dict(codec="vp9"), "codec"),
    (dict(time_base=[0, 90]), "time_base"),
    (dict(tracks=[{"frames": [[4, [[0.1, 0, 40], [0, 0.1, 30]]]]}]), "tracks[0].frames[0][0]"),
    (dict(tracks=[{"frames": [[2, [[0.1, 0, 40], [0, 0.1, 30]]], [1, [[0.1, 0, 40], [0, 0.1, 30]]]]}]),
     "tracks[0].frames[1][0]"),
    (dict(tracks=[{"frames": []}]), "tracks[0].frames"),
    (dict(tracks=[{"frames": [[0, [[0.1, 0, 4000], [0, 0.1, 30]]]]}]), "tracks[0].frames[0][1]"),
    (dict(extra=1), "sidecar"),
])
def test_video_sidecar_refuses(change, field):
    assert sidecar.validate_video(_record()).frames == 4
    with pytest.raises(sidecar.SidecarError, match=r"^" + re.escape(field)):
        sidecar.validate_video(_record(**change))


def test_video_sidecar_caps_faces_per_frame_and_bytes(tmp_path):
    a = [[0.1, 0.0, 40.0], [0.0, 0.1, 30.0]]
    many = [{"frames": [[0, a]]} for _ in range(sidecar.MAX_VIDEO_FACES_PER_FRAME + 1)]
    with pytest.raises(sidecar.SidecarError, match="faces in frame 0"):
        sidecar.validate_video(_record(tracks=many))
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(sidecar.MAX_VIDEO_BYTES + 1)
    with pytest.raises(sidecar.SidecarError, match="larger than"):
        sidecar.read_video(str(big))


def test_is_video_by_content_not_extension(tmp_path, run):
    renamed = tmp_path / "clip.dat"
    renamed.write_bytes(run["src"].read_bytes())
    assert video.is_video(str(renamed))
    photo = tmp_path / "face.png"
    Image.fromarray(_face_frame(0)).save(photo)
    assert not video.is_video(str(photo))
    text = tmp_path / "readme.nfo"  # FFmpeg's tty demuxer would draw it as ANSI art
    text.write_text("release notes\n")
    assert not video.is_video(str(text))


def test_not_a_video_is_one_error_line(tmp_path, release_weights, secret_file):
    bad = tmp_path / "clip.mp4"
    bad.write_bytes(b"this is not a video at all\n" * 10)
    proc = run_cli("-m", "ifadit_jax.anonymize", str(bad), str(tmp_path / "o.mkv"), "--weights",
                   str(release_weights), "--secret-file", str(secret_file), check=False)
    assert proc.returncode == 4
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_truncated_video_writes_nothing(tmp_path, run, release_weights, secret_file):
    cut = tmp_path / "cut.mkv"
    data_ = run["src"].read_bytes()
    cut.write_bytes(data_[:len(data_) // 2])
    args = [str(cut), str(tmp_path / "o.mkv"), "--weights", str(release_weights), "--secret-file",
            str(secret_file), "--quiet", *FAST_KDF]
    with pytest.raises(InputError, match="truncated"):
        commands.anonymize_main(args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.mkv"]


def test_recovery_refuses_a_sidecar_of_another_length(tmp_path, run, release_weights, secret_file):
    other = tmp_path / "short.mkv"
    frames, _ = read_clip(run["out"])
    write_clip(other, frames[:5], clip_pts()[:5])
    side = json.loads(open(sidecar.path_for(str(run["out"]))).read())
    side["tracks"] = [{"frames": [e for e in side["tracks"][0]["frames"] if e[0] < 5]}]
    open(sidecar.path_for(str(other)), "w").write(json.dumps(side))
    args = [str(other), str(tmp_path / "rec.mkv"), "--weights", str(release_weights), "--secret-file",
            str(secret_file), "--quiet"]
    with pytest.raises(InputError, match="5 frames decoded, 17 expected"):
        commands.recover_main(args)
    assert not (tmp_path / "rec.mkv").exists() and not (tmp_path / "rec.mkv.json").exists()


def test_existing_output_not_ours_is_kept(tmp_path, run, release_weights, secret_file):
    dst = tmp_path / "o.mkv"
    dst.write_bytes(b"precious")
    args = [str(run["src"]), str(dst), "--weights", str(release_weights), "--secret-file",
            str(secret_file), "--quiet", "--force", *FAST_KDF]
    with pytest.raises(InputError, match="not written by ifadit-jax"):
        commands.anonymize_main(args)
    assert dst.read_bytes() == b"precious"


def _audio_packets(path) -> list[bytes]:
    with av.open(str(path)) as c:
        if not c.streams.audio:
            return []
        return [bytes(p) for p in c.demux(c.streams.audio[0]) if p.size]


def test_audio_dropped_by_default(tmp_path):
    src, dst = tmp_path / "talk.mkv", tmp_path / "out.mkv"
    write_clip(src, [_plain_frame(i) for i in range(4)], [0, 3, 6, 9], audio=True)
    assert _audio_packets(src)
    with av.open(str(src)) as c:
        writer = video.Writer(str(dst), c, video.EncodeOptions(), rotation=0)
        for f in video.decode(c, str(src)):
            writer.write(f.rgb, f)
        writer.close()
    assert _audio_packets(dst) == []


def test_h264_mp4_rotated_with_audio(tmp_path, release_weights):
    """A phone-like clip: H.264 in MP4, stored sideways with a 90 degree display rotation, with
    AAC audio; --codec h264 --keep-audio."""
    from ifadit_jax import pipeline

    upright = [_face_frame(i)[:96, :128] for i in range(4)]
    stored = [np.ascontiguousarray(np.rot90(f, -1)) for f in upright]  # FFmpeg turns it back
    src, dst = tmp_path / "phone.mp4", tmp_path / "out.mkv"
    write_clip(src, stored, [0, 3, 6, 9], codec="libx264", audio=True, rotation=90)
    pipe = pipeline.load(release_weights)
    detector = commands.load_detector(str(release_weights))
    k = pipe.key_from_vector(np.full((1, 512), 0.75, np.float32))[0]
    opts = video.EncodeOptions(codec="h264", crf=20, keep_audio=True)
    record = video.anonymize_video(pipe, str(src), str(dst), k, detector=detector,
                                   key_record={"path": "vector"}, opts=opts)
    # Found upright: one track over all four frames; the size is the upright one.
    assert [[e[0] for e in t["frames"]] for t in record["tracks"]] == [[0, 1, 2, 3]]
    assert record["size"] == [96, 128] and record["codec"] == "h264"
    assert _audio_packets(dst) == _audio_packets(src)
    with av.open(str(dst)) as c:
        got = list(c.decode(video=0))
    assert len(got) == 4 and all(f.rotation == 90 for f in got)
    assert got[0].to_ndarray(format="rgb24").shape == (128, 96, 3)


@pytest.mark.parametrize("rotation", [0, 90])
def test_h264_pads_odd_sizes_at_the_bottom_right_of_the_upright_frame(tmp_path, rotation):
    upright = [_face_frame(i) for i in range(2)]  # 97x129, odd
    turns = rotation // 90
    src, dst = tmp_path / "odd.mkv", tmp_path / "odd_h264.mkv"
    write_clip(src, [np.ascontiguousarray(np.rot90(f, -turns)) for f in upright], [0, 4],
               rotation=rotation)
    with av.open(str(src)) as c:
        writer = video.Writer(str(dst), c, video.EncodeOptions(codec="h264", crf=0), rotation)
        for f in video.decode(c, str(src)):
            assert f.rgb.shape == (*SIZE, 3)
            writer.write(f.rgb, f)
        writer.close()
    with av.open(str(dst)) as c:
        got = list(video.decode(c, str(dst)))
    assert len(got) == 2 and got[0].rgb.shape == (98, 130, 3) and got[0].rotation == rotation
    # The picture keeps its place (the padding is the last row and column), up to 4:2:0 loss.
    diff = np.abs(got[0].rgb[:97, :129].astype(float) - upright[0]).mean()
    shifted = np.abs(got[0].rgb[1:98, 1:130].astype(float) - upright[0]).mean()
    assert diff < 3 and diff < shifted


def test_ten_bit_422_source_decodes_to_8_bit_rgb(tmp_path):
    src = tmp_path / "deep.mkv"
    gray = np.full((SIZE[0], SIZE[1], 3), 128, np.uint8)
    with av.open(str(src), "w") as out:
        s = out.add_stream("ffv1", rate=25)
        s.height, s.width, s.pix_fmt = SIZE[0], SIZE[1], "yuv422p10le"
        for i in range(2):
            f = av.VideoFrame.from_ndarray(gray, format="rgb24").reformat(format="yuv422p10le")
            f.pts = i
            out.mux(s.encode(f))
        out.mux(s.encode())
    with av.open(str(src)) as c:
        assert c.streams.video[0].codec_context.pix_fmt == "yuv422p10le"
        frames = list(video.decode(c, str(src)))
    assert len(frames) == 2
    assert all(f.rgb.dtype == np.uint8 and f.rgb.shape == (*SIZE, 3) for f in frames)
    assert np.abs(frames[0].rgb.astype(int) - 128).max() <= 2


def test_no_faces_copied_through_and_interrupt_leaves_nothing(tmp_path, release_weights):
    from ifadit_jax import pipeline

    frames = [_plain_frame(300 + i) for i in range(4)]
    src = tmp_path / "empty_room.mkv"
    write_clip(src, frames, [0, 3, 6, 9])
    pipe = pipeline.load(release_weights)
    detector = commands.load_detector(str(release_weights))
    k = pipe.key_from_vector(np.full((1, 512), 0.75, np.float32))[0]
    run_ = lambda dst: video.anonymize_video(pipe, str(src), str(dst), k, detector=detector,  # noqa: E731
                                             key_record={"path": "vector"})
    record = run_(tmp_path / "out.mkv")
    assert record["tracks"] == [] and record["frames"] == 4
    got, _ = read_clip(tmp_path / "out.mkv")
    assert all(np.array_equal(a, b) for a, b in zip(got, frames)) and len(got) == 4

    real_write = video.Writer.write

    def interrupted(self, rgb, frame):  # Ctrl-C in pass 2, after two frames were encoded
        if frame.index == 2:
            raise KeyboardInterrupt
        real_write(self, rgb, frame)

    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(video.Writer, "write", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_(tmp_path / "stopped.mkv")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_tiny_frames_refused_before_the_weights_load(tmp_path, secret_file):
    src = tmp_path / "tiny.mkv"
    write_clip(src, [_plain_frame(1)[:16, :20]] * 2, [0, 3])
    args = [str(src), str(tmp_path / "o.mkv"), "--weights", str(tmp_path / "no_weights_here"),
            "--secret-file", str(secret_file), "--quiet"]
    with pytest.raises(InputError, match="frames of 20x16 pixels"):
        commands.anonymize_main(args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.mkv"]


def test_h264_cli_warns_and_checks_crf(tmp_path, release_weights, secret_file, capsys):
    src = tmp_path / "room.mkv"
    write_clip(src, [_plain_frame(400 + i) for i in range(2)], [0, 3])
    flags = ["--weights", str(release_weights), "--secret-file", str(secret_file), "--quiet", *FAST_KDF]
    h264 = [str(src), str(tmp_path / "o.mp4"), *flags, "--codec", "h264"]
    with pytest.raises(InputError, match="--crf"):
        commands.anonymize_main(h264 + ["--crf", "52"])
    assert commands.anonymize_main(h264 + ["--crf", "30"]) == 0
    assert "recovery from it will be degraded" in capsys.readouterr().err
    assert sidecar.read_video(str(tmp_path / "o.mp4.json")).codec == "h264"
    with pytest.raises(InputError, match="extensions .mkv"):  # FFV1 only in Matroska
        commands.anonymize_main([str(src), str(tmp_path / "o2.mp4"), *flags])


def test_zero_frames_is_one_error_and_nothing_written(tmp_path, release_weights, secret_file):
    """A container with a video stream but no video frame (only audio)."""
    src = tmp_path / "silent_film.mkv"
    with av.open(str(src), "w") as out:
        s = out.add_stream("ffv1", rate=25)
        s.height, s.width, s.pix_fmt = SIZE[0], SIZE[1], "bgr0"
        a = out.add_stream("aac", rate=8000, layout="mono")
        write_audio(out, a, 0.5)
        out.mux(s.encode())
    assert video.is_video(str(src))
    proc = run_cli("-m", "ifadit_jax.anonymize", str(src), str(tmp_path / "o.mkv"), "--weights",
                   str(release_weights), "--secret-file", str(secret_file), "--quiet", *FAST_KDF,
                   check=False)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "no decodable frames" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["silent_film.mkv"]


def test_single_frame_gif_is_a_photo_animated_gif_a_video(tmp_path, release_weights, secret_file):
    still, animated = tmp_path / "still.gif", tmp_path / "animated.gif"
    Image.fromarray(_face_frame(0)).save(still)
    Image.fromarray(_face_frame(0)).save(animated, save_all=True, duration=40,
                                         append_images=[Image.fromarray(_face_frame(1))])
    assert not video.is_video(str(still)) and video.is_video(str(animated))
    flags = ["--weights", str(release_weights), "--secret-file", str(secret_file), "--quiet", *FAST_KDF]
    assert commands.anonymize_main([str(still), str(tmp_path / "still_anon.png"), *flags]) == 0
    side = json.loads(open(sidecar.path_for(str(tmp_path / "still_anon.png"))).read())
    assert side["format"] != sidecar.VIDEO_FORMAT
    assert commands.anonymize_main([str(animated), str(tmp_path / "animated_anon.mkv"), *flags]) == 0
    got, _ = read_clip(tmp_path / "animated_anon.mkv")
    assert len(got) == 2 and got[0].shape == (*SIZE, 3)
