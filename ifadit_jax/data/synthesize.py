"""Writes FFHQ*, the training set of iFADIT (paper §4.1): images and W latents sampled from the
ported StyleGAN2 generator.

  python -m ifadit_jax.data.synthesize --weights G.safetensors --n 70000 --out DIR \\
      --truncation 0.7 [--seed 0] [--batch 32]

Layout (read back by `ifadit_jax.data.sources.FFHQStarSource`):
  DIR/meta.json            format, n, seed, truncation, batch, platform, the rules below, and the
                           generator: file name, sha256 of the .safetensors, source file and
                           sha256 of the official checkpoint it was converted from
  DIR/latents.npy          float32 [n, w_dim]; row i is the (truncated) W latent of image i
  DIR/images/{i:06d}.png   uint8 RGB [res, res, 3]

For image i: z_i = jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), (z_dim,)),
w_i = G.mapping(z_i, truncation) (towards the checkpoint's average latent), image_i =
round(clip((G.synthesis(w_i, noise_mode="const") + 1) / 2, 0, 1) * 255). Batch k always holds
images k*B ... k*B + B - 1 (the last batch padded with the next indices, which are computed and
not written), so every image is computed in the same batch, whatever run computes it.

Resumable: rerunning the same command (or a larger --n) continues where it stopped and gives files
byte-identical to an uninterrupted run. Each image is written atomically (a temporary file renamed
into place) after its latent row, so an interruption leaves no partial image. Resuming checks
that the generator, seed, truncation, batch and platform are the ones recorded in meta.json (the
last two because float results may differ in their last bits across batch sizes and devices).
The command line sets XLA_FLAGS=--xla_gpu_deterministic_ops=true (unless XLA_FLAGS already names
it) so that GPU runs are bit-reproducible across processes too.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import re
from typing import Sequence

import numpy as np

from ifadit_jax import cli
from ifadit_jax.data import sources
from ifadit_jax.errors import InputError
from ifadit_jax.files import atomic_path

DEFAULT_BATCH = 32
Z_RULE = "z_i = jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), (z_dim,))"
IMAGE_RULE = "round(clip((G.synthesis(w_i, noise_mode='const') + 1) / 2, 0, 1) * 255)"
_TMP = re.compile(r"^\.tmp-")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one `error: ...` line (through cli.run) instead of usage text."""

    def error(self, message):
        raise InputError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m ifadit_jax.data.synthesize",
                description="Writes FFHQ* (images + W latents) with a converted StyleGAN2.")
    p.add_argument("--weights", required=True, help="converted StyleGAN2 .safetensors")
    p.add_argument("--n", type=int, required=True, help="number of images (70000 in the paper)")
    p.add_argument("--out", required=True, help="output folder (created; resumed if it exists)")
    p.add_argument("--truncation", type=float, default=0.7, help="truncation psi (default 0.7)")
    p.add_argument("--seed", type=int, default=0, help="seed of the z sequence (default 0)")
    p.add_argument("--batch", type=int, default=None,
                   help=f"images per generator call (default {DEFAULT_BATCH}, or the one recorded "
                        "in DIR/meta.json when resuming)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _read_existing_meta(out: str) -> dict | None:
    if not os.path.exists(os.path.join(out, sources.FFHQ_STAR_META)):
        if os.path.isdir(out) and [f for f in os.listdir(out) if not _TMP.match(f)]:
            raise InputError(f"{out} is not empty and holds no FFHQ* {sources.FFHQ_STAR_META}; "
                             "choose a new or empty folder")
        return None
    return sources.read_ffhq_star_meta(out, check_complete=False)


def _check_resume(old: dict, new: dict) -> None:
    checks = [(("generator", "sha256"), "generator weights (sha256)"), (("seed",), "--seed"),
              (("truncation",), "--truncation"), (("noise_mode",), "noise mode"),
              (("batch",), "--batch"), (("platform",), "platform")]
    for keys, what in checks:
        a, b = old, new
        for k in keys:
            a = a.get(k) if isinstance(a, dict) else None
            b = b[k]
        if a != b:
            why = (" (float results may differ in their last bits across batch sizes and devices)"
                   if keys[0] in ("batch", "platform") else "")
            raise InputError(f"the FFHQ* folder was written with {what} {a!r}, this run uses "
                             f"{b!r}{why}; resume with the same settings or choose a new --out")
    if int(old.get("n", 0)) > new["n"]:
        raise InputError(f"the FFHQ* folder already holds a set of {old['n']} images; --n must be "
                         f"at least {old['n']}")


def _ensure_latents(path: str, n: int, w_dim: int, mode: int) -> None:
    """Makes `path` a float32 [n, w_dim] .npy, keeping the rows of a shorter existing one."""
    old = np.load(path, mmap_mode="r") if os.path.exists(path) else None
    if old is not None and old.shape == (n, w_dim) and old.dtype == np.float32:
        return
    if old is not None and (old.ndim != 2 or old.shape[1] != w_dim or old.shape[0] > n):
        raise InputError(f"{path} holds {old.dtype} {old.shape}, expected float32 [<= {n}, {w_dim}]")
    with atomic_path(path) as tmp:
        new = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, w_dim))
        if old is not None:
            new[: old.shape[0]] = old
        new.flush()
        del new
        os.chmod(tmp, mode)
    del old


def _done_indices(images_dir: str, n: int) -> set[int]:
    done = set()
    for name in os.listdir(images_dir):
        if _TMP.match(name):  # left by a killed run (atomic_path cleans up otherwise)
            os.unlink(os.path.join(images_dir, name))
            continue
        m = re.match(r"^(\d{6,})\.png$", name)
        if m and int(m.group(1)) < n:
            done.add(int(m.group(1)))
    return done


def _file_mode() -> int:
    """Permissions of a new file under the current umask (temporary files are created 0600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _write_png(path: str, image: np.ndarray, mode: int) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
        os.chmod(tmp, mode)


def _check_arguments(weights_path: str, out: str, n: int, *, truncation: float, seed: int,
                     batch: int | None) -> None:
    """Every argument error is found before the generator is loaded."""
    if n < 1:
        raise InputError(f"--n must be at least 1, got {n}")
    if batch is not None and batch < 1:
        raise InputError(f"--batch must be at least 1, got {batch}")
    if not 0 <= seed < 2**32:
        raise InputError(f"--seed must be in [0, 2**32), got {seed}")
    if not math.isfinite(truncation):
        raise InputError(f"--truncation must be a finite number, got {truncation}")
    if not os.path.isfile(weights_path):
        raise InputError(f"weights file does not exist: {weights_path}")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise InputError(f"parent folder of --out does not exist: {parent}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out is a file, not a folder: {out}")


def _describe(G, wmeta, weights_path: str, *, n: int, seed: int, truncation: float,
              batch: int) -> dict:
    """The meta.json content of the set (module docstring)."""
    import jax

    from ifadit_jax import weights

    return {
        "format": sources.FFHQ_STAR_FORMAT,
        "n": n,
        "seed": seed,
        "truncation": truncation,
        "noise_mode": "const",
        "batch": batch,
        "platform": jax.default_backend(),
        "resolution": G.resolution,
        "w_dim": G.w_dim,
        "z_dim": G.z_dim,
        "n_latent": G.n_latent,
        "z_rule": Z_RULE,
        "image_rule": IMAGE_RULE,
        "layout": {"images": f"{sources.FFHQ_STAR_IMAGES}/{{i:06d}}.png",
                   "latents": f"{sources.FFHQ_STAR_LATENTS} float32 [n, w_dim]"},
        "generator": {"file": os.path.basename(weights_path),
                      "sha256": weights.sha256_file(weights_path),
                      "source_file": wmeta.source_file,
                      "source_sha256": wmeta.source_sha256,
                      "converter_version": wmeta.converter_version},
    }


def _prepare_folder(out: str, meta: dict, mode: int) -> set[int]:
    """Creates (or tidies) the folder, writes meta.json and latents.npy; returns the indices of
    the images already written."""
    images_dir = os.path.join(out, sources.FFHQ_STAR_IMAGES)
    os.makedirs(images_dir, exist_ok=True)
    for name in os.listdir(out):
        if _TMP.match(name):
            os.unlink(os.path.join(out, name))
    with atomic_path(os.path.join(out, sources.FFHQ_STAR_META)) as tmp:
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, mode)
    _ensure_latents(os.path.join(out, sources.FFHQ_STAR_LATENTS), meta["n"], meta["w_dim"], mode)
    return _done_indices(images_dir, meta["n"])


def _generator_fn(G, seed: int, truncation: float, batch: int):
    """start -> (W [batch, w_dim], uint8 images [batch, res, res, 3]) of images start..start+batch-1."""
    import jax
    import jax.numpy as jnp

    key = jax.random.key(seed)
    z_fn = jax.jit(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (G.z_dim,))))
    to_uint8 = jax.jit(lambda x: jnp.round(jnp.clip((x + 1) / 2, 0, 1) * 255).astype(jnp.uint8))

    def generate(start):
        idx = jnp.arange(start, start + batch, dtype=jnp.uint32)
        w = G.mapping(z_fn(idx), truncation=truncation)
        return w, to_uint8(G.synthesis(w, noise_mode="const"))

    return generate


def _write_batch(out: str, latents, done: set[int], mode: int, pool, start: int, w, imgs) -> int:
    """Writes batch `start`'s latent rows, then its images not yet written; returns how many."""
    n, batch = latents.shape[0], len(w)
    w, imgs = np.asarray(w), np.asarray(imgs)
    need = [i for i in range(start, min(start + batch, n)) if i not in done]
    # Latent rows first: an image on disk always has its latent.
    m = min(batch, n - start)
    latents[start: start + m] = w[:m]
    latents.flush()
    images_dir = os.path.join(out, sources.FFHQ_STAR_IMAGES)
    paths = [os.path.join(images_dir, sources.ffhq_star_image_name(i)) for i in need]
    list(pool.map(_write_png, paths, [imgs[i - start] for i in need], [mode] * len(need)))
    return len(need)


def _generate_missing(out: str, generate, done: set[int], n: int, batch: int, mode: int,
                      progress: bool) -> None:
    from tqdm import tqdm

    latents = np.lib.format.open_memmap(os.path.join(out, sources.FFHQ_STAR_LATENTS), mode="r+")
    todo = [s for s in range(0, n, batch)
            if any(i not in done for i in range(s, min(s + batch, n)))]
    bar = tqdm(total=n, initial=len(done), unit="img", desc="FFHQ*", disable=not progress)
    workers = max(1, min(8, os.cpu_count() or 1))
    try:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            pending = None
            for start in todo:
                result = generate(start)  # dispatched asynchronously; overlaps the writes below
                if pending is not None:
                    bar.update(_write_batch(out, latents, done, mode, pool, *pending))
                pending = (start, *result)
            if pending is not None:
                bar.update(_write_batch(out, latents, done, mode, pool, *pending))
    finally:
        bar.close()


def synthesize(weights_path: str, out: str, n: int, *, truncation: float = 0.7, seed: int = 0,
               batch: int | None = None, progress: bool = True) -> dict:
    """Writes (or completes) the FFHQ* set of `n` images in `out`; returns its meta.json content."""
    from ifadit_jax import weights
    from ifadit_jax.nets import stylegan2

    out = os.fspath(out)
    _check_arguments(weights_path, out, n, truncation=truncation, seed=seed, batch=batch)
    old = _read_existing_meta(out)
    variables, wmeta = weights.read(weights_path, kind="stylegan2")
    G = stylegan2.from_weights(variables, wmeta)
    if batch is None:
        batch = int(old["batch"]) if old else DEFAULT_BATCH
    meta = _describe(G, wmeta, weights_path, n=n, seed=seed, truncation=truncation, batch=batch)
    if old is not None:
        _check_resume(old, meta)
    mode = _file_mode()
    done = _prepare_folder(out, meta, mode)
    _generate_missing(out, _generator_fn(G, seed, truncation, batch), done, n, batch, mode, progress)
    return meta


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    meta = synthesize(args.weights, args.out, args.n, truncation=args.truncation, seed=args.seed,
                      batch=args.batch, progress=not args.quiet)
    print(f"wrote FFHQ* to {args.out}: {meta['n']} images of {meta['resolution']} px with W "
          f"latents [{meta['n']}, {meta['w_dim']}] (seed {meta['seed']}, truncation "
          f"{meta['truncation']})")
    return 0


if __name__ == "__main__":
    # On GPU, XLA picks convolution / matmul algorithms by autotuning in each process, so two runs
    # may differ in the last bits; deterministic ops keep a resumed run identical to an
    # uninterrupted one (read when the backend starts; CPU results are deterministic anyway).
    if "xla_gpu_deterministic_ops" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_gpu_deterministic_ops=true").strip()
    cli.run(main)
