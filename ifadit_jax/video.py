"""Video: one reversible pseudonym per tracked person, streamed through the iFADIT networks.

Two passes over the file, so that memory is bounded by a few frames (plus a few numbers per
face), never by the clip's length:

1. decode -> MTCNN (DET_FRAMES frames per call) -> align each face (raw landmarks) -> E_ID ->
   associate the detections into tracks (`Tracker`: box IoU and identity cosine, Hungarian assignment);
   each track keeps its landmarks and the running sum of its unit E_ID vectors;
2. smooth each track's landmarks along time (centred moving average, `smooth_landmarks`), one
   FFHQ transform per face-frame; z_track = normalized mean of the track's E_ID vectors and
   z_anon = T(z_track, k) once per track; decode again, and for every face-frame render
   G(M(z_anon, E_Attr(crop))), blend with the crop's soft face mask, paste back; encode.

Frames without faces are encoded from the decoded pixels untouched, so with the default
lossless FFV1 (RGB, `bgr0`) they decode bit-identical to the input's decoded frames.

Recovery reads the per-face-frame transforms from the sidecar (never detects): pass 1 collects
the normalized mean E_ID of each track over the anonymized frames, C and T^-1 give one
recovered identity per track; pass 2 renders it with each frame's attributes.

Output goes to a temporary file beside the destination, renamed only on success (errors and
Ctrl-C leave nothing). Timestamps (pts) of every frame are passed through to the encoder in the
input's time base (Matroska stores milliseconds); the display rotation is copied.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import os
import stat
import sys
import time
from fractions import Fraction
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from ifadit_jax import align, files, imageio, sidecar
from ifadit_jax import pipeline as pipeline_lib
from ifadit_jax import refine as refine_lib
from ifadit_jax.errors import InputError

CROP = 256
# Association cost between a track and a detection (both terms in [0, 1]):
#   cost = IOU_WEIGHT * (1 - IoU(last box, box)) + (1 - IOU_WEIGHT) * (1 - cos(z_track, z)) / 2
# A pair is linked only if cost <= MAX_COST: with no overlap at all the identity cosine must
# reach 0.6 (the same person with ArcFace), with the usual frame-to-frame overlap (IoU > 0.7) any
# plausible embedding links.
IOU_WEIGHT = 0.5
MAX_COST = 0.6
MAX_GAP = 5  # frames a track survives without a detection (a short occlusion keeps the id)
SMOOTH_RADIUS = 2  # landmarks averaged over frames t-2..t+2 of the same track
DET_FRAMES = 4  # frames per detector call (MTCNN.detect_many): fewer, larger network calls
# Pass 2 holds up to this many frames until their faces fill a network batch (--batch): with one
# face per frame, one call renders `batch` frames' faces instead of one face padded to `batch`.
RENDER_FRAMES = 8
MIN_SIDE = 24  # as for photos: MTCNN's smallest pyramid level needs 12 px, faces more
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts")
# FFmpeg also opens photos as one-frame "videos", and renders text files with the .nfo, .asc,
# .diz, .ans extensions as ANSI art ("tty"): neither is a video.
_IMAGE_DEMUXERS = ("image2", "tty")
# Formats that hold a photo or an animation: a video only with at least two frames.
_ANIMATION_DEMUXERS = ("gif", "apng")


# ----------------------------------------------------------------------------------------------
# Time per stage (read by experiments/video.py and bench/bench_video.py)

STAGES = ("decode", "detect", "track", "warp", "networks", "paste", "encode")


@dataclasses.dataclass
class StageClock:
    """Wall-clock seconds per stage of everything the video passes did inside `stage_clock()`:
    decode (demux, decode, to RGB), detect (MTCNN), track (association), warp (aligned crops),
    networks (E_ID, E_Attr, G, mask, flow; blocking on the results), paste (paste-back),
    encode (to the output codec, mux)."""

    seconds: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    def fps(self, frames: int) -> dict:
        """Frames per second each stage alone would allow (None for a stage that took no time)."""
        return {s: (frames / t if t > 0 else None) for s, t in self.seconds.items()}


_CLOCK: contextvars.ContextVar = contextvars.ContextVar("ifadit_video_clock", default=None)


@contextlib.contextmanager
def stage_clock():
    """Within the block, the video passes add their time per stage to the yielded StageClock
    (outside one, timing costs nothing)."""
    token = _CLOCK.set(StageClock())
    try:
        yield _CLOCK.get()
    finally:
        _CLOCK.reset(token)


def _charge(stage: str, t0: float) -> float:
    """Adds the time since `t0` to `stage` on the active clock -> now."""
    now = time.perf_counter()
    clock = _CLOCK.get()
    if clock is not None:
        clock.seconds[stage] += now - t0
    return now


@contextlib.contextmanager
def _stage(stage: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _charge(stage, t0)


# ----------------------------------------------------------------------------------------------
# Decoding


def _has_two_frames(container) -> bool:
    """Whether the first video stream holds at least two packets (read no further)."""
    n = 0
    for packet in container.demux(video=0):
        n += 1 if packet.size else 0
        if n >= 2:
            return True
    return False


def is_video(path: str) -> bool:
    """Whether `path` is a regular file that FFmpeg opens with a video stream (not a photo; an
    animated GIF or APNG is a video, a single-frame one a photo)."""
    import av

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with av.open(path, metadata_errors="ignore") as c:
            name = c.format.name
            if not c.streams.video or name in _IMAGE_DEMUXERS or name.endswith("_pipe"):
                return False
            return name not in _ANIMATION_DEMUXERS or _has_two_frames(c)
    except (OSError, ValueError, av.error.FFmpegError):
        return False


def looks_like_video(path: str) -> bool:
    """A video by content, or by extension (so that a broken clip gets a video error message)."""
    return os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS or is_video(path)


def open_video(path: str):
    """The opened container; its declared frame size checked against the photo limits."""
    import av

    if not is_video(path):
        raise InputError(f"{path}: not a video (FFmpeg finds no video stream in it)")
    try:
        container = av.open(path, metadata_errors="ignore")
    except (OSError, ValueError, av.error.FFmpegError) as e:
        raise InputError(f"{path}: cannot open the video ({type(e).__name__})") from None
    ctx = container.streams.video[0].codec_context
    h, w = ctx.height, ctx.width
    if h * w > imageio.MAX_PIXELS or min(h, w) < MIN_SIDE or max(h, w) > sidecar.MAX_SIDE:
        container.close()
        raise InputError(f"{path}: frames of {w}x{h} pixels; sides of {MIN_SIDE} to "
                         f"{sidecar.MAX_SIDE} and at most {imageio.MAX_PIXELS} pixels are supported")
    return container


@dataclasses.dataclass
class Frame:
    index: int
    rgb: np.ndarray  # [H, W, 3] uint8, upright (the display rotation applied)
    pts: int
    time_base: Fraction
    rotation: int  # degrees counterclockwise, as FFmpeg's display matrix says


def quarter_turns(rotation: int) -> int:
    """Counterclockwise quarter turns that make a frame upright (0 for other angles)."""
    return (rotation // 90) % 4 if rotation % 90 == 0 else 0


def _rate(stream) -> Fraction:
    return Fraction(stream.average_rate or stream.guessed_rate or 25)


def decode(container, path: str, audio_out=None) -> Iterator[Frame]:
    """Frames of the first video stream as 8-bit RGB (10-bit and 4:2:2 sources are converted);
    with `audio_out(packet)`, the packets of the audio streams are handed over unchanged."""
    import av

    video = container.streams.video[0]
    streams = [video] + (list(container.streams.audio) if audio_out else [])
    index, fallback_tb = 0, 1 / _rate(video)
    t0 = time.perf_counter()
    try:
        for packet in container.demux(*streams):
            if packet.stream.type == "audio":
                if packet.dts is not None:
                    audio_out(packet)
                continue
            for f in packet.decode():
                pts, tb = (f.pts, f.time_base) if f.pts is not None and f.time_base else (index, fallback_tb)
                rotation = int(f.rotation or 0)
                # Faces are detected upright (a phone video stored sideways); the writer turns
                # the frame back, so untouched pixels stay bit-exact.
                rgb = np.ascontiguousarray(np.rot90(f.to_ndarray(format="rgb24"), quarter_turns(rotation)))
                _charge("decode", t0)
                yield Frame(index, rgb, pts, Fraction(tb), rotation)
                t0 = time.perf_counter()  # the consumer's time is not decoding
                index += 1
    except (av.error.FFmpegError, ValueError) as e:
        raise InputError(f"{path}: cannot decode frame {index} ({type(e).__name__}); "
                         f"{index} frames were readable, nothing written") from None


# ----------------------------------------------------------------------------------------------
# Tracking


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a [N, 4] and b [M, 4] (x0, y0, x1, y1) -> [N, M]."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def association_cost(iou: np.ndarray, cosine: np.ndarray) -> np.ndarray:
    return IOU_WEIGHT * (1.0 - iou) + (1.0 - IOU_WEIGHT) * (1.0 - cosine) / 2.0


@dataclasses.dataclass
class Track:
    frames: list  # frame indices, increasing
    landmarks: list  # [5, 2] per frame
    last_box: np.ndarray
    id_sum: np.ndarray  # sum of the unit E_ID vectors (float64)

    @property
    def identity(self) -> np.ndarray:
        return self.id_sum / max(np.linalg.norm(self.id_sum), 1e-12)


class Tracker:
    """Links each frame's detections to the live tracks (Hungarian assignment on
    `association_cost`); a track not seen for more than MAX_GAP frames is closed."""

    def __init__(self):
        self.tracks: list[Track] = []
        self._live: list[int] = []

    def step(self, index: int, boxes, landmarks, ids) -> list[int]:
        """Detections of frame `index` -> the track number of each."""
        self._live = [t for t in self._live if index - self.tracks[t].frames[-1] <= MAX_GAP + 1]
        assigned = [-1] * len(boxes)
        if self._live and len(boxes):
            live = [self.tracks[t] for t in self._live]
            iou = box_iou(np.stack([t.last_box for t in live]), np.asarray(boxes))
            cosine = np.stack([t.identity for t in live]) @ np.asarray(ids, np.float64).T
            cost = association_cost(iou, cosine)
            for r, c in zip(*linear_sum_assignment(cost)):
                if cost[r, c] <= MAX_COST:
                    assigned[c] = self._live[r]
        for i, t in enumerate(assigned):
            if t < 0:
                self.tracks.append(Track([], [], np.zeros(4), np.zeros(len(ids[i]))))
                t = assigned[i] = len(self.tracks) - 1
                self._live.append(t)
            track = self.tracks[t]
            track.frames.append(index)
            track.landmarks.append(np.asarray(landmarks[i], np.float64))
            track.last_box = np.asarray(boxes[i], np.float64)
            track.id_sum = track.id_sum + np.asarray(ids[i], np.float64)
        return assigned


def smooth_landmarks(landmarks: np.ndarray, radius: int = SMOOTH_RADIUS) -> np.ndarray:
    """Centred moving average of [T, 5, 2] landmarks over t-radius..t+radius (shorter at the
    ends of the track), so the aligned crop does not jitter with the detector's noise."""
    lm = np.asarray(landmarks, np.float64)
    c = np.concatenate([np.zeros((1, *lm.shape[1:])), np.cumsum(lm, axis=0)])
    t = np.arange(len(lm))
    lo, hi = np.maximum(t - radius, 0), np.minimum(t + radius + 1, len(lm))
    return (c[hi] - c[lo]) / (hi - lo)[:, None, None]


def track_transforms(track: Track) -> list[tuple[int, np.ndarray]]:
    """(frame index, 2x3 crop transform) per face-frame, from the smoothed landmarks."""
    smooth = smooth_landmarks(np.stack(track.landmarks))
    return [(f, align.crop_transform(lm, CROP)) for f, lm in zip(track.frames, smooth)]


# ----------------------------------------------------------------------------------------------
# Networks


@functools.partial(jax.jit, static_argnames=("refine",))
def render_faces(nets, crops, z, refine: bool):
    """Crops [B, 256, 256, 3] in [0, 1] and one identity per crop z [B, 512] -> faces with that
    identity and each crop's attributes, blended with the crop's face mask when `refine`
    (pipeline Eq. 9-11 with the identity given) -> (images [B, 256, 256, 3], masks or None)."""
    generated, _ = pipeline_lib.render(nets, z, pipeline_lib.attributes(nets, crops))
    if not refine:
        return generated, None
    mask = pipeline_lib.face_mask(nets, crops)
    return refine_lib.blend(generated, crops, mask), mask


_identity = jax.jit(pipeline_lib.identity)


def pad_to(x: np.ndarray, n: int) -> np.ndarray:
    """Repeats the last row of `x` up to `n` rows."""
    return np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)]) if len(x) < n else x


def in_fixed_batches(fn, crops: np.ndarray, batch: int, *extra):
    """Runs `fn(crops, *extra)` in fixed batches (one compiled shape) -> list of numpy outputs."""
    outs = []
    for start in range(0, len(crops), batch):
        n = min(batch, len(crops) - start)
        args = [pad_to(x[start:start + n], batch) for x in (crops, *extra)]
        result = fn(*args)
        result = result if isinstance(result, tuple) else (result,)
        outs.append([None if r is None else np.asarray(r)[:n] for r in result])
    return [None if parts[0] is None else np.concatenate(parts) for parts in zip(*outs)]


def face_crops(rgb: np.ndarray, transforms) -> np.ndarray:
    photo = rgb.astype(np.float32) / 255.0
    return np.stack([align.warp_to_crop(photo, np.asarray(a), CROP) for a in transforms])


def identities(pipe, crops: np.ndarray, batch: int) -> np.ndarray:
    return in_fixed_batches(lambda x: _identity(pipe.nets, x), crops, batch)[0]


def _embed_many(pipe, frames: list, transforms: list, batch: int) -> list:
    """E_ID of the faces of several uint8 frames (per frame, its 2x3 transforms), all faces in
    shared batches -> per frame [N_i, 512]."""
    counts = [len(t) for t in transforms]
    if not sum(counts):
        return [np.zeros((0, 512), np.float32) for _ in frames]
    with _stage("warp"):
        crops = np.concatenate([face_crops(rgb, t) for rgb, t in zip(frames, transforms) if len(t)])
    with _stage("networks"):
        z = identities(pipe, crops, batch)
    return np.split(z, np.cumsum(counts)[:-1])


def anonymized_identities(pipe, z_tracks: np.ndarray, k) -> np.ndarray:
    """T(z_track, k) for every track: [N, 512] -> [N, 512]."""
    k = jnp.broadcast_to(jnp.asarray(k, jnp.float32).reshape(-1, 512)[:1], (len(z_tracks), 512))
    return np.asarray(pipe.nets.apply("flow", jnp.asarray(z_tracks, jnp.float32), k)[0])


def recovered_identities(pipe, z_tracks: np.ndarray, k) -> np.ndarray:
    """T^-1(C(z_track), k) for every track (C skipped without ICL): [N, 512] -> [N, 512]."""
    nets = pipe.nets
    z = jnp.asarray(z_tracks, jnp.float32)
    z = nets.apply("icl", z) if "icl" in nets else z
    k = jnp.broadcast_to(jnp.asarray(k, jnp.float32).reshape(-1, 512)[:1], (len(z_tracks), 512))
    return np.asarray(nets.apply("flow", z, k, method="inverse")[0])


def render_frames(pipe, frames: list, faces: list, refine: bool, batch: int) -> list:
    """uint8 frames and per frame its faces [(2x3 transform, identity [512])] -> the uint8
    frames with every face rendered with its identity and pasted back. The faces of all the
    frames share the network batches (one face per frame still fills a batch of `batch`); a
    frame without faces is returned as the very same array."""
    if not any(faces):
        return list(frames)
    with _stage("warp"):
        crops = np.concatenate([face_crops(rgb, [a for a, _ in fs]) for rgb, fs in zip(frames, faces) if fs])
    z = np.stack([np.asarray(z, np.float32) for fs in faces for _, z in fs])
    with _stage("networks"):
        out, masks = in_fixed_batches(lambda c, zz: render_faces(pipe.nets, c, zz, refine), crops, batch, z)
    with _stage("paste"):
        results, j = list(frames), 0
        for i, fs in enumerate(faces):
            if not fs:
                continue
            result = frames[i].astype(np.float32) / 255.0
            for a, _ in fs:
                result = align.paste_back(result, out[j], np.asarray(a, np.float64), feather=0.1,
                                          mask=None if masks is None else masks[j])
                j += 1
            results[i] = imageio.to_uint8(result)
        return results


def render_frame(pipe, rgb: np.ndarray, faces, refine: bool, batch: int) -> np.ndarray:
    """`render_frames` for one frame."""
    return render_frames(pipe, [rgb], [faces], refine, batch)[0]


# ----------------------------------------------------------------------------------------------
# Encoding


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    codec: str = "ffv1"  # "ffv1" (lossless RGB) or "h264"
    crf: int = 18
    keep_audio: bool = False


class Writer:
    """Encodes upright RGB frames into `path` (container from its extension) with the given
    timestamps, turned back to the stored orientation; h264 (4:2:0) frames of odd size are
    padded by one edge row/column at the bottom/right of the upright frame."""

    def __init__(self, path: str, src_container, opts: EncodeOptions, rotation: int):
        import av

        video = src_container.streams.video[0]
        self.out = av.open(path, "w")
        name = "ffv1" if opts.codec == "ffv1" else "libx264"
        self.stream = self.out.add_stream(name, rate=_rate(video))
        h, w = video.codec_context.height, video.codec_context.width
        self.pad = (0, 0) if opts.codec == "ffv1" else (h % 2, w % 2)
        self.stream.height, self.stream.width = h + self.pad[0], w + self.pad[1]
        self.stream.pix_fmt = "bgr0" if opts.codec == "ffv1" else "yuv420p"
        if opts.codec == "h264":
            self.stream.options = {"crf": str(opts.crf)}
        self.time_base = Fraction(video.time_base or 1 / _rate(video))
        self.stream.codec_context.time_base = self.time_base
        self.turns = quarter_turns(rotation)
        if rotation:
            self.stream.set_display_rotation(rotation)
        self.audio = {}
        if opts.keep_audio:
            for a in src_container.streams.audio:
                self.audio[a.index] = self.out.add_stream_from_template(a)

    def audio_packet(self, packet) -> None:
        import av

        out = self.audio.get(packet.stream.index)
        if out is not None:
            packet.stream = out
            try:
                self.out.mux(packet)
            except av.error.FFmpegError as e:
                raise InputError(f"cannot copy the audio ({type(e).__name__}); this container may "
                                 "not hold its codec: try another output extension or drop "
                                 "--keep-audio") from None

    def write(self, rgb: np.ndarray, frame: Frame) -> None:
        with _stage("encode"):
            self._write(rgb, frame)

    def _write(self, rgb: np.ndarray, frame: Frame) -> None:
        import av

        if any(self.pad):  # at the bottom and right of the upright frame: transforms stay valid
            rgb = np.pad(rgb, ((0, rgb.shape[0] % 2), (0, rgb.shape[1] % 2), (0, 0)), mode="edge")
        rgb = np.rot90(rgb, -self.turns) if self.turns else rgb
        f = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        f.pts = int(round(frame.pts * frame.time_base / self.time_base))
        f.time_base = self.time_base
        self.out.mux(self.stream.encode(f))

    def close(self) -> None:
        with _stage("encode"):
            self.out.mux(self.stream.encode())
            self.out.close()


# ----------------------------------------------------------------------------------------------
# The two passes


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int | None, desc: str, quiet: bool):
    """A bar in frames (with fps and ETA) on a terminal; nothing otherwise."""
    if quiet or not sys.stderr.isatty():
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total or None, desc=desc, unit="frame", file=sys.stderr)


@dataclasses.dataclass
class Clip:
    """What pass 1 learns about a clip."""

    frames: int
    size: tuple[int, int]  # (height, width) of the decoded frames
    time_base: Fraction
    rotation: int


def _count_check(path: str, n: int, expected: int | None) -> None:
    if n == 0:
        raise InputError(f"{path}: the video has no decodable frames")
    if expected is not None and n != expected:
        raise InputError(f"{path}: {n} frames decoded, {expected} expected (the file changed or "
                         "its sidecar belongs to another video); nothing written")


def _declared_seconds(container) -> float | None:
    """The video stream's duration as the container declares it (Matroska's DURATION tag, the
    stream's own duration, or the file's when the video is its only stream)."""
    video = container.streams.video[0]
    tag = video.metadata.get("DURATION") or video.metadata.get("duration")
    if tag:
        try:
            h, m, sec = tag.split(":")
            return int(h) * 3600 + int(m) * 60 + float(sec)
        except ValueError:
            pass
    if video.duration and video.time_base:
        return float(video.duration * video.time_base)
    if len(container.streams) == 1 and container.duration:
        return container.duration / 1e6
    return None


def _check_complete(container, path: str, n: int, last: Frame | None) -> None:
    """A truncated file often decodes without an error, just fewer frames: compare the end of
    the last frame with the declared duration (and the declared frame count where there is one)."""
    _count_check(path, n, None)
    video = container.streams.video[0]
    step = 1 / float(_rate(video))
    declared = _declared_seconds(container)
    end = float(last.pts * last.time_base) + step - float((video.start_time or 0) * (video.time_base or 0))
    if (video.frames and n < video.frames) or (declared and end < declared - 2 * step - 0.05):
        raise InputError(f"{path}: the video is truncated or corrupt: {n} frames were decodable "
                         f"(up to {end:.2f} s of {declared or 0:.2f} s); nothing written")


class _Detected:
    """One frame's detections, computed with its neighbours (`MTCNN.detect_many`), offered
    through the `detect` interface whose results `commands.detect_faces` filters."""

    def __init__(self, result):
        self._result = result

    def detect(self, image, min_face_size=None):
        return self._result


def _detect_group(detector, frames: list, min_prob: float, min_size: float) -> list:
    """Faces of each of `frames` (commands.Face lists, largest first), one batched detector call
    when the detector has `detect_many`."""
    from ifadit_jax.commands import detect_faces

    with _stage("detect"):
        many = getattr(detector, "detect_many", None)
        found = ([detector] * len(frames) if many is None
                 else [_Detected(r) for r in many([f.rgb for f in frames], min_face_size=min_size)])
        cap = sidecar.MAX_VIDEO_FACES_PER_FRAME
        return [detect_faces(d, f.rgb.astype(np.float32) / 255.0, min_prob, min_size)[:cap]
                for d, f in zip(found, frames)]


def _track_group(pipe, detector, tracker: Tracker, frames: list, batch: int, min_prob: float,
                 min_size: float) -> None:
    """Detects, embeds (the faces of all `frames` in shared batches) and tracks a few frames."""
    found = _detect_group(detector, frames, min_prob, min_size)
    ids = _embed_many(pipe, [f.rgb for f in frames], [[x.transform for x in fs] for fs in found], batch)
    for frame, faces, z in zip(frames, found, ids):
        if faces:
            with _stage("track"):
                tracker.step(frame.index, [f.box for f in faces], [f.landmarks for f in faces], z)


def track_pass(pipe, detector, path: str, batch: int = 4, min_prob: float = 0.9,
               min_size: float = 20.0, quiet: bool = True) -> tuple[list[Track], Clip]:
    """Pass 1 of anonymization: detect (DET_FRAMES frames per detector call), embed and track
    every face -> (tracks, clip)."""
    tracker, clip, last, group = Tracker(), None, None, []
    with open_video(path) as container:
        bar = _progress(container.streams.video[0].frames, "tracking", quiet)
        for frame in decode(container, path):
            if clip is None:
                clip = Clip(0, frame.rgb.shape[:2], frame.time_base, frame.rotation)
            if frame.rgb.shape[:2] != clip.size:
                raise InputError(f"{path}: frame {frame.index} changes size; not supported")
            last = frame
            group.append(frame)
            clip.frames += 1
            if len(group) == DET_FRAMES:
                _track_group(pipe, detector, tracker, group, batch, min_prob, min_size)
                bar.update(len(group))
                group = []
        if group:
            _track_group(pipe, detector, tracker, group, batch, min_prob, min_size)
            bar.update(len(group))
        bar.close()
        _check_complete(container, path, 0 if clip is None else clip.frames, last)
    return tracker.tracks, clip


def faces_by_frame(tracks_transforms, identities_per_track) -> dict[int, list]:
    """{frame index: [(2x3 transform, identity [512]), ...]} from per-track (frame, A) lists."""
    by_frame: dict[int, list] = {}
    for entries, z in zip(tracks_transforms, identities_per_track):
        for index, a in entries:
            by_frame.setdefault(index, []).append((a, z))
    return by_frame


def render_pass(pipe, src: str, dst: str, by_frame: dict, clip: Clip, refine: bool,
                opts: EncodeOptions, batch: int, quiet: bool) -> None:
    """Pass 2: decode `src` again, render the faces of `by_frame`, encode into `dst` (the
    caller's temporary file, replaced)."""
    import av

    with open_video(src) as container:
        try:
            writer = Writer(dst, container, opts, clip.rotation)
        except (av.error.FFmpegError, ValueError) as e:
            raise InputError(f"cannot start the {opts.codec} output ({type(e).__name__}: {e})"[:300]) from None
        bar, n, pending = _progress(clip.frames, "rendering", quiet), 0, []
        try:
            audio = writer.audio_packet if opts.keep_audio else None
            for frame in decode(container, src, audio):
                if frame.rgb.shape[:2] != clip.size:
                    raise InputError(f"{src}: frame {frame.index} changes size; not supported")
                pending.append((frame, by_frame.get(frame.index, [])))
                if sum(len(f) for _, f in pending) >= batch or len(pending) >= RENDER_FRAMES:
                    n += _render_and_write(pipe, writer, pending, refine, batch, bar)
                    pending = []
            n += _render_and_write(pipe, writer, pending, refine, batch, bar)
            _count_check(src, n, clip.frames)
            writer.close()
        except av.error.FFmpegError as e:  # decoding errors are InputErrors already
            _discard(writer)
            raise InputError(f"cannot encode the output ({type(e).__name__}: {e})"[:300]) from None
        except BaseException:
            _discard(writer)
            raise
        finally:
            bar.close()


def _render_and_write(pipe, writer, pending: list, refine: bool, batch: int, bar) -> int:
    """Renders the faces of the pending (frame, faces) pairs together, encodes the frames in
    order -> how many were written."""
    rendered = render_frames(pipe, [f.rgb for f, _ in pending], [fs for _, fs in pending], refine, batch)
    for (frame, _), rgb in zip(pending, rendered):
        writer.write(rgb, frame)
        bar.update()
    return len(pending)


def _discard(writer) -> None:
    """Closes a writer whose output is being thrown away; its own errors no longer matter."""
    with contextlib.suppress(Exception):
        writer.close()


def _write_outputs(dst: str, record: dict, encode) -> None:
    """`encode(tmp_path)` writes the video; then the sidecar; then the video is renamed onto
    `dst`. Any failure (or Ctrl-C) leaves neither file behind."""
    text = json.dumps(record, separators=(",", ":"))
    if len(text) > sidecar.MAX_VIDEO_BYTES:
        raise InputError(f"{dst}: the recovery record would exceed {sidecar.MAX_VIDEO_BYTES} bytes "
                         "(too many face-frames); split the clip")
    side_path = sidecar.path_for(dst)
    wrote_side = False
    try:
        with files.atomic_path(dst, force=True) as tmp:
            encode(tmp)
            with files.atomic_path(side_path, force=True) as tmp_side:
                with open(tmp_side, "w") as f:
                    f.write(text)
            wrote_side = True
    except BaseException:
        if wrote_side:
            with contextlib.suppress(OSError):
                os.unlink(side_path)
        raise


def anonymize_video(pipe, src: str, dst: str, k, *, detector, key_record: dict,
                    refine: bool = True, opts: EncodeOptions = EncodeOptions(), batch: int = 4,
                    min_prob: float = 0.9, min_size: float = 20.0, quiet: bool = True) -> dict:
    """Anonymizes the video `src` into `dst` (+ `dst`.json) with key k [512]; one pseudonym
    T(z_track, k) per track. `key_record`: the sidecar's "key" field. Returns the sidecar."""
    tracks, clip = track_pass(pipe, detector, src, batch, min_prob, min_size, quiet)
    transforms = [track_transforms(t) for t in tracks]
    z_anon = anonymized_identities(pipe, np.stack([t.identity for t in tracks]), k) if tracks else []
    h, w = clip.size
    if opts.codec == "h264":  # 4:2:0 needs even sides: see Writer.write
        h, w = h + h % 2, w + w % 2
    record = {"format": sidecar.VIDEO_FORMAT, "conventions": pipe.conventions.name,
              "weights_id": pipe.weights_id, "key": key_record, "refine": refine,
              "codec": opts.codec, "frames": clip.frames, "size": [h, w],
              "time_base": [clip.time_base.numerator, clip.time_base.denominator],
              "tracks": [{"frames": [[i, np.asarray(a).tolist()] for i, a in entries]}
                         for entries in transforms]}
    try:  # what recovery will refuse must not be written
        sidecar.validate_video(record, allow_costly=True)
    except sidecar.SidecarError as e:
        raise InputError(f"{src}: cannot record this video for recovery ({e})") from None
    by_frame = faces_by_frame(transforms, z_anon)
    _write_outputs(dst, record, lambda tmp: render_pass(pipe, src, tmp, by_frame, clip, refine,
                                                        opts, batch, quiet))
    return record


def _add_identities(pipe, frames: list, by_frame: dict, sums: np.ndarray, batch: int) -> None:
    """Adds the E_ID of every recorded face of `frames` to its track's row of `sums`."""
    faces = [by_frame.get(f.index, []) for f in frames]
    ids = _embed_many(pipe, [f.rgb for f in frames], [[a for a, _ in fs] for fs in faces], batch)
    for fs, zs in zip(faces, ids):
        for (_, t), z in zip(fs, zs):
            sums[t] += z


def _identity_pass(pipe, path: str, side: sidecar.VideoSidecar, batch: int, quiet: bool):
    """Recovery pass 1: the normalized mean E_ID of each track over the anonymized frames, from
    the recorded transforms -> ([tracks, 512], Clip)."""
    by_frame = faces_by_frame([t for t in side.tracks], range(len(side.tracks)))
    sums, clip, last, group = np.zeros((len(side.tracks), 512)), None, None, []
    with open_video(path) as container:
        bar = _progress(side.frames, "reading identities", quiet)
        for frame in decode(container, path):
            if clip is None:
                clip = Clip(0, frame.rgb.shape[:2], frame.time_base, frame.rotation)
                if clip.size != side.size:
                    raise sidecar.SidecarError(
                        f"{sidecar.path_for(path)}: size: records {side.size[1]}x{side.size[0]} "
                        f"but the video is {clip.size[1]}x{clip.size[0]}")
            last = frame
            group.append(frame)
            clip.frames += 1
            if len(group) == DET_FRAMES:
                _add_identities(pipe, group, by_frame, sums, batch)
                bar.update(len(group))
                group = []
        _add_identities(pipe, group, by_frame, sums, batch)
        bar.update(len(group))
        bar.close()
        _check_complete(container, path, 0 if clip is None else clip.frames, last)
    _count_check(path, clip.frames, side.frames)
    return sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12), clip


def recover_video(pipe, src: str, dst: str, k, side: sidecar.VideoSidecar, *, batch: int = 4,
                  quiet: bool = True) -> dict:
    """Recovers the anonymized video `src` into `dst` with its validated sidecar `side` and the
    key k: per track, z = normalized mean E_ID over its frames, T^-1(C(z), k) for every frame of
    the track, attributes from each frame. Never detects. Returns the written sidecar."""
    z_tracks, clip = _identity_pass(pipe, src, side, batch, quiet)
    z_rec = recovered_identities(pipe, z_tracks, k) if len(side.tracks) else []
    by_frame = faces_by_frame(side.tracks, z_rec)
    opts = EncodeOptions(codec="ffv1")
    record = sidecar.recovered(pipe.weights_id, "video")
    _write_outputs(dst, record, lambda tmp: render_pass(pipe, src, tmp, by_frame, clip, side.refine,
                                                        opts, batch, quiet))
    return record


# ----------------------------------------------------------------------------------------------
# Command lines (dispatched from `ifadit_jax.commands` when the input is a video)


def add_arguments(parser) -> None:
    g = parser.add_argument_group("video options")
    g.add_argument("--codec", choices=("ffv1", "h264"), default="ffv1",
                   help="output codec: ffv1 (lossless, default; recovery exact up to the networks) "
                        "or h264 (lossy: recovery degrades)")
    g.add_argument("--crf", type=int, default=18, help="h264 quality, 0-51 (default 18)")
    g.add_argument("--keep-audio", action="store_true",
                   help="copy the audio streams unchanged (default: dropped; voices identify people)")


def plan_output(src: str, dst: str, force: bool, codec: str = "ffv1") -> str:
    """Checks the output path of a video job -> the path to write."""
    from ifadit_jax.commands import check_single_output

    if os.path.isdir(dst):
        dst = os.path.join(dst, os.path.splitext(os.path.basename(src))[0] + ".mkv")
    allowed = (".mkv",) if codec == "ffv1" else (".mkv", ".mp4", ".mov")
    if os.path.splitext(dst)[1].lower() not in allowed:
        raise InputError(f"{dst}: a {codec} video output needs one of the extensions {', '.join(allowed)}")
    check_single_output(src, dst, force)
    return dst


def _check_video_flags(args) -> None:
    if getattr(args, "aligned", False):
        raise InputError("--aligned is for 256x256 face images, not videos")
    if not 0 <= getattr(args, "crf", 18) <= 51:
        raise InputError("--crf must be 0 to 51")


def anonymize_command(args, kdf) -> int:
    """`python -m ifadit_jax.anonymize clip.mp4 out.mkv ...` (args from commands' parser)."""
    from ifadit_jax import cli, commands

    _check_video_flags(args)
    open_video(args.input).close()  # not a video: one error line before the weights load
    dst = plan_output(args.input, args.output, args.force, args.codec)
    if args.codec == "h264":
        print("warning: h264 is lossy: recovery from it will be degraded; the default ffv1 is "
              "lossless", file=sys.stderr)
    cli.setup(args)
    pipe = pipeline_lib.load(args.weights, precision=args.precision)
    detector = commands.load_detector(args.weights, args.detector)
    key = (commands.vector_key(pipe, args.key_vector) if kdf is None
           else commands.secret_key(pipe, args, kdf, args.key_check))
    opts = EncodeOptions(codec=args.codec, crf=args.crf, keep_audio=args.keep_audio)
    anonymize_video(pipe, args.input, dst, key.k, detector=detector, key_record=key.record,
                    refine=not args.no_refine, opts=opts, batch=args.batch,
                    min_prob=args.det_threshold, min_size=args.min_face_size, quiet=args.quiet)
    if not args.quiet:
        print(dst)
    return 0


def recover_command(args) -> int:
    """`python -m ifadit_jax.recover out.mkv rec.mkv ...`: reads OUT.mkv.json, never detects."""
    from ifadit_jax import cli, commands

    open_video(args.input).close()
    side_path = sidecar.path_for(args.input)
    if not os.path.lexists(side_path):
        raise InputError(f"{args.input}: no sidecar {os.path.basename(side_path)} (recovery needs "
                         "the file written beside the anonymized video)")
    side = sidecar.read_video(side_path, args.kdf_allow_costly)
    dst = plan_output(args.input, args.output, args.force)
    cli.setup(args)
    pipe = pipeline_lib.load(args.weights, precision=args.precision)
    if side.weights_id != pipe.weights_id or side.conventions != pipe.conventions.name:
        raise InputError(f"{args.input}: anonymized with weights {sidecar.printable(side.weights_id)} "
                         f"({side.conventions}), these are {pipe.weights_id}")
    key = commands.recovery_key(pipe, args, side.key)
    recover_video(pipe, args.input, dst, key.k, side, batch=args.batch, quiet=args.quiet)
    if not args.quiet:
        print(dst)
    return 0
