"""Benchmark (not a test): SIF throughput and KeyGen cost.

Prints forward+inverse round trips (vectors/s) of both SIF variants at the official sizes
(512-d, 4 blocks, subnet widths 256-128-128-256) with random weights, one key per batch (as the
official test.py) and one key per vector, and the Argon2id cost per key derivation. Flow lines
give the cost-analysis FLOP/s as a fraction of the machine's measured peak (bench/common.py).

  python bench/bench_flow.py [--batches 1,64,4096] [--repeats N] [--kdf-repeats N]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import numpy as np
from common import flops, peak  # bench/common.py

from ifadit_jax import flow, keys


@jax.jit
def _round_trip(params, z, k):
    y, _ = flow.sif_forward(params, z, k)
    return flow.sif_inverse(params, y, k)[0]


def bench_flow(variant: str, batch: int, per_vector_keys: bool, repeats: int) -> None:
    params = flow.init_sif(jax.random.key(0), flow.SifConfig(variant=variant))
    z = jax.random.normal(jax.random.key(1), (batch, 512))
    k = jax.random.normal(jax.random.key(2), (batch, 512) if per_vector_keys else (512,))
    t0 = time.perf_counter()
    compiled = _round_trip.lower(params, z, k).compile()
    compile_s = time.perf_counter() - t0
    flop = flops(_round_trip, params, z, k)
    p = peak()
    compiled(params, z, k).block_until_ready()
    n = max(1, min(repeats, int(2e5 // batch)))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        compiled(params, z, k).block_until_ready()
        times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    keys_txt = "key per vector" if per_vector_keys else "one key      "
    print(f"{variant:8s} batch {batch:5d}, {keys_txt}: {batch / t:10.0f} vectors/s forward+inverse "
          f"({t * 1e3:8.3f} ms/batch, compile {compile_s:4.1f} s; {flop / t / 1e9:7.2f} GFLOP/s = "
          f"{flop / t / p:6.2%} of peak {p / 1e9:.0f} GFLOP/s)")


def bench_kdf(repeats: int) -> None:
    for name, kdf in (("default", keys.KdfParams()),
                      ("cheap (tests only)", keys.KdfParams(memory_cost=8, iterations=1, lanes=1))):
        keys.kdf_bytes(b"warm-up", kdf)
        times = []
        for i in range(repeats):
            t0 = time.perf_counter()
            keys.kdf_bytes(f"benchmark secret {i}".encode(), kdf)
            times.append(time.perf_counter() - t0)
        print(f"Argon2id {name:18s} (m={kdf.memory_cost} KiB, t={kdf.iterations}, p={kdf.lanes}): "
              f"{np.median(times) * 1e3:8.3f} ms per derivation (min {min(times) * 1e3:.3f}, "
              f"max {max(times) * 1e3:.3f})")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,64,4096")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--kdf-repeats", type=int, default=10)
    args = p.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}")
    for variant in flow.VARIANTS:
        for batch in (int(b) for b in args.batches.split(",")):
            for per_vector in (False, True):
                if batch == 1 and per_vector:
                    continue
                bench_flow(variant, batch, per_vector, args.repeats)
    bench_kdf(args.kdf_repeats)


if __name__ == "__main__":
    main()
