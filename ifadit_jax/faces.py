"""Anonymizing and recovering image files: aligned faces, folders and in-the-wild photos.

The importable core of `python -m ifadit_jax.anonymize` and `python -m ifadit_jax.recover`:

* aligned mode (`aligned=True`): the input is a 256x256 FFHQ-aligned face, processed as is;
* photo mode (default): MTCNN finds every face; each is aligned to the FFHQ 256 crop from its five
  landmarks (`ifadit_jax.align`), anonymized, and pasted back through the inverse warp, feathered
  and limited to the soft face mask.

Every output gets a JSON sidecar (`OUTPUT.json`) with what recovery needs: the weights id, the
key path and KDF parameters (salt included), the mode, and per face its box, landmarks and
alignment matrix. It never holds the secret. Recovery reads the sidecar of its input, re-derives
the key from the secret and the recorded parameters, and uses the recorded alignment instead of
detecting faces again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from typing import Iterable, Sequence

import numpy as np

from ifadit_jax import align, imageio, keys
from ifadit_jax import pipeline as pipeline_lib
from ifadit_jax.errors import InputError, NoFaceError, WeightsError
from ifadit_jax.files import atomic_path

SIDECAR_FORMAT = "ifadit-jax-anonymized/1"
CROP = 256
MIN_PHOTO_SIDE = 24  # MTCNN's smallest pyramid level needs 12 px; faces need more
DETECTOR_FILE = "mtcnn.safetensors"


@dataclasses.dataclass(frozen=True)
class Face:
    box: list[float]
    prob: float
    landmarks: list[list[float]]
    transform: list[list[float]]  # 2x3, crop (u, v, 1) -> photo (x, y)


def sidecar_path(output: str) -> str:
    return output + ".json"


def detect_faces(detector, photo: np.ndarray, min_prob: float = 0.9) -> list[Face]:
    boxes, probs, landmarks = detector.detect(imageio.to_uint8(photo))
    faces = []
    for b, p, lm in zip(boxes, probs, landmarks):
        if p < min_prob:
            continue
        a = align.crop_transform(lm, CROP)
        faces.append(Face(box=[float(v) for v in b], prob=float(p),
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


def process_photo(fn, photo: np.ndarray, faces: Sequence[Face], k, batch: int, refine: bool):
    """Warps every face to its crop, runs `fn` on the crops, pastes them back."""
    mats = [np.asarray(f.transform) for f in faces]
    crops = np.stack([align.warp_to_crop(photo, a, CROP) for a in mats])
    out, masks = _run_batches(fn, crops, k, batch, refine)
    result = photo
    for i, a in enumerate(mats):
        result = align.paste_back(result, out[i], a, feather=0.1,
                                  mask=None if masks is None else masks[i])
    return result


@dataclasses.dataclass
class Job:
    src: str
    dst: str


def plan(input_path: str, output_path: str, force: bool) -> list[Job]:
    """One job for a file; for a folder, one per image below it (the output mirrors the tree)."""
    input_path, output_path = os.path.abspath(input_path), os.path.abspath(output_path)
    if not os.path.exists(input_path):
        raise InputError(f"input not found: {input_path}")
    if input_path == output_path:
        raise InputError("output would overwrite the input")
    if os.path.isfile(input_path):
        if os.path.isdir(output_path):
            output_path = os.path.join(output_path, os.path.splitext(os.path.basename(input_path))[0] + ".png")
        if not imageio.is_image_path(output_path):
            raise InputError(f"{output_path}: output needs an image extension (.png is lossless)")
        if os.path.exists(output_path) and not force:
            raise InputError(f"output exists, not overwriting (use --force): {output_path}")
        if not os.path.isdir(os.path.dirname(output_path)):
            raise InputError(f"output directory does not exist: {os.path.dirname(output_path)}")
        return [Job(input_path, output_path)]
    if output_path.startswith(input_path + os.sep):
        raise InputError("the output folder must not lie inside the input folder")
    if not os.path.isdir(os.path.dirname(output_path)):
        raise InputError(f"output directory does not exist: {os.path.dirname(output_path)}")
    jobs = []
    for root, dirs, files in os.walk(input_path):
        dirs.sort()
        for name in sorted(files):
            if not imageio.is_image_path(name):
                continue
            rel = os.path.relpath(os.path.join(root, name), input_path)
            dst = os.path.join(output_path, os.path.splitext(rel)[0] + ".png")
            if os.path.exists(dst) and not force:
                continue  # done in an earlier run: resumable
            jobs.append(Job(os.path.join(root, name), dst))
    if not jobs and not os.path.isdir(output_path):
        raise InputError(f"no images found in {input_path}")
    return jobs


def _write(job: Job, image: np.ndarray, sidecar: dict, force: bool) -> None:
    os.makedirs(os.path.dirname(job.dst), exist_ok=True)
    # The sidecar first: an image without its sidecar could not be recovered.
    with atomic_path(sidecar_path(job.dst), force=True) as tmp:
        with open(tmp, "w") as f:
            json.dump(sidecar, f, indent=1)
    imageio.write_rgb(job.dst, image, force=True)


def _load_detector(weights_dir: str, detector_path: str | None):
    from ifadit_jax import weights

    path = detector_path or os.path.join(weights_dir, DETECTOR_FILE)
    if not os.path.isfile(path):
        raise WeightsError(f"face detector weights not found: {path} (convert facenet-pytorch's "
                           f"MTCNN with: python ports/convert_mtcnn.py DIR {path}; or use --aligned)")
    variables, meta = weights.read(path, kind="mtcnn")
    return weights.loader("mtcnn")(variables, meta)


def _key(pipe, args, kdf: keys.KdfParams | None, key_vector: str | None):
    if key_vector:
        try:
            u = np.load(key_vector)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read the key vector {key_vector}: {e}") from None
        if u.shape not in ((512,), (1, 512)):
            raise InputError(f"{key_vector}: key vector must have shape [512], got {u.shape}")
        return pipe.key_from_vector(u.reshape(1, 512))[0], {"path": "vector", "file": os.path.basename(key_vector)}
    secret = keys.secret_from_args(args)
    kdf = kdf or keys.KdfParams()
    return pipe.key_from_secret(secret, kdf), {"path": "kdf", "kdf": kdf.to_dict()}


def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="an image or a folder of images")
    p.add_argument("output", help="output image (.png) or folder (mirrors the input tree)")
    p.add_argument("--weights", required=True, help="weights folder (ports/convert_ifadit.py release)")
    p.add_argument("--aligned", action="store_true",
                   help="inputs are 256x256 FFHQ-aligned faces: no detection, no paste-back")
    p.add_argument("--batch", type=int, default=4, help="faces per batch (default 4)")
    p.add_argument("--no-refine", action="store_true", help="skip the face-mask blending (Eq. 11)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--key-vector", metavar="U.npy",
                   help="official key path: k = f(u) from a saved [512] vector instead of a secret")
    keys.add_secret_arguments(p)


def _progress(jobs: Sequence[Job], enabled: bool) -> Iterable[Job]:
    if not enabled or len(jobs) < 2:
        return jobs
    from tqdm import tqdm

    return tqdm(jobs, unit="image", file=sys.stderr)


def anonymize_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m ifadit_jax.anonymize",
                                description="Anonymize faces (iFADIT). Outputs get a JSON sidecar "
                                            "that recovery needs; the secret is never stored.")
    _common_arguments(p)
    p.add_argument("--detector", help=f"MTCNN weights (default WEIGHTS/{DETECTOR_FILE})")
    p.add_argument("--kdf-salt", metavar="HEX", help="Argon2id salt (default: the project's public salt)")
    p.add_argument("--kdf-memory-kib", type=int, help="Argon2id memory cost in KiB")
    p.add_argument("--kdf-iterations", type=int, help="Argon2id iterations")
    args = p.parse_args(argv)
    if args.batch < 1:
        raise InputError("--batch must be at least 1")
    jobs = plan(args.input, args.output, args.force)
    pipe = pipeline_lib.load(args.weights)
    refine = not args.no_refine  # recorded in the sidecar
    detector = None if args.aligned else _load_detector(args.weights, args.detector)
    kdf_fields = {}
    if args.kdf_salt:
        try:
            kdf_fields["salt"] = bytes.fromhex(args.kdf_salt)
        except ValueError:
            raise InputError("--kdf-salt must be hexadecimal") from None
    if args.kdf_memory_kib:
        kdf_fields["memory_cost"] = args.kdf_memory_kib
    if args.kdf_iterations:
        kdf_fields["iterations"] = args.kdf_iterations
    kdf = keys.KdfParams(**kdf_fields) if kdf_fields else None
    k, key_record = _key(pipe, args, kdf, args.key_vector)
    def prepare(job):
        photo = imageio.read_rgb(job.src, min_size=MIN_PHOTO_SIDE)
        if args.aligned:
            if photo.shape[:2] != (CROP, CROP):
                raise InputError(f"{job.src}: aligned input must be {CROP}x{CROP}, got "
                                 f"{photo.shape[1]}x{photo.shape[0]} (drop --aligned to detect faces)")
            return photo, None
        found = detect_faces(detector, photo)
        if not found:
            raise NoFaceError(f"{job.src}: no face found")
        return photo, found

    def sidecar(job, photo, found):
        return {"format": SIDECAR_FORMAT, "weights_id": pipe.weights_id,
                "conventions": pipe.conventions.name, "key": key_record, "refine": refine,
                "mode": "aligned" if found is None else "photo",
                "source": os.path.basename(job.src), "size": list(photo.shape[:2]),
                "faces": [dataclasses.asdict(f) for f in found or []]}

    return _run_jobs(jobs, pipe.anonymize, k, args, prepare, sidecar)


def _run_jobs(jobs: Sequence[Job], fn, k, args, prepare, sidecar) -> int:
    """Runs `fn` (pipe.anonymize or pipe.recover) over the jobs. `prepare(job)` -> (image,
    faces): faces None for an aligned 256x256 image (batched across files), else the faces to
    warp out and paste back. A failing job writes nothing; the others go on."""
    refine = not args.no_refine
    failures: list[InputError] = []
    pending: list[tuple[Job, np.ndarray]] = []

    def flush():
        if pending:
            out, _ = _run_batches(fn, np.stack([img for _, img in pending]), k, args.batch, refine)
            for (job, img), result in zip(pending, out):
                _write(job, result, sidecar(job, img, None), args.force)
            pending.clear()

    for job in _progress(jobs, len(jobs) > 1):
        try:
            image, found = prepare(job)
            if found is None:
                pending.append((job, image))
                if len(pending) == args.batch:
                    flush()
            else:
                result = process_photo(fn, image, found, k, args.batch, refine)
                _write(job, result, sidecar(job, image, found), args.force)
        except InputError as e:
            if len(jobs) == 1:
                raise
            failures.append(e)
    flush()
    return _report(failures, len(jobs))


def _report(failures, n) -> int:
    if not failures:
        return 0
    first = failures[0]
    code = first.exit_code if all(type(f) is type(first) for f in failures) else InputError.exit_code
    print(f"error: {len(failures)} of {n} images failed, nothing written for them "
          f"(first: {first})", file=sys.stderr)
    return code


def recover_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m ifadit_jax.recover",
                                description="Recover faces anonymized by ifadit_jax.anonymize; reads "
                                            "the JSON sidecar of each input. A wrong secret still "
                                            "gives a face, of another identity.")
    _common_arguments(p)
    args = p.parse_args(argv)
    jobs = plan(args.input, args.output, args.force)
    pipe = pipeline_lib.load(args.weights)
    sidecars = {}
    for job in jobs:
        path = sidecar_path(job.src)
        try:
            with open(path) as f:
                sidecars[job.src] = json.load(f)
        except (OSError, ValueError):
            raise InputError(f"{job.src}: no readable sidecar {os.path.basename(path)} "
                             "(recovery needs the file written beside the anonymized image)") from None
        if sidecars[job.src].get("format") != SIDECAR_FORMAT:
            raise InputError(f"{path}: not an ifadit-jax sidecar")
    key_records = {json.dumps(s["key"], sort_keys=True) for s in sidecars.values()}
    if len(key_records) > 1:
        raise InputError("the inputs were anonymized with different key settings; recover them separately")
    record = sidecars[jobs[0].src]["key"] if jobs else {"path": "kdf", "kdf": keys.KdfParams().to_dict()}
    if record["path"] == "vector":
        if not args.key_vector:
            raise InputError("these images were anonymized with a key vector; pass --key-vector")
        k, _ = _key(pipe, args, None, args.key_vector)
    else:
        k, _ = _key(pipe, args, keys.KdfParams.from_dict(record["kdf"]), None)
    for s in sidecars.values():
        if s.get("weights_id") and s["weights_id"] != pipe.weights_id:
            warnings.warn(f"{s.get('source')}: anonymized with weights {s['weights_id']}, recovering "
                          f"with {pipe.weights_id}", stacklevel=1)
            break
    def prepare(job):
        s = sidecars[job.src]
        image = imageio.read_rgb(job.src)
        if s["mode"] == "aligned":
            if image.shape[:2] != (CROP, CROP):
                raise InputError(f"{job.src}: expected {CROP}x{CROP} as recorded, got "
                                 f"{image.shape[1]}x{image.shape[0]}")
            return image, None
        return image, [Face(**f) for f in s["faces"]]

    def sidecar(job, image, found):
        return {"format": "ifadit-jax-recovered/1", "weights_id": pipe.weights_id,
                "recovered_from": os.path.basename(job.src), "mode": sidecars[job.src]["mode"]}

    return _run_jobs(jobs, pipe.recover, k, args, prepare, sidecar)
