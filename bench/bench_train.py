"""Training throughput: steps/s and images/s of the real train step, per phase and width.

    python bench/bench_train.py                       # tiny (smoke) and real widths, both phases
    python bench/bench_train.py --widths real --batch 8 --precision bfloat16 --steps 10   # GPU

For every (phase, widths) the smoke config is set up with random networks at those widths
(`nets.widths`: "tiny" = the smoke/test networks, "real" = the official widths; random loss
networks, AlexNet-wide at real widths) on synthetic 256 px images; the pmapped step of
`ifadit_jax.train` is compiled and run once (reported as "first"), then `--steps` steps are
timed with the result blocked on. Data loading is excluded: batches are made in advance. The
flow always runs in float32 at HIGHEST precision; `--precision` sets the rest's matmul/conv
precision ("bfloat16" on GPUs).

On the development machine's 2 shared CPU cores (see README "Training") the default run takes
about 6 minutes, mostly compiling the real-width steps; --widths tiny takes about one.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import tempfile
import time

import jax
import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ifadit_jax import train

sys.path.insert(0, os.path.join(ROOT, "bench"))
from common import flops, peak


def config(phase: int, widths: str, batch: int, data: str, precision: str):
    spec = importlib.util.spec_from_file_location(f"phase{phase}", os.path.join(ROOT, "configs", f"phase{phase}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("smoke")
    c.nets.widths = widths
    c.data.path = data
    c.data.batch_size = batch
    c.matmul_precision = precision
    return c


def synthetic_faces(folder: str, n: int) -> str:
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(
            os.path.join(folder, f"{i}.png"))
    return folder


def bench(phase: int, widths: str, batch: int, steps: int, precision: str, tmp: str) -> dict:
    data = synthetic_faces(tempfile.mkdtemp(dir=tmp), max(batch, 4))
    c = config(phase, widths, batch, data, precision)
    run = train.setup(c, tempfile.mkdtemp(dir=tmp))
    batches = [run.batch() for _ in range(2)]
    ctx = (jax.default_matmul_precision(precision) if precision != "default"
           else contextlib.nullcontext())
    with ctx:
        step_args = (run.state, run.frozen, run.loss_nets, batches[0])
        try:  # summed over devices by pmap's cost analysis
            flop = flops(run.p_step, *step_args)
        except (RuntimeError, NotImplementedError, AttributeError):  # no cost analysis here
            flop = float("nan")
        p_flops = peak()
        t0 = time.perf_counter()
        run.state, metrics, _ = run.p_step(run.state, run.frozen, run.loss_nets, batches[0])
        jax.block_until_ready(metrics)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(steps):
            run.state, metrics, _ = run.p_step(run.state, run.frozen, run.loss_nets, batches[i % 2])
        jax.block_until_ready((run.state, metrics))
        elapsed = time.perf_counter() - t0
    run.ckpts.close()
    loss = float(np.asarray(metrics["loss"])[0])
    return {"phase": phase, "widths": widths, "batch": batch, "first_s": first,
            "steps_per_s": steps / elapsed, "images_per_s": steps * batch / elapsed,
            "of_peak": flop * steps / elapsed / p_flops,
            "loss_finite": bool(np.isfinite(loss))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="tiny,real", help="comma-separated: tiny, small, real")
    p.add_argument("--phases", default="1,2")
    p.add_argument("--batch", type=int, default=2,
                   help="global batch (paper: 4; phase II at real widths and batch 4 needs about "
                        "20 GB of host memory on a CPU)")
    p.add_argument("--steps", type=int, default=2, help="timed steps after the first")
    p.add_argument("--precision", default="default",
                   choices=("default", "float32", "tensorfloat32", "bfloat16"))
    args = p.parse_args()
    devices = jax.local_devices()
    print(f"devices: {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), "
          f"precision {args.precision}, batch {args.batch}")
    print(f"{'phase':>5} {'widths':>6} {'batch':>5} {'first step s':>12} {'steps/s':>8} {'images/s':>9} "
          f"{'of peak':>8}  (peak: a float32 4096^3 matmul just before)")
    with tempfile.TemporaryDirectory() as tmp:
        for widths in args.widths.split(","):
            for phase in (int(x) for x in args.phases.split(",")):
                r = bench(phase, widths, args.batch, args.steps, args.precision, tmp)
                flag = "" if r["loss_finite"] else "  (non-finite loss)"
                print(f"{r['phase']:>5} {r['widths']:>6} {r['batch']:>5} {r['first_s']:>12.1f} "
                      f"{r['steps_per_s']:>8.3f} {r['images_per_s']:>9.2f} {r['of_peak']:>8.1%}{flag}",
                      flush=True)


if __name__ == "__main__":
    main()
