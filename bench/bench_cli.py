"""Benchmark (not a test): the anonymize command line end to end, as a user runs it.

Every run is a fresh `python -m ifadit_jax.anonymize` process on a folder, with random weights
written as a weights folder at the chosen widths (MTCNN from the test fixtures: it has one size):

* aligned: N aligned 256x256 faces (`--aligned`), images/s end to end and the share of time the
  networks are busy (time inside the network calls / wall time of the run, from `--verbose`);
* photos: M photos with one face each (detection, alignment, paste-back), the same figures;
* first output: one photo, cold (an empty compilation cache folder) and warm (a second process
  with the same cache), as process wall time.

Each folder run is preceded by a warm-up run on a copy of its first batch, so the timed run reads
its programs from the persistent cache instead of compiling them. Every run logs its compilations
(`jax_log_compiles`, `jax_explain_cache_misses`): the bench prints how many programs a process
compiled, whether the networks missed the persistent cache, and any program compiled twice with
the same shapes (none expected: the folder pads its last batch to one shape). The machine's peak
is a large float32 matmul in this process; the networks' share of it is in
bench/bench_pipeline.py.

  python bench/bench_cli.py [--widths small|real] [--aligned 64] [--photos 16] [--batch 4]
                            [--cpu-devices N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ifadit_jax import align, demo, random_nets, roles, weights, weights_folder  # noqa: E402

SECRET = "bench secret"
FAST_KDF = ["--kdf-memory-kib", "64", "--kdf-iterations", "1"]  # the KDF is not what is measured
BUSY = re.compile(r"networks: (\d+) calls of (\d+) images on (\d+) device\(s\), busy ([\d.]+) s of ([\d.]+) s")
COMPILING = re.compile(r"Compiling (\S+) with global shapes and types (.*?)\. Argument mapping")
CACHE_MISS = re.compile(r"PERSISTENT COMPILATION CACHE MISS for '(\S+)'")


def peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """float32 matmul throughput of this machine (the reference every figure is a fraction of)."""
    a = jax.random.normal(jax.random.key(0), (n, n), np.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats):
        f(a).block_until_ready()
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e9


def write_weights(out: str, widths: str) -> None:
    """Random networks at `widths` as a weights folder, plus the fixture MTCNN."""
    configs = random_nets.WIDTH_PRESETS[widths]
    pipe = random_nets.random_pipeline(0, configs=configs)
    networks = {}
    for role, r in roles.ROLES.items():
        config = random_nets.role_config(role, configs, pipe.conventions)
        variables = pipe.nets.file_variables(role)
        networks[role] = (r.file, variables, weights.Meta(kind=r.kind, config=config))
    weights_folder.write(out, networks, pipe.conventions.name)
    subprocess.run([sys.executable, os.path.join(ROOT, "ports", "convert_mtcnn.py"),
                    os.path.join(ROOT, "tests", "fixtures", "mtcnn_weights"),
                    os.path.join(out, "mtcnn.safetensors")], check=True, capture_output=True)


def write_inputs(root: str, aligned: int, photos: int) -> tuple[str, str]:
    """`aligned` crops of the astronaut (landmarks jittered by up to 2 px, so no two are equal)
    and `photos` copies of the photo shifted and mirrored -> (aligned folder, photo folder)."""
    gen = np.random.default_rng(0)
    photo = demo.astronaut()
    a_dir, p_dir = os.path.join(root, "aligned"), os.path.join(root, "photos")
    os.makedirs(a_dir)
    os.makedirs(p_dir)
    for i in range(aligned):
        lm = demo.ASTRONAUT_LANDMARKS + gen.uniform(-2, 2, (5, 2))
        crop = align.warp_to_crop(photo, align.crop_transform(lm, 256), 256)
        Image.fromarray((np.clip(crop, 0, 1) * 255).round().astype(np.uint8)).save(
            os.path.join(a_dir, f"{i:03d}.png"))
    for i in range(photos):
        shifted = np.roll(photo, (8 * i, -6 * i), axis=(0, 1))
        img = shifted[:, ::-1] if i % 2 else shifted
        Image.fromarray((img * 255).round().astype(np.uint8)).save(os.path.join(p_dir, f"{i:03d}.png"))
    return a_dir, p_dir


def first_items(src: str, n: int, dst: str) -> str:
    os.makedirs(dst)
    for name in sorted(os.listdir(src))[:n]:
        shutil.copy(os.path.join(src, name), dst)
    return dst


def run_cli(args: list[str], cache: str, devices: int) -> tuple[float, str]:
    """One anonymize process -> (wall seconds, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(IFADIT_JAX_CACHE_DIR=cache, JAX_LOG_COMPILES="1", JAX_EXPLAIN_CACHE_MISSES="1",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    if devices > 1:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ifadit_jax.anonymize", *args, "--verbose"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(args[:2])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, proc.stderr


def compiles(stderr: str) -> str:
    """What one process compiled: the number of programs, the persistent-cache misses of the big
    ones, and any program compiled twice with the same argument shapes (a real recompile)."""
    seen = collections.Counter(COMPILING.findall(stderr))
    names = collections.Counter(name for name, _ in seen.elements())
    twice = [f"{name} x{n}" for (name, _), n in seen.items() if n > 1]
    misses = sorted({m for m in CACHE_MISS.findall(stderr) if m in ("jit_anonymize", "jit_recover")})
    common = ", ".join(f"{name} x{n}" for name, n in names.most_common(3))
    return (f"{sum(seen.values())} programs compiled (most: {common}); persistent-cache misses of "
            f"the networks: {', '.join(misses) or 'none'}; same shapes compiled twice: "
            f"{', '.join(twice) or 'none'}")


def folder_run(name: str, src: str, n: int, common: list[str], work: str, args) -> None:
    cache = os.path.join(work, "cache")
    warm = first_items(src, args.batch, os.path.join(work, f"{name}-warm-in"))
    run_cli([warm, os.path.join(work, f"{name}-warm-out"), *common], cache, args.cpu_devices)
    wall, err = run_cli([src, os.path.join(work, f"{name}-out"), *common], cache, args.cpu_devices)
    m = BUSY.search(err)
    if not m:
        sys.exit(f"error: no timing line from the {name} run:\n{err[-2000:]}")
    calls, batch, devices, busy, run_s = int(m[1]), int(m[2]), int(m[3]), float(m[4]), float(m[5])
    print(f"{name:8s} {n:3d} images: {n / run_s:7.2f} images/s in the run ({run_s:.1f} s), "
          f"{n / wall:7.2f} images/s with start-up ({wall:.1f} s); networks busy {busy / run_s:4.0%} "
          f"({calls} calls of {batch} on {devices} device(s))\n  {compiles(err)}", flush=True)


def first_output(photo_dir: str, common: list[str], work: str, args) -> None:
    one = first_items(photo_dir, 1, os.path.join(work, "one"))
    cache = os.path.join(work, "fresh-cache")
    times = []
    for i in range(2):  # cold: the cache folder is empty; warm: the same folder again
        wall, err = run_cli([one, os.path.join(work, f"one-out{i}"), *common], cache, args.cpu_devices)
        times.append(wall)
        print(f"  {'cold' if i == 0 else 'warm'}: {compiles(err)}")
    print(f"first output, one photo: {times[0]:.1f} s cold (empty compilation cache), "
          f"{times[1]:.1f} s warm (same cache, second process)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", choices=("small", "real"), default="small")
    p.add_argument("--aligned", type=int, default=64, help="aligned faces (default 64)")
    p.add_argument("--photos", type=int, default=16, help="photos with detection (default 16)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--cpu-devices", type=int, default=1,
                   help="fake CPU devices for the runs (XLA_FLAGS), to exercise the mesh")
    p.add_argument("--keep", help="work in this new folder and keep it (default: a temporary one)")
    args = p.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; widths {args.widths}, batch "
          f"{args.batch}; peak float32 matmul {peak_gflops():.0f} GFLOP/s", flush=True)
    work = args.keep or tempfile.mkdtemp(prefix="bench-cli-")
    if args.keep:
        os.makedirs(work)
    try:
        weights_dir = os.path.join(work, "weights")
        write_weights(weights_dir, args.widths)
        with open(os.path.join(work, "secret.txt"), "w") as f:
            f.write(SECRET)
        common = ["--weights", weights_dir, "--secret-file", os.path.join(work, "secret.txt"),
                  "--batch", str(args.batch), *FAST_KDF]
        a_dir, p_dir = write_inputs(work, args.aligned, max(args.photos, 1))
        if args.aligned:
            folder_run("aligned", a_dir, args.aligned, [*common, "--aligned"], work, args)
        if args.photos:
            folder_run("photos", p_dir, args.photos, common, work, args)
        first_output(p_dir, common, work, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
