"""The video experiment: identity consistency, flicker, recovery through lossy codecs, speed.

  python -m experiments.run video --weights W --videos DIR --out OUT
  python -m experiments.run video --demo --out OUT     # random small networks, a built-in clip

Per clip: anonymize once to FFV1 (`ifadit_jax.video.anonymize_video`, timed per stage),
re-encode that file with H.264 at each `--crf`, and recover each of these outputs
(`recover_video`, the recorded geometry, never re-detecting). One streaming comparison pass
then decodes the original, every anonymized output and every recovery in lockstep and, at each
face-frame's recorded 2x3 transform, cuts the aligned 256 px crop:

* identity consistency: per track, the mean and the minimum pairwise ArcFace cosine between
  the track's frames (at most `MAX_CONSISTENCY_FRAMES` frames, evenly spaced), anonymized and
  original (a good pseudonym is as consistent as the person);
* flicker: the mean absolute difference (pixels in [0, 1]) between consecutive frames inside the
  face box, over the face-frames whose track is also in the previous frame, anonymized and
  original. The face box is the axis-aligned box around the central half of the aligned crop
  (crop pixels 64-192 both ways: eyes, nose, mouth; the rest of the crop is hair and background);
* recovery: PSNR, SSIM (metrics.py) and ArcFace cosine between the recovered and the original
  crops, and the PSNR of whole frames over the clip (from the clip's mean squared error);
* speed: frames per second of the whole anonymization and recovery, and of each stage alone
  (`video.STAGES`).

Rows: clip x output (ffv1, h264 crf N); the original's columns repeat on every row of a clip.
Writes OUT/video.{md,csv,json}, video_per_image.csv (one line per track and output) and
video_samples.png (frames: original / anonymized / recovered).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import tempfile
import time
from typing import Sequence

import jax
import numpy as np
from PIL import Image

from experiments import evaluate as ev
from experiments import tables
from ifadit_jax import align, metrics, sidecar
from ifadit_jax import video as video_lib
from ifadit_jax.errors import InputError

MAX_CONSISTENCY_FRAMES = 256  # per track: the pairwise cosines stay a small matrix
FACE_BOX = (64.0, 192.0)  # crop pixels (both axes) whose image box is the flicker region
EMBED_BATCH = 8  # crops per ArcFace call (one compiled shape)
SAMPLE_FRAMES = 3  # frames per clip in the PNG strip

COLUMNS = [
    tables.Column("id_mean_original", "orig. track cos mean"),
    tables.Column("id_min_original", "orig. track cos min"),
    tables.Column("id_mean_anon", "anon. track cos mean", "↑"),
    tables.Column("id_min_anon", "anon. track cos min", "↑"),
    tables.Column("flicker_original", "orig. flicker"),
    tables.Column("flicker_anon", "anon. flicker", "↓"),
    tables.Column("rec_psnr", "rec. PSNR (dB)", "↑", ".2f"),
    tables.Column("rec_ssim", "rec. SSIM", "↑"),
    tables.Column("rec_cos_arcface", "rec. ArcFace cos", "↑"),
    tables.Column("frame_psnr", "rec. frame PSNR (dB)", "↑", ".2f"),
    tables.Column("fps_anonymize", "anon. fps", "↑", ".2f"),
    tables.Column("fps_recover", "rec. fps", "↑", ".2f"),
]


# ----------------------------------------------------------------------------------------------
# The built-in demo clip


def _demo_frame(photo: np.ndarray, step: int, size: tuple[int, int]):
    """Frame `step` of the demo: a window over the photo that pans right and zooms in, resized
    to `size` (h, w) -> (uint8 frame, the astronaut's five landmarks in frame pixels)."""
    from ifadit_jax import demo

    h, w = size
    width = 384 - 6 * step
    x0, y0 = 24 + 5 * step, 8 + 2 * step
    window = photo[y0:y0 + width * h // w, x0:x0 + width]
    frame = np.asarray(Image.fromarray(window).resize((w, h), Image.BILINEAR))
    s = w / width
    # Pixel centres: x_out + 0.5 = (x_in - x0 + 0.5) * s.
    lm = (np.asarray(demo.ASTRONAUT_LANDMARKS) - [x0, y0] + 0.5) * s - 0.5
    return frame, lm


class KnownFaces:
    """The detector of the demo clip: the frames it was built from, by content, with their known
    landmarks (a random MTCNN would find nothing). Same `detect` as MTCNN."""

    def __init__(self):
        self._faces: dict[bytes, np.ndarray] = {}

    def add(self, frame: np.ndarray, landmarks: np.ndarray) -> None:
        self._faces[hashlib.sha256(np.ascontiguousarray(frame).tobytes()).digest()] = landmarks

    def detect(self, image, min_face_size: float = 20.0):
        lm = self._faces.get(hashlib.sha256(np.ascontiguousarray(image).tobytes()).digest())
        if lm is None:
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32)
        d = np.linalg.norm(lm[1] - lm[0])  # eye distance: MTCNN's box is about 2.4 of it wide
        box = [lm[:, 0].min() - 0.7 * d, lm[:, 1].min() - 1.0 * d,
               lm[:, 0].max() + 0.7 * d, lm[:, 1].max() + 0.7 * d]
        return (np.asarray([box], np.float32), np.ones(1, np.float32),
                np.asarray([lm], np.float32))


def demo_clip(path: str, frames: int = 6, size: tuple[int, int] = (144, 192)) -> KnownFaces:
    """Writes the demo clip (FFV1, 25 fps): `frames` frames of a pan and zoom over scikit-image's
    astronaut, then a cut to two face-free frames -> the detector that knows its faces."""
    import av
    from skimage import data

    photo, known = data.astronaut(), KnownFaces()
    rng = np.random.default_rng(0)
    with av.open(path, "w") as out:
        stream = out.add_stream("ffv1", rate=25)
        stream.height, stream.width, stream.pix_fmt = size[0], size[1], "bgr0"
        for i in range(frames + 2):
            if i < frames:
                frame, lm = _demo_frame(photo, i, size)
                known.add(frame, lm)
            else:
                frame = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            f = av.VideoFrame.from_ndarray(frame, format="rgb24")
            f.pts = i
            out.mux(stream.encode(f))
        out.mux(stream.encode())
    return known


# ----------------------------------------------------------------------------------------------
# Measures (pure numpy; each checked by hand in tests/test_video_experiment.py)


def pairwise_consistency(embeddings: np.ndarray) -> tuple[float, float]:
    """Mean and minimum cosine over all pairs of distinct rows of [T, D] -> (mean, min);
    (nan, nan) for fewer than two rows."""
    e = np.asarray(embeddings, np.float64)
    if len(e) < 2:
        return math.nan, math.nan
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    cos = e @ e.T
    pairs = cos[np.triu_indices(len(e), 1)]
    return float(pairs.mean()), float(pairs.min())


def face_box(a, size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Pixel box (y0, y1, x0, x1) of the frame covered by the crop region FACE_BOX (both axes)
    under the 2x3 transform `a`, clipped to the frame of `size` (h, w); None if empty."""
    lo, hi = FACE_BOX
    corners = align.apply(np.asarray(a, np.float64), np.array([[lo, lo], [hi, lo], [lo, hi], [hi, hi]]))
    x0, y0 = np.floor(corners.min(0)).astype(int)
    x1, y1 = np.ceil(corners.max(0)).astype(int)
    y0, y1, x0, x1 = max(y0, 0), min(y1, size[0]), max(x0, 0), min(x1, size[1])
    return (y0, y1, x0, x1) if y1 > y0 and x1 > x0 else None


def flicker(previous: np.ndarray, current: np.ndarray, box) -> float:
    """Mean absolute difference of two uint8 frames inside `box` (y0, y1, x0, x1), in [0, 1]."""
    y0, y1, x0, x1 = box
    a = previous[y0:y1, x0:x1].astype(np.float64)
    return float(np.abs(current[y0:y1, x0:x1].astype(np.float64) - a).mean() / 255.0)


def psnr_from_mse(mse: float) -> float:
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


# ----------------------------------------------------------------------------------------------
# One clip: anonymize, re-encode, recover


@dataclasses.dataclass(frozen=True)
class Settings:
    crfs: tuple[int, ...] = (18, 28)
    batch: int = 4  # faces per network call (faces of several frames share a call)
    refine: bool = True


@dataclasses.dataclass
class Produced:
    """The files of one clip and the time they took."""

    side: sidecar.VideoSidecar
    anonymized: dict  # output name -> anonymized file
    recovered: dict  # output name -> file recovered from it
    seconds: dict  # "anonymize" / "recover <name>" -> wall seconds
    stages: dict  # "anonymize" / "recover ffv1" -> {stage: seconds}


def transcode(src: str, dst: str, crf: int) -> None:
    """Re-encodes the FFV1 file `src` with H.264 at `crf` (timestamps and rotation kept)."""
    with video_lib.open_video(src) as container:
        frames = video_lib.decode(container, src)
        first = next(frames)
        writer = video_lib.Writer(dst, container, video_lib.EncodeOptions("h264", crf), first.rotation)
        writer.write(first.rgb, first)
        for f in frames:
            writer.write(f.rgb, f)
        writer.close()


def produce_clip(pipe, detector, src: str, k, key_record: dict, work: str,
                 settings: Settings) -> Produced:
    """Anonymizes `src` to FFV1, re-encodes it at each CRF, recovers every output (in `work`)."""
    anon = os.path.join(work, "anon_ffv1.mkv")
    seconds, stages = {}, {}
    with video_lib.stage_clock() as clock:
        t0 = time.perf_counter()
        record = video_lib.anonymize_video(pipe, src, anon, k, detector=detector, key_record=key_record,
                                           refine=settings.refine, batch=settings.batch)
        seconds["anonymize"] = time.perf_counter() - t0
    stages["anonymize"] = dict(clock.seconds)
    side = sidecar.validate_video(record, allow_costly=True)
    anonymized = {"ffv1": anon}
    for crf in settings.crfs:
        anonymized[f"h264 crf {crf}"] = os.path.join(work, f"anon_crf{crf}.mkv")
        transcode(anon, anonymized[f"h264 crf {crf}"], crf)
    recovered = {}
    for i, (name, path) in enumerate(anonymized.items()):
        recovered[name] = os.path.join(work, f"rec_{i}.mkv")
        h, w = side.size  # H.264 pads odd sides (video.Writer)
        padded = (h, w) if name == "ffv1" else (h + h % 2, w + w % 2)
        with video_lib.stage_clock() as clock:
            t0 = time.perf_counter()
            video_lib.recover_video(pipe, path, recovered[name], k, dataclasses.replace(side, size=padded),
                                    batch=settings.batch)
            seconds[f"recover {name}"] = time.perf_counter() - t0
        stages[f"recover {name}"] = dict(clock.seconds)
    return Produced(side, anonymized, recovered, seconds, stages)


# ----------------------------------------------------------------------------------------------
# One clip: the comparison pass


class Tally:
    """What the comparison pass gathers for one clip (outputs: the output names)."""

    def __init__(self, side: sidecar.VideoSidecar, outputs: Sequence[str]):
        self.outputs = list(outputs)
        self.size = side.size
        self.present = set()  # (frame index, track) of every face-frame
        self.kept = []  # per track: the frames whose embeddings enter the consistency
        for t, entries in enumerate(side.tracks):
            frames = [f for f, _ in entries]
            self.kept.append(set(frames[::max(1, math.ceil(len(frames) / MAX_CONSISTENCY_FRAMES))]))
            self.present.update((f, t) for f in frames)
        views = ["original", *self.outputs]
        self.emb = {v: [[] for _ in side.tracks] for v in views}
        self.flicker = {v: [[] for _ in side.tracks] for v in views}
        self.rec = {v: {"psnr": [], "ssim": [], "cos": [], "track": []} for v in self.outputs}
        self.frame_se = dict.fromkeys(self.outputs, 0.0)
        self.frames = 0
        face_frames = sorted({f for entries in side.tracks for f, _ in entries})
        picks = np.linspace(0, len(face_frames) - 1, min(SAMPLE_FRAMES, len(face_frames))).round()
        self.sample_at = {face_frames[int(i)] for i in picks} if face_frames else set()
        self.samples = []  # (frame index, {view name: uint8 frame})


def _embed(nets, pipe, crops: np.ndarray) -> np.ndarray:
    """ArcFace embeddings of [N, 256, 256, 3] crops in fixed batches -> [N, 512]."""
    out = []
    for s in range(0, len(crops), EMBED_BATCH):
        chunk = video_lib.pad_to(crops[s:s + EMBED_BATCH], EMBED_BATCH)
        out.append(np.asarray(ev.embed(nets, pipe.nets, chunk)["arcface"])[:min(EMBED_BATCH, len(crops) - s)])
    return np.concatenate(out)


def _view(v: str) -> str:
    """The image key of view `v` ("original" or an output name) in a frame's images."""
    return v if v == "original" else f"anon:{v}"


def _face_step(tally: Tally, nets, pipe, index: int, images: dict, faces) -> None:
    """Embeddings, recovery measures and consistency entries of the faces of frame `index`."""
    views = ["original", *tally.outputs]
    transforms = [a for a, _ in faces]
    crops = {name: video_lib.face_crops(img, transforms) for name, img in images.items()}
    order = [_view(v) for v in views] + [f"rec:{v}" for v in tally.outputs]
    emb = _embed(nets, pipe, np.concatenate([crops[name] for name in order]))
    emb = dict(zip(order, np.split(emb, len(order))))
    for j, (_, t) in enumerate(faces):
        if index in tally.kept[t]:
            for v in views:
                tally.emb[v][t].append(emb[_view(v)][j])
    for v in tally.outputs:
        rec, orig = crops[f"rec:{v}"], crops["original"]
        cos = np.sum(emb[f"rec:{v}"] * emb["original"], -1)
        tally.rec[v]["psnr"] += list(np.asarray(metrics.psnr(rec, orig), np.float64))
        tally.rec[v]["ssim"] += list(np.asarray(metrics.ssim(rec, orig), np.float64))
        tally.rec[v]["cos"] += list(cos.astype(np.float64))
        tally.rec[v]["track"] += [t for _, t in faces]


def _frame_step(tally: Tally, nets, pipe, index: int, images: dict, previous: dict | None,
                faces) -> None:
    """images: "original", and "anon:NAME" and "rec:NAME" per output name, uint8 [H, W, 3],
    cropped to the original size; previous: the same for frame `index` - 1."""
    h, w = tally.size
    for v in tally.outputs:
        diff = images[f"rec:{v}"].astype(np.float64) - images["original"]
        tally.frame_se[v] += float(np.mean(np.square(diff / 255.0)))
    if faces:
        _face_step(tally, nets, pipe, index, images, faces)
    for a, t in faces:
        box = face_box(a, (h, w))
        if previous is not None and box is not None and (index - 1, t) in tally.present:
            for v in ["original", *tally.outputs]:
                tally.flicker[v][t].append(flicker(previous[_view(v)], images[_view(v)], box))
    if index in tally.sample_at:
        tally.samples.append((index, dict(images)))
    tally.frames += 1


def compare(original: str, produced: Produced, nets, pipe) -> Tally:
    """Decodes the original, every anonymized output and every recovery in lockstep."""
    import contextlib

    side = produced.side
    tally = Tally(side, list(produced.anonymized))
    paths = {"original": original,
             **{f"anon:{v}": p for v, p in produced.anonymized.items()},
             **{f"rec:{v}": p for v, p in produced.recovered.items()}}
    by_frame = video_lib.faces_by_frame(side.tracks, range(len(side.tracks)))
    h, w = side.size
    with contextlib.ExitStack() as stack:
        streams = {n: video_lib.decode(stack.enter_context(video_lib.open_video(p)), p) for n, p in paths.items()}
        previous = None
        for frames in zip(*streams.values()):
            images = {n: np.ascontiguousarray(f.rgb[:h, :w]) for n, f in zip(streams, frames)}
            index = frames[0].index
            _frame_step(tally, nets, pipe, index, images, previous, by_frame.get(index, []))
            previous = images
    if tally.frames != side.frames:
        raise InputError(f"{original}: {tally.frames} frames compared, {side.frames} expected")
    return tally


# ----------------------------------------------------------------------------------------------
# Table, strip, command line

PSNR_CAP = 100.0  # dB: identical crops would give infinity, which JSON cannot hold


def _track_values(tally: Tally, v: str, t: int) -> dict:
    mean, low = pairwise_consistency(np.asarray(tally.emb[v][t]).reshape(-1, 512))
    return {"mean": mean, "min": low, "flicker": float(np.mean(tally.flicker[v][t]))
            if tally.flicker[v][t] else math.nan}


def _consistency_cells(tally: Tally, v: str, suffix: str) -> dict:
    per_track = [_track_values(tally, v, t) for t in range(len(tally.kept))]
    means = [p["mean"] for p in per_track if not math.isnan(p["mean"])]
    if not means:
        na = {"na": "no track with two frames"}
        return {f"id_mean_{suffix}": na, f"id_min_{suffix}": na}
    lows = [p["min"] for p in per_track if not math.isnan(p["min"])]
    return {f"id_mean_{suffix}": ev.summary(means), f"id_min_{suffix}": {"value": min(lows), "n": len(lows)}}


def clip_rows(name: str, produced: Produced, tally: Tally) -> tuple[list[dict], list[dict]]:
    """Table rows (one per output) and per-track lines of one clip."""
    rows, lines = [], []
    flick = {v: ev.summary([x for track in tally.flicker[v] for x in track])
             for v in ["original", *tally.outputs]}
    original = {**_consistency_cells(tally, "original", "original"), "flicker_original": flick["original"]}
    for v in tally.outputs:
        rec = tally.rec[v]
        frame_psnr = psnr_from_mse(tally.frame_se[v] / max(tally.frames, 1))
        rows.append({"clip": name, "output": v, "n": len(rec["psnr"]), **original,
                     **_consistency_cells(tally, v, "anon"), "flicker_anon": flick[v],
                     "rec_psnr": ev.summary(np.minimum(rec["psnr"], PSNR_CAP)),
                     "rec_ssim": ev.summary(rec["ssim"]), "rec_cos_arcface": ev.summary(rec["cos"]),
                     "frame_psnr": {"value": frame_psnr} if math.isfinite(frame_psnr)
                     else {"na": "every frame identical"},
                     "fps_anonymize": {"value": tally.frames / produced.seconds["anonymize"]},
                     "fps_recover": {"value": tally.frames / produced.seconds[f"recover {v}"]}})
        for t in range(len(tally.kept)):
            o, a = _track_values(tally, "original", t), _track_values(tally, v, t)
            mine = np.asarray(rec["track"]) == t
            lines.append({"clip": name, "output": v, "track": t, "frames": int(mine.sum()),
                          "id_mean_original": o["mean"], "id_min_original": o["min"],
                          "id_mean_anon": a["mean"], "id_min_anon": a["min"],
                          "flicker_original": o["flicker"], "flicker_anon": a["flicker"],
                          "rec_psnr": float(np.mean(np.minimum(np.asarray(rec["psnr"])[mine], PSNR_CAP))),
                          "rec_cos_arcface": float(np.mean(np.asarray(rec["cos"])[mine]))})
    return rows, lines


def stage_summary(produced: Produced, frames: int) -> dict:
    """{job: {"seconds": wall, "fps": frames / wall, "stages": {stage: {"seconds", "fps", "share"}}}}."""
    out = {}
    for job, stages in produced.stages.items():
        wall = produced.seconds[job]
        out[job] = {"seconds": round(wall, 3), "fps": frames / wall, "stages": {
            s: {"seconds": round(t, 3), "fps": frames / t if t > 0 else None, "share": t / wall}
            for s, t in stages.items()}}
    return out


NOTES = [
    "Identity consistency: per track, the mean and the minimum pairwise ArcFace cosine between "
    "its frames' aligned crops (at most 256 frames per track, evenly spaced); the mean column "
    "averages the tracks, the min column is the lowest over the tracks. A pseudonym should be as "
    "consistent as the person (orig. columns).",
    "Flicker: mean absolute difference (pixels in [0, 1]) between consecutive frames inside the face "
    "box (the frame box of the aligned crop's central half, pixels 64-192), over the face-frames "
    "whose track is in the previous frame too.",
    "Recovery: the anonymized output (ffv1, or the ffv1 file re-encoded with H.264 at the CRF) "
    "recovered with the right key from the recorded geometry; PSNR (capped at 100 dB), SSIM and "
    "ArcFace cosine of the recovered aligned crops against the original's; frame PSNR over whole "
    "frames from the clip's mean squared error (face-free frames count too).",
    "fps: frames of the clip over the wall time of the whole job (both passes, networks compiled "
    "beforehand or not: the first clip includes compilation); per-stage figures in video.json.",
]


def _square(img: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> [S, S, 3] in [0, 1], letterboxed in black (tiles are square)."""
    h, w = img.shape[:2]
    s = max(h, w)
    out = np.zeros((s, s, 3), np.float32)
    out[(s - h) // 2:(s - h) // 2 + h, (s - w) // 2:(s - w) // 2 + w] = img / 255.0
    return out


def strip(results: list, title: str) -> Image.Image:
    """PNG strip: per clip, SAMPLE_FRAMES face-frames as original / anonymized / recovered."""
    rows, headers = [], ["original"]
    for name, _, tally in results:
        first, last = tally.outputs[0], tally.outputs[-1]
        headers = ["original", f"anonymized ({first})", f"recovered ({first})", f"recovered ({last})"]
        for index, images in tally.samples:
            rows.append([(_square(images["original"]), f"{name} #{index}", None),
                         (_square(images[f"anon:{first}"]), "", None),
                         (_square(images[f"rec:{first}"]), "", None),
                         (_square(images[f"rec:{last}"]), "", None)])
    return tables.grid(title, headers if rows else ["(no face-frames)"], rows)


def list_videos(path: str) -> list[str]:
    """A video file, or the videos (by content) directly in a folder, sorted."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise InputError(f"--videos: no such file or folder: {path}")
    found = [os.path.join(path, n) for n in sorted(os.listdir(path))]
    found = [p for p in found if video_lib.is_video(p)]
    if not found:
        raise InputError(f"--videos: no video in {path}")
    return found


def _setup(args):
    """-> (pipeline, its description, detector or None for the demo clip's known faces)."""
    from ifadit_jax import commands, pipeline

    if args.images or args.ablation:
        raise InputError("the video experiment takes --videos, not --images or --ablation")
    if bool(args.weights) == bool(args.demo):
        raise InputError("give either --weights DIR or --demo")
    if not args.videos and not args.demo:
        raise InputError("give --videos DIR (or --demo for the built-in clip)")
    if args.videos and not (args.weights or args.mtcnn):
        raise InputError("--demo on your own videos needs a face detector: --mtcnn FILE")
    if args.videos:
        list_videos(args.videos)  # a wrong folder fails before anything loads
    detector = None
    if args.weights or args.mtcnn:
        detector = commands.load_detector(args.weights or "", args.mtcnn)
    if args.weights:
        return pipeline.load(args.weights), os.path.abspath(args.weights), detector
    return ev.demo_pipeline(seed=0), "built-in demo (random weights)", detector


def _clip_key(key_scheme: ev.KeyScheme, pipe, index: int):
    """Clip `index`'s key (the tables' "anon" stream) and its sidecar record."""
    k = np.asarray(key_scheme.keys(pipe.nets, key_scheme.vectors("anon", [index])))[0]
    record = ({"path": "vector"} if key_scheme.path == "vector"
              else {"path": "kdf", "kdf": key_scheme.kdf.to_dict()})
    return k, record


def _evaluate(args, pipe, detector, nets, key_scheme, settings, work: str) -> list:
    """-> [(clip name, Produced, Tally)] for every clip."""
    clips = list_videos(args.videos) if args.videos else [os.path.join(work, "astronaut_pan.mkv")]
    if not args.videos:
        known = demo_clip(clips[0])
        detector = detector or known
    results = []
    for i, clip in enumerate(clips):
        k, record = _clip_key(key_scheme, pipe, i)
        clip_work = os.path.join(work, f"clip{i}")
        os.mkdir(clip_work)
        produced = produce_clip(pipe, detector, clip, k, record, clip_work, settings)
        results.append((os.path.basename(clip), produced, compare(clip, produced, nets, pipe)))
    return results


def main(args, command: str, kdf) -> int:
    """`python -m experiments.run video ...` (args from experiments.run's parser)."""
    tables.check_outputs(args.out, ["video"], args.force)
    crfs = tuple(args.crf or Settings.crfs)
    if any(not 0 <= c <= 51 for c in crfs):
        raise InputError("--crf values must be 0 to 51")
    pipe, where, detector = _setup(args)
    nets = ev.load_metric_nets({"arcface": args.arcface})
    key_scheme = ev.KeyScheme(path=args.key_path or pipe.conventions.key_path, seed=args.seed, kdf=kdf)
    settings = Settings(crfs=crfs, refine=not args.no_refine)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ifadit-video-exp-") as work:
        results = _evaluate(args, pipe, detector, nets, key_scheme, settings, work)
    rows, lines, notes = [], [], ([tables.DEMO_NOTE] if args.demo else []) + list(NOTES)
    for name, produced, tally in results:
        r, l = clip_rows(name, produced, tally)
        rows, lines = rows + r, lines + l
        s = stage_summary(produced, tally.frames)["anonymize"]
        notes.append(f"{name}: {tally.frames} frames {produced.side.size[1]}x{produced.side.size[0]}, "
                     f"{len(produced.side.tracks)} track(s); anonymize {s['fps']:.2f} fps, per stage: "
                     + ", ".join(f"{k} {v['share']:.0%}" for k, v in s["stages"].items()))
    meta = {"command": command, "pipelines": [ev.describe_pipeline(pipe, where)],
            "keys": key_scheme.to_dict(), "settings": dataclasses.asdict(settings),
            "metric_networks": nets.sources, "demo": bool(args.demo),
            "clips": {name: {"frames": t.frames, "size": list(p.side.size), "tracks": len(p.side.tracks),
                             "timing": stage_summary(p, t.frames)} for name, p, t in results},
            "seconds": {"total": round(time.perf_counter() - t0, 2)},
            "versions": {"jax": jax.__version__, "backend": jax.default_backend()}}
    table = tables.Table("video", "Video: identity consistency, flicker, recovery through codecs",
                         ["clip", "output"], COLUMNS, rows, notes, meta, lines)
    title = table.title + (" [DEMO: random weights]" if args.demo else "")
    tables.write(table, strip(results, title), args.out)
    if not args.quiet:
        print(table.markdown())
    return 0
