"""The recovery sidecar (`OUTPUT.json` beside every anonymized image): one schema, written and
validated here.

It holds only what recovery needs, and nothing that names the person or the file:

  format       "ifadit-jax-anonymized/2": which schema this is
  conventions  the pipeline conventions of the weights ("official" or "paper")
  weights_id   16 hex digits naming the weights' tensors: recovery needs the same networks
  key          how the key was made: {"path": "kdf", "kdf": Argon2id parameters and salt,
               optionally "check": a 16-hex-digit key check (`--key-check`)} or
               {"path": "vector"} (the official k = f(u); the vector is never stored)
  refine       whether the face-mask blending (Eq. 11) ran: recovery must do the same
  mode         "aligned" (the image is the 256x256 crop) or "photo" (faces pasted into a photo)
  size         [height, width] of the anonymized image: a sidecar of another image is refused
  faces        per face: "box" [x0, y0, x1, y1] (where it is, inside the image) and
               "transform" (2x3, crop point (u, v, 1) -> photo point (x, y)): recovery warps
               the same crops without detecting anything

No file names, paths or timestamps. Recovered images get a small sidecar of their own
("ifadit-jax-recovered/2": format, weights_id, mode) that marks them as written by this tool.

A sidecar is untrusted input: `read` accepts only a regular file of at most MAX_BYTES (no FIFO
or device, also not through a symlink; opening never blocks), strict JSON (no NaN, no duplicate
keys, no unknown fields, exact types), KDF costs within the caps of `ifadit_jax.keys` unless
allowed, at most MAX_FACES faces, finite and non-singular similarity transforms whose scale lies
in SCALE_RANGE, boxes inside the image, and `size` equal to the image's size. Anything else is a
SidecarError (exit code 4) naming the field, raised before any network runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import stat

from ifadit_jax import keys
from ifadit_jax.errors import InputError

FORMAT = "ifadit-jax-anonymized/2"
RECOVERED_FORMAT = "ifadit-jax-recovered/2"
MAX_BYTES = 1 << 20
MAX_FACES = 256
MAX_SIDE = 65535
MAX_COORD = 1e9  # no coordinate of a face in an image of at most MAX_SIDE pixels comes near
CROP = 256
SCALE_RANGE = (1 / 64, 64.0)  # photo pixels per crop pixel: faces of 4 px to 16,000 px
FIELDS = ("format", "conventions", "weights_id", "key", "refine", "mode", "size", "faces")
_NAME = re.compile(r"[a-z0-9_-]{1,32}\Z")
_WEIGHTS_ID = re.compile(r"[0-9A-Za-z_.-]{1,64}\Z")
_CHECK = re.compile(r"[0-9a-f]{%d}\Z" % keys.CHECK_HEX)


class SidecarError(InputError):
    """A sidecar that is missing, unreadable or breaks the schema (exit code 4)."""


@dataclasses.dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]
    transform: tuple[tuple[float, float, float], tuple[float, float, float]]


@dataclasses.dataclass(frozen=True)
class Sidecar:
    conventions: str
    weights_id: str
    key: dict
    refine: bool
    mode: str
    size: tuple[int, int]
    faces: tuple[Face, ...]

    def to_dict(self) -> dict:
        return {"format": FORMAT, "conventions": self.conventions, "weights_id": self.weights_id,
                "key": self.key, "refine": self.refine, "mode": self.mode, "size": list(self.size),
                "faces": [{"box": list(f.box), "transform": [list(r) for r in f.transform]}
                          for f in self.faces]}


def printable(text: str, limit: int = 80) -> str:
    """`text` safe for a terminal: non-printable characters escaped, length bounded."""
    text = str(text)[:limit]
    return "".join(c if c.isprintable() and c.isascii() else ascii(c)[1:-1] for c in text)


def path_for(image_path: str) -> str:
    return image_path + ".json"


def _fail(field: str, why: str):
    raise SidecarError(f"{field}: {why}")


def _exact(obj, want, field: str):
    if type(obj) is not want:  # noqa: E721 - bool is not an int, float is not an int here
        _fail(field, f"must be {want.__name__}")
    return obj


def _number(obj, field: str) -> float:
    if type(obj) not in (int, float) or not -MAX_COORD <= obj <= MAX_COORD or not math.isfinite(obj):
        _fail(field, f"must be a finite number of magnitude at most {MAX_COORD:g}")
    return float(obj)


def _object(obj, field: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    _exact(obj, dict, field)
    unknown = sorted(set(obj) - set(required) - set(optional))
    if unknown:
        _fail(field, f"unknown field {printable(unknown[0], 40)!r}")
    missing = [k for k in required if k not in obj]
    if missing:
        _fail(f"{field}.{missing[0]}", "missing")
    return obj


def _numbers(obj, field: str, n: int) -> tuple[float, ...]:
    if type(obj) is not list or len(obj) != n:
        _fail(field, f"must be a list of {n} numbers")
    return tuple(_number(v, f"{field}[{i}]") for i, v in enumerate(obj))


def _key(obj, allow_costly: bool) -> dict:
    path = _exact(_object(obj, "key", ("path",), ("kdf", "check")).get("path"), str, "key.path")
    if path == "vector":
        _object(obj, "key", ("path",))
        return {"path": "vector"}
    if path != "kdf":
        _fail("key.path", "must be 'kdf' or 'vector'")
    _object(obj, "key", ("path", "kdf"), ("check",))
    kdf_dict = _object(obj["kdf"], "key.kdf", ("algorithm", "memory_cost", "iterations", "lanes", "salt"),
                       ("output_bytes",))
    try:
        kdf = keys.KdfParams.from_dict(kdf_dict)
        kdf.check_caps(allow_costly)
    except InputError as e:
        _fail("key.kdf", str(e))
    out = {"path": "kdf", "kdf": kdf.to_dict()}
    if "check" in obj:
        if type(obj["check"]) is not str or not _CHECK.match(obj["check"]):
            _fail("key.check", f"must be {keys.CHECK_HEX} lowercase hex digits")
        out["check"] = obj["check"]
    return out


def _size(obj) -> tuple[int, int]:
    if type(obj) is not list or len(obj) != 2 or any(type(v) is not int for v in obj):
        _fail("size", "must be [height, width] integers")
    h, w = obj
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        _fail("size", f"sides must be 1 to {MAX_SIDE}")
    return h, w


def _transform(obj, field: str, size: tuple[int, int]):
    if type(obj) is not list or len(obj) != 2:
        _fail(field, "must be a 2x3 matrix")
    rows = tuple(_numbers(r, f"{field}[{i}]", 3) for i, r in enumerate(obj))
    (a, b, tx), (c, d, ty) = rows
    ex, ey = math.hypot(a, c), math.hypot(b, d)  # lengths of one crop pixel across and down
    det = a * d - b * c
    if not (SCALE_RANGE[0] <= ex <= SCALE_RANGE[1] and SCALE_RANGE[0] <= ey <= SCALE_RANGE[1]):
        _fail(field, f"scale must lie in [{SCALE_RANGE[0]:g}, {SCALE_RANGE[1]:g}]")
    # The aligner makes similarities: equal axis lengths, perpendicular, not mirrored.
    if det <= 0 or abs(ex - ey) > 1e-3 * ex or abs(a * b + c * d) > 1e-3 * ex * ey:
        _fail(field, "must be a rotation and uniform scale (as the aligner writes)")
    h, w = size
    cx, cy = a * CROP / 2 + b * CROP / 2 + tx, c * CROP / 2 + d * CROP / 2 + ty
    if not (0 <= cx <= w and 0 <= cy <= h):
        _fail(field, "the crop's centre lies outside the image")
    return rows


def _faces(obj, mode: str, size: tuple[int, int]) -> tuple[Face, ...]:
    if type(obj) is not list:
        _fail("faces", "must be a list")
    if len(obj) > MAX_FACES:
        _fail("faces", f"at most {MAX_FACES} faces")
    if mode == "aligned" and obj:
        _fail("faces", "must be empty in aligned mode")
    h, w = size
    out = []
    for i, f in enumerate(obj):
        field = f"faces[{i}]"
        _object(f, field, ("box", "transform"))
        x0, y0, x1, y1 = _numbers(f["box"], f"{field}.box", 4)
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            _fail(f"{field}.box", "must lie inside the image")
        out.append(Face((x0, y0, x1, y1), _transform(f["transform"], f"{field}.transform", size)))
    return tuple(out)


def _header(obj, fields, fmt: str) -> tuple[str, str]:
    """The fields every sidecar starts with -> (conventions, weights_id)."""
    _object(obj, "sidecar", fields)
    if obj["format"] != fmt:
        _fail("format", f"must be {fmt!r}")
    conventions = _exact(obj["conventions"], str, "conventions")
    if not _NAME.match(conventions):
        _fail("conventions", "must be a short lowercase name")
    weights_id = _exact(obj["weights_id"], str, "weights_id")
    if not _WEIGHTS_ID.match(weights_id):
        _fail("weights_id", "must be 1 to 64 letters, digits, '.', '_' or '-'")
    return conventions, weights_id


def validate(obj, allow_costly: bool = False) -> Sidecar:
    """A parsed sidecar (any JSON value) -> Sidecar, or SidecarError naming the field."""
    conventions, weights_id = _header(obj, FIELDS, FORMAT)
    mode = _exact(obj["mode"], str, "mode")
    if mode not in ("aligned", "photo"):
        _fail("mode", "must be 'aligned' or 'photo'")
    size = _size(obj["size"])
    if mode == "aligned" and size != (CROP, CROP):
        _fail("size", f"must be [{CROP}, {CROP}] in aligned mode")
    return Sidecar(conventions=conventions, weights_id=weights_id, key=_key(obj["key"], allow_costly),
                   refine=_exact(obj["refine"], bool, "refine"), mode=mode, size=size,
                   faces=_faces(obj["faces"], mode, size))


def check_size(side: Sidecar, image_size: tuple[int, int]) -> None:
    if tuple(image_size) != side.size:
        _fail("size", f"records {side.size[1]}x{side.size[0]} but the image is "
                      f"{image_size[1]}x{image_size[0]} (a sidecar of another image?)")


def _strict_pairs(pairs):
    keys_seen = [k for k, _ in pairs]
    if len(set(keys_seen)) != len(keys_seen):
        raise ValueError("duplicate field")
    return dict(pairs)


def _no_constant(name):
    raise ValueError(f"{name} is not allowed")


def parse(data: bytes):
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate keys; errors are SidecarError."""
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_strict_pairs,
                          parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SidecarError(f"not valid JSON ({type(e).__name__})") from None


def read_bytes(path: str, max_bytes: int = MAX_BYTES) -> bytes:
    """The bytes of a regular file of at most `max_bytes`; never blocks on a FIFO or device."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise SidecarError(f"cannot open: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SidecarError("not a regular file")
        if st.st_size > max_bytes:
            raise SidecarError(f"larger than {max_bytes} bytes")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise SidecarError(f"cannot read: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise SidecarError(f"larger than {max_bytes} bytes")
    return data


def read(path: str, allow_costly: bool = False) -> Sidecar:
    """Reads and validates the sidecar at `path`; SidecarError messages start with the path."""
    try:
        return validate(parse(read_bytes(path)), allow_costly)
    except SidecarError as e:
        raise SidecarError(f"{path}: {e}") from None


def written_by_us(image_path: str) -> bool:
    """Whether `image_path` has a sidecar of ours beside it (what `--force` may replace)."""
    try:
        obj = parse(read_bytes(path_for(image_path), MAX_VIDEO_BYTES))
    except SidecarError:
        return False
    return type(obj) is dict and obj.get("format") in (FORMAT, RECOVERED_FORMAT, VIDEO_FORMAT)


def recovered(weights_id: str, mode: str) -> dict:
    return {"format": RECOVERED_FORMAT, "weights_id": weights_id, "mode": mode}


# ----------------------------------------------------------------------------------------------
# Video sidecar (`OUT.mkv.json`), beside a video written by `ifadit_jax.video`
#
#   format      "ifadit-jax-video/1"
#   conventions, weights_id, key, refine   as in the image sidecar above
#   codec       "ffv1" (lossless) or "h264"
#   frames      number of decoded frames of the anonymized video (recovery checks it)
#   size        [height, width] of the anonymized video's frames
#   time_base   [numerator, denominator] of the input's timestamps (informational)
#   tracks      per tracked person, "frames": [[frame index, 2x3 transform], ...] in increasing
#               frame order; the transform maps crop points to frame points as for photos
#
# No boxes (recovery needs only the transforms), no file names, no timestamps of the run.
# Caps: MAX_VIDEO_BYTES = 64 MiB. One face-frame entry takes about 130 bytes of JSON (six floats
# written by Python's repr), so the cap holds about 500,000 face-frames: 4.6 hours of one face at
# 30 fps; longer clips are refused at anonymization, not silently cut. Parsing 64 MiB of JSON
# takes about 1 GB of Python objects, within what a workstation has. At most
# MAX_VIDEO_FACES_PER_FRAME faces in one frame, MAX_VIDEO_FRAMES frames, MAX_TRACKS tracks.

VIDEO_FORMAT = "ifadit-jax-video/1"
VIDEO_FIELDS = ("format", "conventions", "weights_id", "key", "refine", "codec", "frames", "size",
                "time_base", "tracks")
VIDEO_CODECS = ("ffv1", "h264")
MAX_VIDEO_BYTES = 64 << 20
MAX_VIDEO_FRAMES = 10_000_000
MAX_VIDEO_FACES_PER_FRAME = 64
MAX_TRACKS = 100_000
MAX_TIME_BASE = 1 << 31


@dataclasses.dataclass(frozen=True)
class VideoSidecar:
    conventions: str
    weights_id: str
    key: dict
    refine: bool
    codec: str
    frames: int
    size: tuple[int, int]
    time_base: tuple[int, int]
    tracks: tuple[tuple[tuple[int, tuple], ...], ...]  # per track: ((frame index, 2x3), ...)


def _bounded_int(obj, field: str, lo: int, hi: int) -> int:
    if type(obj) is not int or not lo <= obj <= hi:
        _fail(field, f"must be an integer from {lo} to {hi}")
    return obj


def _track(obj, field: str, frames: int, size, per_frame: dict) -> tuple:
    _object(obj, field, ("frames",))
    entries = obj["frames"]
    if type(entries) is not list or not entries:
        _fail(f"{field}.frames", "must be a non-empty list")
    out, last = [], -1
    for i, entry in enumerate(entries):
        where = f"{field}.frames[{i}]"
        if type(entry) is not list or len(entry) != 2:
            _fail(where, "must be [frame index, transform]")
        index = _bounded_int(entry[0], f"{where}[0]", last + 1, frames - 1)
        per_frame[index] = per_frame.get(index, 0) + 1
        if per_frame[index] > MAX_VIDEO_FACES_PER_FRAME:
            _fail(where, f"more than {MAX_VIDEO_FACES_PER_FRAME} faces in frame {index}")
        out.append((index, _transform(entry[1], f"{where}[1]", size)))
        last = index
    return tuple(out)


def validate_video(obj, allow_costly: bool = False) -> VideoSidecar:
    """A parsed video sidecar (any JSON value) -> VideoSidecar, or SidecarError naming the field."""
    conventions, weights_id = _header(obj, VIDEO_FIELDS, VIDEO_FORMAT)
    codec = _exact(obj["codec"], str, "codec")
    if codec not in VIDEO_CODECS:
        _fail("codec", f"must be one of {', '.join(VIDEO_CODECS)}")
    frames = _bounded_int(obj["frames"], "frames", 1, MAX_VIDEO_FRAMES)
    size = _size(obj["size"])
    tb = obj["time_base"]
    if type(tb) is not list or len(tb) != 2:
        _fail("time_base", "must be [numerator, denominator]")
    time_base = (_bounded_int(tb[0], "time_base[0]", 1, MAX_TIME_BASE),
                 _bounded_int(tb[1], "time_base[1]", 1, MAX_TIME_BASE))
    tracks = obj["tracks"]
    if type(tracks) is not list or len(tracks) > MAX_TRACKS:
        _fail("tracks", f"must be a list of at most {MAX_TRACKS} tracks")
    per_frame: dict[int, int] = {}
    parsed = tuple(_track(t, f"tracks[{i}]", frames, size, per_frame) for i, t in enumerate(tracks))
    return VideoSidecar(conventions=conventions, weights_id=weights_id,
                        key=_key(obj["key"], allow_costly), refine=_exact(obj["refine"], bool, "refine"),
                        codec=codec, frames=frames, size=size, time_base=time_base, tracks=parsed)


def read_video(path: str, allow_costly: bool = False) -> VideoSidecar:
    """Reads and validates a video sidecar (at most MAX_VIDEO_BYTES); errors start with the path."""
    try:
        return validate_video(parse(read_bytes(path, MAX_VIDEO_BYTES)), allow_costly)
    except SidecarError as e:
        raise SidecarError(f"{path}: {e}") from None
