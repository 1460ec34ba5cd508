"""Benchmark (not a test): StyleGAN2 synthesis throughput at 256 px.

Prints, per width and batch: images/s, XLA's cost-analysis FLOPs, FLOP/s and its fraction of the
machine's peak (a 4096^3 float32 matmul measured in this process right before every timed call,
bench/common.py `peak`; the batches take turns, round after round), this process's CPU seconds
per image, the first call's time (compilation and one run) and peak memory. Issue 16 asks for
>= 50% of peak at batch 1 and 4 and images/s non-decreasing from batch 1 to 4 to 8; the last line
of each width gives the per-image rate of each batch over the previous one (batch 4/1, 8/4), as
ratios of fractions of peak (so that the shared machine's load cancels) and of CPU seconds.

FLOPs are counted at batch 1 and scaled by the batch: at larger batches the generator runs its
high-resolution blocks in chunks (`jax.lax.map`, see stylegan2.chunk_size), and XLA's cost
analysis counts a loop body once. A batch-1 call has no such loop, and FLOPs per image do not
depend on the batch.

  python bench/bench_generator.py [--repeats N] [--batches 1,4,8] [--widths fixture,real]
                                  [--precision float32|bfloat16]
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import resource
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import flops, peak

from ifadit_jax.nets import stylegan2

WIDTHS = {
    # The parity fixtures: rosinality channels divided by 8, style dim 64.
    "fixture": stylegan2.Config(resolution=256, z_dim=64, w_dim=64,
                                channels=stylegan2.rosinality_channels(256, 2, 8)),
    # iFADIT's 550000.pt: config-f, channel multiplier 2, style dim 512.
    "real": stylegan2.Config(resolution=256, z_dim=512, w_dim=512,
                             channels=stylegan2.rosinality_channels(256, 2, 1)),
}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0, time.process_time() - c0


def bench_width(name: str, cfg: stylegan2.Config, batches: list[int], repeats: int,
                dtype=jnp.float32) -> tuple[list[float], list[float]]:
    """Prints one line per batch; returns each batch's median fraction of peak and median CPU
    seconds per image (this process's: time the neighbours take is not in it). The batches take
    turns, round after round, each call right after its own peak (bench/common.py `peak`), so a
    neighbour's load that comes and goes falls on every batch alike. `dtype` bfloat16: weights
    and latents cast inside the jitted call (as the pipeline's bfloat16 mode does)."""
    G = stylegan2.random_generator(cfg, seed=0)
    cast = lambda t: jax.tree.map(lambda a: a.astype(dtype), t)
    fn = jax.jit(lambda v, w: G.module.apply(cast(v), cast(w), "const", method="synthesize"))
    ws = {b: jax.random.normal(jax.random.key(1), (b, cfg.n_latent, cfg.w_dim)) for b in batches}
    compile_s = {}
    for b in batches:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(G.variables, ws[b]))
        compile_s[b] = time.perf_counter() - t0  # compilation and one run
    flop_image = flops(fn, G.variables, ws[batches[0]][:1])  # see the module docstring
    runs = {b: [] for b in batches}  # (fraction of peak, wall s, CPU s, peak FLOP/s)
    for _ in range(repeats):
        for b in batches:
            p = peak(repeats=2)
            wall, cpu = timed(fn, G.variables, ws[b])
            runs[b].append((flop_image * b / wall / p, wall, cpu, p))
    fracs, cpus = [], []
    for b in batches:
        frac, wall, cpu, p = sorted(runs[b])[(repeats - 1) // 2]  # the median call, its own peak
        cpu_image = sorted(r[2] for r in runs[b])[(repeats - 1) // 2] / b
        print(f"{name:8s} batch {b}: {b / wall:8.3f} images/s  ({wall * 1e3:8.1f} ms/batch, "
              f"{flop_image / 1e9:6.1f} GFLOP/image, {flop_image * b / wall / 1e9:6.1f} GFLOP/s = "
              f"{frac:6.1%} of peak {p / 1e9:.0f} GFLOP/s; median CPU {cpu_image:.3f} s/image; "
              f"first call {compile_s[b]:5.1f} s, peak RSS {peak_rss_mib():6.0f} MiB)", flush=True)
        fracs.append(frac)
        cpus.append(cpu_image)
    return fracs, cpus


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--widths", default="fixture,real")
    p.add_argument("--precision", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype; fractions stay of the float32 peak")
    args = p.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}); "
          f"{os.cpu_count()} CPUs; {platform.processor() or platform.machine()}")
    batches = [int(b) for b in args.batches.split(",")]
    for name in args.widths.split(","):
        fracs, cpus = bench_width(name, WIDTHS[name], batches, args.repeats,
                                  jnp.dtype(args.precision))
        # FLOPs per image do not depend on the batch, so the ratio of two fractions of peak is
        # the ratio of their images/s per image (each at the peak of its moment); the ratio of
        # CPU seconds per image says the same without counting the time the neighbours take.
        pairs = list(itertools.pairwise(zip(batches, fracs, cpus)))
        by_peak = [f"{b}/{a} {fb / fa:.3f}x" for (a, fa, _), (b, fb, _) in pairs]
        by_cpu = [f"{b}/{a} {ca / cb:.3f}x" for (a, _, ca), (b, _, cb) in pairs]
        falls = any(fb < fa * 0.95 for (_, fa, _), (_, fb, _) in pairs)
        print(f"{name:8s} per-image rate, batch over batch: {', '.join(by_peak)} (fractions of "
              f"peak), {', '.join(by_cpu)} (CPU s/image) -> "
              f"{'falls' if falls else 'holds (none below 0.95x)'}", flush=True)


if __name__ == "__main__":
    main()
