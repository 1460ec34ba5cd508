"""The command-line core: anonymizing and recovering image files (aligned faces, folders and
in-the-wild photos) and folders that mix photos and videos (videos go through `ifadit_jax.video`).

The importable core of `python -m ifadit_jax.anonymize` and `python -m ifadit_jax.recover`:

* aligned mode (`aligned=True`): the input is a 256x256 FFHQ-aligned face, processed as is;
* photo mode (default): MTCNN finds every face; each is aligned to the FFHQ 256 crop from its five
  landmarks (`ifadit_jax.align`), anonymized, and pasted back through the inverse warp, feathered
  and limited to the soft face mask.

Every output gets a JSON sidecar (`OUTPUT.json`, schema in `ifadit_jax.sidecar`) with only what
recovery needs. It never holds the secret or a file name. Recovery validates the sidecar of its
input, re-derives the key from the secret and the recorded parameters, and uses the recorded
alignment instead of detecting faces again.

Paths: outputs never replace an input (paths compared after resolving symlinks), never land
inside the input folder, and `--force` replaces only images this tool wrote (an image with our
sidecar beside it). Folder runs resume: finished outputs are kept, and their sidecars must agree
with this run's weights and KDF parameters (and secret, when a key check is stored). A bad item
is listed and the others go on; the exit code is non-zero at the end.

Throughput: a producer thread (`prefetched`) reads, detects and aligns the next images while the
networks run; `Batcher` packs the faces of several images into batches of one fixed size (the
last one padded), and `Networks` splits each batch over every local device.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import json
import os
import queue
import shutil
import sys
import threading
import time
from typing import Sequence

import jax
import numpy as np

from ifadit_jax import align, cli, files, imageio, keys, sidecar
from ifadit_jax import pipeline as pipeline_lib
from ifadit_jax import video as video_lib
from ifadit_jax.errors import InputError, NoFaceError, SecretError, WeightsError

CROP = 256
MIN_PHOTO_SIDE = 24  # MTCNN's smallest pyramid level needs 12 px; faces need more
DETECTOR_FILE = "mtcnn.safetensors"
DEFAULT_MIN_FACE_SIZE = 20.0  # pixels, the shorter side of the detected box (MTCNN's default)
DEFAULT_DET_THRESHOLD = 0.9  # final-stage face probability
MAX_KEY_VECTOR_BYTES = 1 << 20
SPACE_FACTOR = 0.6  # a PNG of a photo rarely exceeds 60% of its raw RGB bytes


@dataclasses.dataclass(frozen=True)
class Face:
    box: list[float]
    prob: float
    landmarks: list[list[float]]
    transform: list[list[float]]  # 2x3, crop (u, v, 1) -> photo (x, y)


class Skipped(Exception):
    """An item left out on purpose (`--no-face skip`): not written, not a failure."""


def detect_faces(detector, photo: np.ndarray, min_prob: float = DEFAULT_DET_THRESHOLD,
                 min_size: float = DEFAULT_MIN_FACE_SIZE) -> list[Face]:
    """Faces in `photo` ([H, W, 3] in [0, 1]) with probability >= min_prob and a box whose
    shorter side is >= min_size pixels; boxes clipped to the image."""
    boxes, probs, landmarks = detector.detect(imageio.to_uint8(photo), min_face_size=min_size)
    h, w = photo.shape[:2]
    faces = []
    for b, p, lm in zip(boxes, probs, landmarks):
        if p < min_prob or min(b[2] - b[0], b[3] - b[1]) < min_size:
            continue
        box = np.clip(np.asarray(b, np.float64), 0, [w, h, w, h])
        if box[2] <= box[0] or box[3] <= box[1]:
            continue
        a = align.crop_transform(lm, CROP)
        faces.append(Face(box=[float(v) for v in box], prob=float(p),
                          landmarks=np.asarray(lm, float).round(3).tolist(),
                          transform=np.asarray(a).tolist()))
    return faces


# ----------------------------------------------------------------------------------------------
# Planning: which files go where, checked before anything expensive runs


@dataclasses.dataclass
class Job:
    src: str
    dst: str
    video: bool = False  # streamed through `ifadit_jax.video`, output .mkv


@dataclasses.dataclass
class Plan:
    jobs: list[Job]  # to run
    done: list[Job]  # finished by an earlier run (folder runs resume)
    folder: bool
    output: str


def _owned_state(dst: str) -> str:
    """'absent', 'ours' (an image with our sidecar) or a reason why it may not be replaced."""
    if not os.path.lexists(dst):
        return "absent"
    if os.path.isdir(dst):
        return "is a folder"
    if not sidecar.written_by_us(dst):
        return "exists and was not written by ifadit-jax (no sidecar of ours beside it)"
    return "ours"


def _file_plan(src: str, output: str, force: bool) -> Plan:
    if os.path.isdir(output):
        output = os.path.join(output, os.path.splitext(os.path.basename(src))[0] + ".png")
    if not imageio.is_image_path(output):
        raise InputError(f"{output}: output needs an image extension (.png is lossless)")
    check_single_output(src, output, force)
    return Plan([Job(src, output)], [], folder=False, output=output)


def check_single_output(src: str, output: str, force: bool) -> None:
    """The output of one file (an image or a video): never the input or its sidecar's place,
    replaced only if this tool wrote it and `force`, in an existing folder."""
    if files.real(output) == files.real(src) or files.real(sidecar.path_for(output)) == files.real(src):
        raise InputError("output would overwrite the input")
    state = _owned_state(output)
    if state == "ours" and not force:
        raise InputError(f"output exists, not overwriting (use --force): {output}")
    if state not in ("absent", "ours"):
        raise InputError(f"{output}: {state}; not replacing it")
    parent = os.path.dirname(output) or "."
    if not os.path.isdir(parent):
        raise InputError(f"output directory does not exist: {parent}")


def _video_sidecar(path: str) -> bool:
    """Whether `path` has a video sidecar of ours beside it (how recovery finds its videos)."""
    try:
        obj = sidecar.parse(sidecar.read_bytes(sidecar.path_for(path), sidecar.MAX_VIDEO_BYTES))
    except sidecar.SidecarError:
        return False
    return type(obj) is dict and obj.get("format") == sidecar.VIDEO_FORMAT


def _kind(path: str, recover: bool) -> str | None:
    """'image', 'video' or None (not an input). Images by extension; videos by extension or by
    content (FFmpeg finds a video stream), and for recovery also by their video sidecar."""
    name = os.path.basename(path)
    # `.tmp-*` files are partial outputs of killed runs, never inputs; sidecars are not media.
    if name.startswith(".tmp-") or name.lower().endswith(".json"):
        return None
    if imageio.is_image_path(name):
        return "image"
    if video_lib.looks_like_video(path) or (recover and _video_sidecar(path)):
        return "video"
    return None


def _list_inputs(folder: str, recover: bool) -> list[tuple[str, bool]]:
    """(path, is a video) of every input below `folder`, in a stable order."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            kind = _kind(path, recover)
            if kind is not None:
                found.append((path, kind == "video"))
    return found


def _collisions(pairs: list[tuple[str, str]]) -> None:
    by_dst = collections.defaultdict(list)
    for src, dst in pairs:
        by_dst[files.real(dst)].append(src)
    clashes = [srcs for srcs in by_dst.values() if len(srcs) > 1]
    if clashes:
        listed = "; ".join(" and ".join(srcs) for srcs in clashes[:10])
        raise InputError(f"{len(clashes)} outputs would be written twice (same name apart from the "
                         f"extension): {listed}; rename them first")


def _folder_plan(src: str, output: str, force: bool, recover: bool) -> Plan:
    src_real, out_real = files.real(src), files.real(output)
    if files.inside(out_real, src_real):
        raise InputError("the output folder must not be the input folder or lie inside it")
    if os.path.lexists(output) and not os.path.isdir(output):
        raise InputError(f"{output}: the input is a folder, so the output must be a folder")
    inputs = _list_inputs(src, recover)
    if not inputs:
        raise InputError(f"no images or videos found in {src}")
    pairs = [(p, os.path.join(output, os.path.splitext(os.path.relpath(p, src))[0]
                              + (".mkv" if is_video else ".png"))) for p, is_video in inputs]
    _collisions(pairs)
    input_reals = {files.real(p) for p, _ in inputs}
    videos = {p for p, is_video in inputs if is_video}
    plan, refused = Plan([], [], folder=True, output=output), []
    for p, dst in pairs:
        if files.real(dst) in input_reals or files.real(sidecar.path_for(dst)) in input_reals:
            raise InputError(f"{dst} would overwrite the input {p}")
        if files.inside(files.real(dst), src_real):  # through a symlinked folder in the output
            raise InputError(f"{dst} lies inside the input folder {src} (through a symlink)")
        state, job = _owned_state(dst), Job(p, dst, video=p in videos)
        if state == "ours":
            (plan.jobs if force else plan.done).append(job)
        elif state == "absent":
            plan.jobs.append(job)
        else:
            refused.append(f"{dst}: {state}")
    if refused:
        raise InputError(f"{len(refused)} outputs are in the way, not replacing them: "
                         + "; ".join(refused[:5]))
    return plan


def _check_room(plan: Plan) -> None:
    """Writable output folders and enough free space, before any network runs."""
    estimate, parents = 0, set()
    for job in plan.jobs:
        parents.add(files.nearest_existing(os.path.dirname(os.path.abspath(job.dst))))
        # None: the item fails on its own later. A video's output size is unknown until it is
        # decoded (FFV1 is often larger than the source); it is not estimated.
        size = None if job.video else imageio.header_size(job.src)
        if size is not None:
            estimate += int(size[0] * size[1] * 3 * SPACE_FACTOR) + 4096
    for parent in sorted(parents):
        if not os.path.isdir(parent):
            raise InputError(f"{parent} is not a folder; cannot write outputs below it")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(f"output folder {parent} is not writable")
        free = shutil.disk_usage(parent).free
        if free < estimate:
            raise InputError(f"not enough free space in {parent}: about {estimate >> 20} MiB "
                             f"needed, {free >> 20} MiB free")


def plan(input_path: str, output_path: str, force: bool, recover: bool = False) -> Plan:
    """Checks the paths and lists the work: one job for an image file; for a folder, one per
    image or video below it (the output mirrors the tree: a .png per image, a .mkv per video)."""
    if not os.path.exists(input_path):
        raise InputError(f"input not found: {input_path}")
    if os.path.isfile(input_path):
        result = _file_plan(input_path, output_path, force)
    elif os.path.isdir(input_path):
        result = _folder_plan(input_path, output_path, force, recover)
        if os.path.isdir(output_path):
            files.remove_stale_temporaries(output_path)
    else:
        raise InputError(f"{input_path}: not a file or a folder")
    _check_room(result)
    return result


# ----------------------------------------------------------------------------------------------
# Keys


@dataclasses.dataclass
class Key:
    k: object  # [512] key for the flow
    record: dict  # the sidecar's "key" field
    check: str | None  # key check of the KDF output (None for the vector path)


def load_detector(weights_dir: str, detector_path: str | None = None):
    """The MTCNN detector from `detector_path` or WEIGHTS/mtcnn.safetensors."""
    from ifadit_jax import weights

    path = detector_path or os.path.join(weights_dir, DETECTOR_FILE)
    if not os.path.isfile(path):
        raise WeightsError(f"face detector weights not found: {path} (convert facenet-pytorch's "
                           f"MTCNN with: python ports/convert_mtcnn.py DIR {path}; or use --aligned)")
    variables, meta = weights.read(path, kind="mtcnn")
    return weights.loader("mtcnn")(variables, meta)


def _check_key_vector_header(path: str) -> None:
    """Refuses a .npy whose header asks for anything but [512] or [1, 512] floats, before any
    array is allocated from it."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"npy version {version}")
        shape, _, dtype = read_header(f)
    if shape not in ((512,), (1, 512)) or dtype.kind != "f" or dtype.itemsize > 8:
        raise InputError(f"{path}: key vector must be [512] finite floats")


def vector_key(pipe, path: str) -> Key:
    try:
        if os.path.getsize(path) > MAX_KEY_VECTOR_BYTES:
            raise InputError(f"{path}: a key vector file is at most {MAX_KEY_VECTOR_BYTES} bytes")
        _check_key_vector_header(path)  # np.load allocates what the header says
        u = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"cannot read the key vector {path}: {type(e).__name__}") from None
    if not isinstance(u, np.ndarray) or u.shape not in ((512,), (1, 512)) or u.dtype.kind != "f" \
            or not np.isfinite(u).all():
        raise InputError(f"{path}: key vector must be [512] finite floats")
    return Key(pipe.key_from_vector(u.reshape(1, 512).astype(np.float32))[0], {"path": "vector"}, None)


def secret_key(pipe, args, kdf: keys.KdfParams, store_check: bool) -> Key:
    raw = keys.kdf_bytes(keys.secret_from_args(args), kdf)
    k = keys.key_from_vector(np.asarray(keys.normalize_bytes(raw)), pipeline_lib.mapping(pipe.nets))  # = derive_key
    check = keys.key_check(raw)
    record = {"path": "kdf", "kdf": kdf.to_dict(), **({"check": check} if store_check else {})}
    return Key(k, record, check)


def _kdf_from_args(args) -> keys.KdfParams:
    fields = {}
    if args.kdf_salt is not None:
        try:
            fields["salt"] = bytes.fromhex(args.kdf_salt)
        except ValueError:
            raise InputError("--kdf-salt must be hexadecimal") from None
    if args.kdf_memory_kib is not None:
        fields["memory_cost"] = args.kdf_memory_kib
    if args.kdf_iterations is not None:
        fields["iterations"] = args.kdf_iterations
    kdf = keys.KdfParams(**fields)
    kdf.check_caps(args.kdf_allow_costly)
    return kdf


def _same_key_settings(a: dict, b: dict) -> bool:
    strip = lambda r: {k: v for k, v in r.items() if k != "check"}  # noqa: E731
    return strip(a) == strip(b)


def _check_resume(done: list[Job], pipe, key: Key, allow_costly: bool) -> None:
    """A resumed folder must not mix weights, KDF settings or (where checks exist) secrets."""
    for job in done:
        read = sidecar.read_video if job.video else sidecar.read
        s = read(sidecar.path_for(job.dst), allow_costly)
        if s.weights_id != pipe.weights_id or s.conventions != pipe.conventions.name:
            raise InputError(f"{job.dst} was made with other weights "
                             f"({sidecar.printable(s.weights_id)}); use another output folder")
        if not _same_key_settings(s.key, key.record):
            raise InputError(f"{job.dst} was made with other key settings (KDF parameters, salt or "
                             "key path); use the same settings or another output folder")
        if "check" in s.key and key.check is not None and s.key["check"] != key.check:
            raise SecretError(f"{job.dst} was made with a different secret (its key check "
                              "differs); use the same secret or another output folder")


# ----------------------------------------------------------------------------------------------
# The networks over every local device, fed by a prefetching producer

# Jitted once per process: a folder's calls all have the same shapes, so each compiles once.
_ANONYMIZE = jax.jit(pipeline_lib.anonymize, static_argnames=("refine",))
_RECOVER = jax.jit(pipeline_lib.recover, static_argnames=("refine",))
PREFETCH_DEPTH = 2  # images read and prepared ahead of the networks (bounds memory)
MAX_HELD_PIXELS = 64_000_000  # photo pixels waiting for their faces before a batch runs anyway


class Networks:
    """`pipeline.anonymize` or `pipeline.recover` over every local device: a 1-D mesh over
    `devices` (default `jax.devices()`), each batch split along it, the weights replicated.

    Every call gets exactly `batch` images (the last one padded by repeating its last image), and
    `batch` is the requested size rounded up to a multiple of the device count, so a run compiles
    each network once. `busy_s` is the time spent inside the calls (for --verbose and the bench).
    """

    def __init__(self, pipe, recover: bool, batch: int, devices=None):
        devices = list(devices or jax.devices())
        self.devices = len(devices)
        self.batch = -(-batch // self.devices) * self.devices
        mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
        self._split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
        self._replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        # One device: the loaded weights are already there (a copy would double their memory).
        self._nets = pipe.nets if self.devices == 1 else jax.device_put(pipe.nets, self._replicated)
        self._fn = _RECOVER if recover else _ANONYMIZE
        self.calls, self.busy_s = 0, 0.0

    def _call(self, images: np.ndarray, k, refine: bool):
        start = time.perf_counter()
        x = jax.device_put(np.asarray(images, np.float32), self._split)
        out, inter = self._fn(self._nets, x, jax.device_put(k, self._replicated), refine=refine)
        mask = inter.get("mask")
        result = np.asarray(out), (None if mask is None else np.asarray(mask))
        self.calls += 1
        self.busy_s += time.perf_counter() - start
        return result

    def run(self, crops: np.ndarray, k, refine: bool):
        """[N, 256, 256, 3] in [0, 1] -> (outputs [N, 256, 256, 3], masks [N, ...] or None)."""
        out, masks = video_lib.in_fixed_batches(lambda c: self._call(c, k, refine), crops, self.batch)
        return out, masks


@dataclasses.dataclass
class Item:
    """One image ready for the networks."""

    job: Job
    decoded: imageio.Decoded
    record: dict  # its sidecar
    refine: bool
    crops: np.ndarray  # [n, 256, 256, 3]: the faces to run (n may be 0: written unchanged)
    transforms: list | None  # per face, crop -> photo (2x3); None: the image is the crop


def prepare_item(job: Job, prepare, make_record, refine_of) -> Item:
    """Reads, detects and aligns one job (the producer's share of the work)."""
    decoded, faces = prepare(job)
    record = make_record(job, decoded, faces)
    if faces is None:
        return Item(job, decoded, record, refine_of(job), decoded.rgb[None], None)
    mats = [np.asarray(f["transform"], np.float64) for f in faces]
    crops = (np.stack([align.warp_to_crop(decoded.rgb, a, CROP) for a in mats]) if mats
             else np.zeros((0, CROP, CROP, 3), np.float32))
    return Item(job, decoded, record, refine_of(job), crops, mats)


_DONE = object()


def _put(q: queue.Queue, value, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(value, timeout=0.1)
            return
        except queue.Full:
            continue


def _produce(jobs, prepare, q: queue.Queue, stop: threading.Event) -> None:
    for job in jobs:
        if stop.is_set():
            return
        try:
            result = prepare(job)
        except BaseException as e:  # noqa: BLE001 - it travels with its item to the consumer
            result = e
        _put(q, (job, result), stop)
    _put(q, _DONE, stop)


def _drain(q: queue.Queue):
    while (value := q.get()) is not _DONE:
        yield value


@contextlib.contextmanager
def prefetched(jobs: Sequence[Job], prepare, depth: int = PREFETCH_DEPTH):
    """Yields an iterator of (job, prepare(job) or the exception it raised), in order, computed
    ahead by a thread while the caller runs the networks; at most `depth` results wait. Leaving
    the block (normally, by an exception or Ctrl-C) stops the thread and joins it."""
    q, stop = queue.Queue(maxsize=depth), threading.Event()
    thread = threading.Thread(target=_produce, args=(jobs, prepare, q, stop), daemon=True,
                              name="ifadit-prefetch")
    thread.start()
    try:
        yield _drain(q)
    finally:
        stop.set()
        thread.join()


class Batcher:
    """Collects the faces of several images into full batches (the faces of one photo, or
    aligned images of several files, share a batch), then pastes back and writes each image.
    A failing image is added to `failures` (src, error); the others are written."""

    def __init__(self, nets: Networks, k, failures: list):
        self.nets, self.k, self.failures = nets, k, failures
        self.groups: dict[bool, list[Item]] = collections.defaultdict(list)  # by refine

    def add(self, item: Item) -> None:
        if not len(item.crops):
            self._finish(item, item.crops, None)
            return
        group = self.groups[item.refine]
        group.append(item)
        faces = sum(len(i.crops) for i in group)
        pixels = sum(i.decoded.rgb.shape[0] * i.decoded.rgb.shape[1] for i in group)
        if faces >= self.nets.batch or pixels >= MAX_HELD_PIXELS:
            self._run(item.refine)

    def flush(self) -> None:
        for refine in list(self.groups):
            self._run(refine)

    def _run(self, refine: bool) -> None:
        items = self.groups.pop(refine, [])
        if not items:
            return
        try:
            out, masks = self.nets.run(np.concatenate([i.crops for i in items]), self.k, refine)
        except InputError as e:
            self.failures.extend((i.job.src, e) for i in items)
            return
        start = 0
        for i in items:
            end = start + len(i.crops)
            self._finish(i, out[start:end], None if masks is None else masks[start:end])
            start = end

    def _finish(self, item: Item, out: np.ndarray, masks) -> None:
        if item.transforms is None:
            result = out[0]
        else:
            result = item.decoded.rgb
            for j, a in enumerate(item.transforms):
                result = align.paste_back(result, out[j], a, feather=0.1,
                                          mask=None if masks is None else masks[j])
        try:
            _write(item.job, result, item.decoded, item.record)
        except InputError as e:
            self.failures.append((item.job.src, e))


# ----------------------------------------------------------------------------------------------
# Running


def _make_parent(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create {parent}: {e.strerror}") from None


def _write(job: Job, image: np.ndarray, like: imageio.Decoded, record: dict) -> None:
    _make_parent(job.dst)
    # The image is encoded beside its place first, so that a failed write leaves an existing
    # pair (--force) as it was; then the sidecar lands, then the image (an image without its
    # sidecar could not be recovered).
    try:
        with files.atomic_path(job.dst, force=True) as tmp_image:
            imageio.write_rgb(tmp_image, image, force=True, like=like)
            with files.atomic_path(sidecar.path_for(job.dst), force=True) as tmp:
                with open(tmp, "w") as f:
                    json.dump(record, f, indent=1)
    except InputError:
        if not os.path.exists(job.dst) and os.path.exists(sidecar.path_for(job.dst)):
            os.unlink(sidecar.path_for(job.dst))  # nothing partial remains
        raise


def _report(failures: list[tuple[str, InputError]], n: int, skipped: int, plan_: Plan, quiet: bool) -> int:
    for src, e in failures:
        text = str(e)
        print(f"error: {text if text.startswith(src) else f'{src}: {text}'}", file=sys.stderr)
    if failures:
        codes = {type(e).exit_code for _, e in failures}
        print(f"error: {len(failures)} of {n} files failed, nothing written for them",
              file=sys.stderr)
        return codes.pop() if len(codes) == 1 else InputError.exit_code
    if not quiet:
        extra = f" ({len(plan_.done)} already done, {skipped} skipped)" if plan_.folder else ""
        print(f"{plan_.output}{extra}")
    return 0


def _run_images(jobs: list[Job], nets: Networks, key: Key, args, prepare, failures: list) -> int:
    """Runs the image jobs: `prepare(job)` -> Item in the producer thread, the networks here.
    -> the number of images skipped on purpose."""
    skipped, batcher = 0, Batcher(nets, key.k, failures)
    with prefetched(jobs, prepare) as results:
        for job in cli.progress(jobs, quiet=args.quiet):
            _, result = next(results)
            if isinstance(result, Skipped):
                skipped += 1
            elif isinstance(result, InputError):
                failures.append((job.src, result))
            elif isinstance(result, BaseException):
                raise result
            else:
                batcher.add(result)
    batcher.flush()
    return skipped


def _run_jobs(plan_: Plan, nets: Networks, key: Key, args, prepare, run_video,
              failures: list | None = None) -> int:
    """Runs the jobs: images through `prepare(job)` -> Item and `nets`, videos (streamed, one at
    a time) through `run_video(job)`. `failures`: (src, error) found earlier. A failing job
    writes nothing; in a folder the others go on, a single file raises."""
    failures, wall = list(failures or []), time.perf_counter()
    skipped = _run_images([j for j in plan_.jobs if not j.video], nets, key, args, prepare, failures)
    for job in (j for j in plan_.jobs if j.video):
        try:
            run_video(job)
        except InputError as e:
            failures.append((job.src, e))
    if args.verbose:
        wall = time.perf_counter() - wall
        print(f"networks: {nets.calls} calls of {nets.batch} images on {nets.devices} device(s), "
              f"busy {nets.busy_s:.2f} s of {wall:.2f} s ({nets.busy_s / max(wall, 1e-9):.0%})",
              file=sys.stderr)
    if failures and not plan_.folder:
        raise failures[0][1]
    n = len(plan_.jobs) + sum(1 for src, _ in failures if src not in {j.src for j in plan_.jobs})
    return _report(failures, n, skipped, plan_, args.quiet)


# ----------------------------------------------------------------------------------------------
# Command lines


def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="an image, a video, or a folder of them (photos and videos may mix)")
    p.add_argument("output", help="output image (.png), folder (mirrors the input tree), or "
                                  "video (.mkv)")
    p.add_argument("--weights", required=True, help="weights folder (ports/convert_ifadit.py release)")
    p.add_argument("--batch", type=int, default=4, help="faces per batch (default 4)")
    p.add_argument("--precision", choices=pipeline_lib.PRECISIONS, default="float32", help="network compute precision (bfloat16: E_ID, E_Attr, M, G, parser; flow and keys stay float32)")
    p.add_argument("--force", action="store_true",
                   help="replace existing outputs (only images this tool wrote, with their sidecar)")
    p.add_argument("--key-vector", metavar="U.npy",
                   help="official key path: k = f(u) from a saved [512] vector instead of a secret")
    p.add_argument("--kdf-allow-costly", action="store_true",
                   help=f"allow KDF costs above the caps (memory {keys.CAP_MEMORY_KIB} KiB, "
                        f"{keys.CAP_ITERATIONS} iterations, {keys.CAP_LANES} lanes)")
    keys.add_secret_arguments(p)
    cli.add_common_arguments(p)


def _anonymize_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ifadit_jax.anonymize",
                                description="Anonymize faces (iFADIT). Outputs get a JSON sidecar "
                                            "that recovery needs; the secret is never stored.")
    _common_arguments(p)
    p.add_argument("--aligned", action="store_true",
                   help="inputs are 256x256 FFHQ-aligned faces: no detection, no paste-back")
    p.add_argument("--no-refine", action="store_true", help="skip the face-mask blending (Eq. 11)")
    p.add_argument("--detector", help=f"MTCNN weights (default WEIGHTS/{DETECTOR_FILE})")
    p.add_argument("--min-face-size", type=float, default=DEFAULT_MIN_FACE_SIZE, metavar="PX",
                   help=f"ignore faces whose box is smaller (default {DEFAULT_MIN_FACE_SIZE:g} px)")
    p.add_argument("--det-threshold", type=float, default=DEFAULT_DET_THRESHOLD, metavar="P",
                   help=f"minimum face probability (default {DEFAULT_DET_THRESHOLD})")
    p.add_argument("--no-face", choices=("fail", "copy", "skip"), default="fail",
                   help="a photo without a face: fail (default: it is listed as failed), copy it "
                        "unchanged (with a sidecar), or skip it")
    p.add_argument("--key-check", action="store_true",
                   help="store a short key check so recovery can say 'wrong secret' (removes the "
                        "deniability of a plausible wrong-key face; see the README)")
    p.add_argument("--kdf-salt", metavar="HEX", help="Argon2id salt (default: the project's public salt)")
    p.add_argument("--kdf-memory-kib", type=int, help="Argon2id memory cost in KiB")
    p.add_argument("--kdf-iterations", type=int, help="Argon2id iterations")
    video_lib.add_arguments(p)
    return p


def _check_flags(args) -> None:
    if args.batch < 1 or args.batch > 1024:
        raise InputError("--batch must be 1 to 1024")
    if getattr(args, "min_face_size", 20) < 12 or not np.isfinite(getattr(args, "min_face_size", 20)):
        raise InputError("--min-face-size must be at least 12 pixels (MTCNN's smallest window)")
    if not 0.0 <= getattr(args, "det_threshold", 0.5) <= 1.0:
        raise InputError("--det-threshold must lie in [0, 1]")
    if not 0 <= getattr(args, "crf", 18) <= 51:
        raise InputError("--crf must be 0 to 51")


def _prepare_anonymize(args, detector, job: Job):
    """-> (Decoded, faces): faces None for an aligned image, else [{"box", "transform"}]."""
    decoded = imageio.read_image(job.src, min_size=MIN_PHOTO_SIDE)
    if args.aligned:
        if decoded.rgb.shape[:2] != (CROP, CROP):
            h, w = decoded.rgb.shape[:2]
            raise InputError(f"{job.src}: aligned input must be {CROP}x{CROP}, got {w}x{h} "
                             "(drop --aligned to detect faces)")
        return decoded, None
    found = detect_faces(detector, decoded.rgb, args.det_threshold, args.min_face_size)
    if not found and args.no_face == "skip":
        raise Skipped()
    if not found and args.no_face == "fail":
        raise NoFaceError(f"{job.src}: no face found")
    return decoded, [{"box": f.box, "transform": f.transform} for f in found]


def _anonymize_record(pipe, key: Key, args, job: Job, decoded, faces) -> dict:
    h, w = decoded.rgb.shape[:2]
    rec = {"format": sidecar.FORMAT, "conventions": pipe.conventions.name,
           "weights_id": pipe.weights_id, "key": key.record, "refine": not args.no_refine,
           "mode": "aligned" if args.aligned else "photo", "size": [h, w], "faces": faces or []}
    try:  # what recovery will refuse must not be written
        sidecar.validate(rec, allow_costly=True)
    except sidecar.SidecarError as e:
        raise InputError(f"{job.src}: cannot record this image for recovery ({e})") from None
    return rec


def _anonymize_video(pipe, detector, key: Key, args, job: Job) -> None:
    if args.aligned:
        raise InputError(f"{job.src}: --aligned is for 256x256 face images, not videos")
    _make_parent(job.dst)
    opts = video_lib.EncodeOptions(codec=args.codec, crf=args.crf, keep_audio=args.keep_audio)
    video_lib.anonymize_video(pipe, job.src, job.dst, key.k, detector=detector,
                              key_record=key.record, refine=not args.no_refine, opts=opts,
                              batch=args.batch, min_prob=args.det_threshold,
                              min_size=args.min_face_size, quiet=args.quiet)


def _warn_lossy(work: Plan, args) -> None:
    if not work.folder and imageio.is_lossy_path(work.output):
        print(f"warning: {work.output} is lossy (JPEG): recovery from it will be degraded; use "
              ".png", file=sys.stderr)
    if args.codec == "h264" and any(j.video for j in work.jobs):
        print("warning: h264 is lossy: recovery of the videos will be degraded; the default ffv1 "
              "is lossless", file=sys.stderr)


def anonymize_main(argv: Sequence[str]) -> int:
    cli.refuse_secret_on_command_line(argv)
    args = _anonymize_parser().parse_args(argv)
    _check_flags(args)
    kdf = None if args.key_vector else _kdf_from_args(args)
    if os.path.isfile(args.input) and video_lib.looks_like_video(args.input):
        return video_lib.anonymize_command(args, kdf)
    work = plan(args.input, args.output, args.force)
    _warn_lossy(work, args)
    cli.setup(args)
    pipe = pipeline_lib.load(args.weights, precision=args.precision)
    detector = None if args.aligned else load_detector(args.weights, args.detector)
    key = vector_key(pipe, args.key_vector) if kdf is None else secret_key(pipe, args, kdf, args.key_check)
    _check_resume(work.done, pipe, key, args.kdf_allow_costly)
    prepare = functools.partial(prepare_item, prepare=functools.partial(_prepare_anonymize, args, detector),
                                make_record=functools.partial(_anonymize_record, pipe, key, args),
                                refine_of=lambda job: not args.no_refine)
    nets = Networks(pipe, recover=False, batch=args.batch)
    return _run_jobs(work, nets, key, args, prepare,
                     functools.partial(_anonymize_video, pipe, detector, key, args))


def _recover_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ifadit_jax.recover",
                                description="Recover faces anonymized by ifadit_jax.anonymize; reads "
                                            "and validates the JSON sidecar of each input (its mode, "
                                            "alignment and key settings). A wrong secret still gives "
                                            "a face, of another identity, unless a key check was "
                                            "stored.")
    _common_arguments(p)
    return p


def _read_sidecar(job: Job, allow_costly: bool):
    path = sidecar.path_for(job.src)
    if not os.path.lexists(path):
        raise InputError(f"{job.src}: no sidecar {os.path.basename(path)} (recovery needs the file "
                         f"written beside the anonymized {'video' if job.video else 'image'})")
    try:
        if job.video:  # its size is checked against the decoded frames
            return sidecar.read_video(path, allow_costly)
        side = sidecar.read(path, allow_costly)
        size = imageio.header_size(job.src)  # before any network runs (checked again decoded)
        if size is not None:
            sidecar.check_size(side, (size[1], size[0]))
        return side
    except sidecar.SidecarError as e:
        text = str(e)
        raise e if text.startswith(path) else sidecar.SidecarError(f"{path}: {text}") from None


def _read_sidecars(jobs: list[Job], allow_costly: bool):
    """-> ({src: Sidecar or VideoSidecar}, [(src, error)]): a missing or invalid sidecar fails
    its item only."""
    found, failures = {}, []
    for job in jobs:
        try:
            found[job.src] = _read_sidecar(job, allow_costly)
        except InputError as e:
            failures.append((job.src, e))
    return found, failures


def recovery_key(pipe, args, record: dict) -> Key:
    if record["path"] == "vector":
        if not args.key_vector:
            raise InputError("these images were anonymized with a key vector; pass --key-vector")
        return vector_key(pipe, args.key_vector)
    if args.key_vector:
        raise InputError("these images were anonymized with a secret; drop --key-vector")
    kdf = keys.KdfParams.from_dict(record["kdf"])
    key = secret_key(pipe, args, kdf, store_check=False)
    if "check" in record and record["check"] != key.check:
        raise SecretError("wrong secret: it does not match the key check stored at anonymization")
    return key


def _check_weights(pipe, src: str, side) -> None:
    if side.weights_id != pipe.weights_id or side.conventions != pipe.conventions.name:
        raise InputError(f"{src}: anonymized with weights {sidecar.printable(side.weights_id)} "
                         f"({side.conventions}), these are {pipe.weights_id}")


def _prepare_recover(pipe, sides: dict, job: Job):
    """-> (Decoded, faces) from the recorded alignment (never detects)."""
    s = sides[job.src]
    _check_weights(pipe, job.src, s)
    decoded = imageio.read_image(job.src)
    try:
        sidecar.check_size(s, decoded.rgb.shape[:2])
    except sidecar.SidecarError as e:
        raise sidecar.SidecarError(f"{sidecar.path_for(job.src)}: {e}") from None
    if s.mode == "aligned":
        return decoded, None
    return decoded, [{"box": list(f.box), "transform": [list(r) for r in f.transform]}
                     for f in s.faces]


def _recover_video(pipe, sides: dict, key: Key, args, job: Job) -> None:
    _check_weights(pipe, job.src, sides[job.src])
    _make_parent(job.dst)
    video_lib.recover_video(pipe, job.src, job.dst, key.k, sides[job.src], batch=args.batch,
                            quiet=args.quiet)


def recover_main(argv: Sequence[str]) -> int:
    cli.refuse_secret_on_command_line(argv)
    args = _recover_parser().parse_args(argv)
    _check_flags(args)
    if os.path.isfile(args.input) and video_lib.looks_like_video(args.input):
        return video_lib.recover_command(args)
    work = plan(args.input, args.output, args.force, recover=True)
    sides, failures = _read_sidecars(work.jobs, args.kdf_allow_costly)
    if failures and not work.folder:
        raise failures[0][1]
    work.jobs = [j for j in work.jobs if j.src in sides]
    records = {repr(sorted(s.key.items())): s.key for s in sides.values()}
    if len(records) > 1:
        raise InputError("the inputs were anonymized with different key settings or secrets; "
                         "recover them separately")
    if not work.jobs:
        return _report(failures, len(failures), 0, work, args.quiet)
    cli.setup(args)
    pipe = pipeline_lib.load(args.weights, precision=args.precision)
    key = recovery_key(pipe, args, next(iter(records.values())))
    prepare = functools.partial(
        prepare_item, prepare=functools.partial(_prepare_recover, pipe, sides),
        make_record=lambda job, decoded, faces: sidecar.recovered(pipe.weights_id, sides[job.src].mode),
        refine_of=lambda job: sides[job.src].refine)
    nets = Networks(pipe, recover=True, batch=args.batch)
    return _run_jobs(work, nets, key, args, prepare,
                     functools.partial(_recover_video, pipe, sides, key, args), failures)
