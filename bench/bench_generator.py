"""Benchmark (not a test): StyleGAN2 synthesis throughput at 256 px.

Prints images/s at batch 1 and 4 for the fixture widths and the real config-f widths (random
weights), compile time, peak memory and achieved GFLOP/s from XLA's cost analysis.

  python bench/bench_generator.py [--repeats N] [--batches 1,4] [--widths fixture,real]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import jax
import numpy as np

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


def bench(name: str, cfg: stylegan2.Config, batch: int, repeats: int) -> None:
    G = stylegan2.random_generator(cfg, seed=0)
    ws = jax.random.normal(jax.random.key(1), (batch, cfg.n_latent, cfg.w_dim))
    fn = jax.jit(lambda v, w: G.module.apply(v, w, "const", method="synthesize"))
    t0 = time.perf_counter()
    compiled = fn.lower(G.variables, ws).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    compiled(G.variables, ws).block_until_ready()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        compiled(G.variables, ws).block_until_ready()
        times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    print(f"{name:8s} batch {batch}: {batch / t:8.3f} images/s  ({t * 1e3:8.1f} ms/batch, "
          f"compile {compile_s:5.1f} s, {flops / 1e9:7.1f} GFLOP/batch, "
          f"{flops / t / 1e9:6.1f} GFLOP/s, peak RSS {peak_rss_mib():6.0f} MiB)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--widths", default="fixture,real")
    args = p.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}); "
          f"{os.cpu_count()} CPUs; {platform.processor() or platform.machine()}")
    for name in args.widths.split(","):
        for b in (int(x) for x in args.batches.split(",")):
            bench(name, WIDTHS[name], b, args.repeats)


if __name__ == "__main__":
    main()
