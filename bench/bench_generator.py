"""Benchmark (not a test): StyleGAN2 synthesis throughput at 256 px.

Prints, per width and batch: images/s, XLA's cost-analysis FLOPs, FLOP/s and its fraction of the
machine's peak (a 4096^3 float32 matmul measured in this process right before every timed call,
bench/common.py `time_against_peak`), compile time and peak memory. Issue 16 asks for >= 50% of peak at batch 1 and 4 and
images/s non-decreasing from batch 1 to 4 to 8; the last line says whether the per-image rate
held up, in fractions of peak so that the shared machine's load cancels.

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

from common import flops, time_against_peak

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


def bench(name: str, cfg: stylegan2.Config, batch: int, repeats: int,
          dtype=jnp.float32) -> float:
    """Prints one line; returns the fraction of peak reached. `dtype` bfloat16: weights and
    latents cast inside the jitted call (as the pipeline's bfloat16 mode does), float32 stored."""
    G = stylegan2.random_generator(cfg, seed=0)
    ws = jax.random.normal(jax.random.key(1), (batch, cfg.n_latent, cfg.w_dim))
    cast = lambda t: jax.tree.map(lambda a: a.astype(dtype), t)
    fn = jax.jit(lambda v, w: G.module.apply(cast(v), cast(w), "const", method="synthesize"))
    t0 = time.perf_counter()
    flop = flops(fn, G.variables, ws)
    compile_s = time.perf_counter() - t0
    t, p = time_against_peak(fn, repeats, G.variables, ws)
    frac = flop / t / p
    print(f"{name:8s} batch {batch}: {batch / t:8.3f} images/s  ({t * 1e3:8.1f} ms/batch, "
          f"{flop / batch / 1e9:6.1f} GFLOP/image, {flop / t / 1e9:6.1f} GFLOP/s = {frac:6.1%} "
          f"of peak {p / 1e9:.0f} GFLOP/s; compile {compile_s:5.1f} s, peak RSS "
          f"{peak_rss_mib():6.0f} MiB)", flush=True)
    return frac


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
    for name in args.widths.split(","):
        fracs = [bench(name, WIDTHS[name], int(b), args.repeats, jnp.dtype(args.precision))
                 for b in args.batches.split(",")]
        # FLOPs per image do not depend on the batch, so a fraction of peak that does not fall
        # means images/s per image that does not fall (at the peak of the moment).
        falls = any(b < a * 0.95 for a, b in itertools.pairwise(fracs))
        print(f"{name:8s} per-image rate over batches {args.batches}: "
              f"{'falls' if falls else 'holds (within 5%)'}", flush=True)


if __name__ == "__main__":
    main()
