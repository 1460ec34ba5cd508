"""The command-line core: anonymizing and recovering image files (aligned faces, folders and
in-the-wild photos).

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
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import shutil
import sys
from typing import Sequence

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


def _run_batches(fn, crops: np.ndarray, k, batch: int, refine: bool):
    """Runs `fn(images, k, refine)` over [N, 256, 256, 3] in fixed-size batches (the last one
    padded, so a folder compiles one program) -> (outputs [N, ...], masks [N, ...] or None)."""
    outs, masks = [], []
    for start in range(0, len(crops), batch):
        chunk = crops[start:start + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        out, inter = fn(chunk, k, refine=refine)
        outs.append(np.asarray(out)[:n])
        if inter.get("mask") is not None:
            masks.append(np.asarray(inter["mask"])[:n])
    return np.concatenate(outs), (np.concatenate(masks) if masks else None)


def process_photo(fn, photo: np.ndarray, transforms: Sequence, k, batch: int, refine: bool):
    """Warps every face to its crop, runs `fn` on the crops, pastes them back. No faces: the
    photo unchanged."""
    mats = [np.asarray(a, np.float64) for a in transforms]
    if not mats:
        return photo
    crops = np.stack([align.warp_to_crop(photo, a, CROP) for a in mats])
    out, masks = _run_batches(fn, crops, k, batch, refine)
    result = photo
    for i, a in enumerate(mats):
        result = align.paste_back(result, out[i], a, feather=0.1,
                                  mask=None if masks is None else masks[i])
    return result


# ----------------------------------------------------------------------------------------------
# Planning: which files go where, checked before anything expensive runs


@dataclasses.dataclass
class Job:
    src: str
    dst: str


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


def _list_images(folder: str) -> list[str]:
    found = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            # `.tmp-*` files are partial outputs of killed runs, never inputs.
            if imageio.is_image_path(name) and not name.startswith(".tmp-"):
                found.append(os.path.join(root, name))
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


def _folder_plan(src: str, output: str, force: bool) -> Plan:
    src_real, out_real = files.real(src), files.real(output)
    if files.inside(out_real, src_real):
        raise InputError("the output folder must not be the input folder or lie inside it")
    if os.path.lexists(output) and not os.path.isdir(output):
        raise InputError(f"{output}: the input is a folder, so the output must be a folder")
    inputs = _list_images(src)
    if not inputs:
        raise InputError(f"no images found in {src}")
    pairs = [(p, os.path.join(output, os.path.splitext(os.path.relpath(p, src))[0] + ".png"))
             for p in inputs]
    _collisions(pairs)
    input_reals = {files.real(p) for p in inputs}
    plan, refused = Plan([], [], folder=True, output=output), []
    for p, dst in pairs:
        if files.real(dst) in input_reals or files.real(sidecar.path_for(dst)) in input_reals:
            raise InputError(f"{dst} would overwrite the input {p}")
        if files.inside(files.real(dst), src_real):  # through a symlinked folder in the output
            raise InputError(f"{dst} lies inside the input folder {src} (through a symlink)")
        state = _owned_state(dst)
        if state == "ours":
            (plan.jobs if force else plan.done).append(Job(p, dst))
        elif state == "absent":
            plan.jobs.append(Job(p, dst))
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
        size = imageio.header_size(job.src)  # None: the item fails on its own later
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


def plan(input_path: str, output_path: str, force: bool) -> Plan:
    """Checks the paths and lists the work: one job for a file; for a folder, one per image below
    it (the output mirrors the tree, every output a .png)."""
    if not os.path.exists(input_path):
        raise InputError(f"input not found: {input_path}")
    if os.path.isfile(input_path):
        result = _file_plan(input_path, output_path, force)
    elif os.path.isdir(input_path):
        result = _folder_plan(input_path, output_path, force)
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
        s = sidecar.read(sidecar.path_for(job.dst), allow_costly)
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
# Running


def _write(job: Job, image: np.ndarray, like: imageio.Decoded, record: dict, force: bool) -> None:
    parent = os.path.dirname(os.path.abspath(job.dst))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create {parent}: {e.strerror}") from None
    # The sidecar first: an image without its sidecar could not be recovered.
    with files.atomic_path(sidecar.path_for(job.dst), force=True) as tmp:
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
    try:
        imageio.write_rgb(job.dst, image, force=True, like=like)
    except InputError:
        if not os.path.exists(job.dst):
            os.unlink(sidecar.path_for(job.dst))  # nothing partial remains
        raise


def _report(failures: list[tuple[str, InputError]], n: int, skipped: int, plan_: Plan, quiet: bool) -> int:
    for src, e in failures:
        text = str(e)
        print(f"error: {text if text.startswith(src) else f'{src}: {text}'}", file=sys.stderr)
    if failures:
        codes = {type(e).exit_code for _, e in failures}
        print(f"error: {len(failures)} of {n} images failed, nothing written for them",
              file=sys.stderr)
        return codes.pop() if len(codes) == 1 else InputError.exit_code
    if not quiet:
        extra = f" ({len(plan_.done)} already done, {skipped} skipped)" if plan_.folder else ""
        print(f"{plan_.output}{extra}")
    return 0


def _flush(pending: list, fn, key: Key, args, make_record, refine_of, failures: list) -> None:
    """Runs the aligned images collected in `pending` in batches (grouped by refine) and writes
    them; a failing item is added to `failures` (src, error) and the others are written."""
    items, groups = list(pending), collections.defaultdict(list)
    pending.clear()
    for item in items:
        groups[refine_of(item[0])].append(item)
    for refine, group in groups.items():
        try:
            out, _ = _run_batches(fn, np.stack([d.rgb for _, d in group]), key.k, args.batch, refine)
        except InputError as e:
            failures.extend((job.src, e) for job, _ in group)
            continue
        for (job, decoded), result in zip(group, out):
            try:
                _write(job, result, decoded, make_record(job, decoded, None), args.force)
            except InputError as e:
                failures.append((job.src, e))


def _run_jobs(plan_: Plan, fn, key: Key, args, prepare, make_record, refine_of,
              failures: list | None = None) -> int:
    """Runs `fn` (pipe.anonymize or pipe.recover) over the jobs.

    `prepare(job)` -> (Decoded, faces): faces None for an aligned 256x256 image (batched across
    files), else the faces ({"box", "transform"}) to warp out and paste back; `refine_of(job)`:
    whether to blend with the face mask; `failures`: (src, error) found earlier. A failing job
    writes nothing; in a folder the others go on, a single file raises.
    """
    failures, skipped, pending = list(failures or []), 0, []
    for job in cli.progress(plan_.jobs, quiet=args.quiet):
        try:
            decoded, faces = prepare(job)
            if faces is None:
                pending.append((job, decoded))
                if len(pending) == args.batch:
                    _flush(pending, fn, key, args, make_record, refine_of, failures)
                continue
            record = make_record(job, decoded, faces)
            transforms = [f["transform"] for f in faces]
            result = process_photo(fn, decoded.rgb, transforms, key.k, args.batch, refine_of(job))
            _write(job, result, decoded, record, args.force)
        except Skipped:
            skipped += 1
        except InputError as e:
            failures.append((job.src, e))
    _flush(pending, fn, key, args, make_record, refine_of, failures)
    if failures and not plan_.folder:
        raise failures[0][1]
    n = len(plan_.jobs) + sum(1 for src, _ in failures if src not in {j.src for j in plan_.jobs})
    return _report(failures, n, skipped, plan_, args.quiet)


# ----------------------------------------------------------------------------------------------
# Command lines


def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="an image, a folder of images, or a video")
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


def anonymize_main(argv: Sequence[str]) -> int:
    cli.refuse_secret_on_command_line(argv)
    args = _anonymize_parser().parse_args(argv)
    _check_flags(args)
    kdf = None if args.key_vector else _kdf_from_args(args)
    if os.path.isfile(args.input) and video_lib.looks_like_video(args.input):
        return video_lib.anonymize_command(args, kdf)
    work = plan(args.input, args.output, args.force)
    if not work.folder and imageio.is_lossy_path(work.output):
        print(f"warning: {work.output} is lossy (JPEG): recovery from it will be degraded; use "
              ".png", file=sys.stderr)
    cli.setup(args)
    pipe = pipeline_lib.load(args.weights, precision=args.precision)
    detector = None if args.aligned else load_detector(args.weights, args.detector)
    key = vector_key(pipe, args.key_vector) if kdf is None else secret_key(pipe, args, kdf, args.key_check)
    _check_resume(work.done, pipe, key, args.kdf_allow_costly)

    def prepare(job):
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

    def record(job, decoded, faces):
        h, w = decoded.rgb.shape[:2]
        rec = {"format": sidecar.FORMAT, "conventions": pipe.conventions.name,
               "weights_id": pipe.weights_id, "key": key.record, "refine": not args.no_refine,
               "mode": "aligned" if args.aligned else "photo", "size": [h, w], "faces": faces or []}
        try:  # what recovery will refuse must not be written
            sidecar.validate(rec, allow_costly=True)
        except sidecar.SidecarError as e:
            raise InputError(f"{job.src}: cannot record this image for recovery ({e})") from None
        return rec

    return _run_jobs(work, pipe.anonymize, key, args, prepare, record, lambda job: not args.no_refine)


def _recover_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ifadit_jax.recover",
                                description="Recover faces anonymized by ifadit_jax.anonymize; reads "
                                            "and validates the JSON sidecar of each input (its mode, "
                                            "alignment and key settings). A wrong secret still gives "
                                            "a face, of another identity, unless a key check was "
                                            "stored.")
    _common_arguments(p)
    return p


def _read_sidecars(jobs: list[Job], allow_costly: bool):
    """-> ({src: Sidecar}, [(src, error)]): a missing or invalid sidecar fails its item only."""
    found, failures = {}, []
    for job in jobs:
        path = sidecar.path_for(job.src)
        if not os.path.lexists(path):
            failures.append((job.src, InputError(
                f"{job.src}: no sidecar {os.path.basename(path)} (recovery needs the file written "
                "beside the anonymized image)")))
            continue
        try:
            side = sidecar.read(path, allow_costly)
            size = imageio.header_size(job.src)  # before any network runs (checked again decoded)
            if size is not None:
                sidecar.check_size(side, (size[1], size[0]))
            found[job.src] = side
        except sidecar.SidecarError as e:
            text = str(e)
            failures.append((job.src, e if text.startswith(path) else sidecar.SidecarError(f"{path}: {text}")))
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


def recover_main(argv: Sequence[str]) -> int:
    cli.refuse_secret_on_command_line(argv)
    args = _recover_parser().parse_args(argv)
    _check_flags(args)
    if os.path.isfile(args.input) and video_lib.looks_like_video(args.input):
        return video_lib.recover_command(args)
    work = plan(args.input, args.output, args.force)
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

    def prepare(job):
        s = sides[job.src]
        if s.weights_id != pipe.weights_id or s.conventions != pipe.conventions.name:
            raise InputError(f"{job.src}: anonymized with weights {sidecar.printable(s.weights_id)} "
                             f"({s.conventions}), these are {pipe.weights_id}")
        decoded = imageio.read_image(job.src)
        try:
            sidecar.check_size(s, decoded.rgb.shape[:2])
        except sidecar.SidecarError as e:
            raise sidecar.SidecarError(f"{sidecar.path_for(job.src)}: {e}") from None
        if s.mode == "aligned":
            return decoded, None
        return decoded, [{"box": list(f.box), "transform": [list(r) for r in f.transform]}
                         for f in s.faces]

    def record(job, decoded, faces):
        return sidecar.recovered(pipe.weights_id, sides[job.src].mode)

    return _run_jobs(work, pipe.recover, key, args, prepare, record,
                     lambda job: sides[job.src].refine, failures)
