"""Benchmark (not a test): anonymize + recover throughput, with milliseconds per stage.

Random weights at the fixtures' small widths and at the official full widths; CPU or whatever
JAX runs on. Stages are timed as separately jitted pure functions of the same `Nets`.

  python bench/bench_pipeline.py [--widths small,real] [--batches 1,8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from ifadit_jax import pipeline, random_nets


def timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench(name: str, configs: dict, batch: int, repeats: int) -> None:
    pipe = random_nets.random_pipeline(0, configs=configs)
    nets = pipe.nets
    x = jax.random.uniform(jax.random.key(1), (batch, 256, 256, 3))
    k = pipe.key_from_vector(jnp.full((1, 512), 0.75))[0]
    z = pipeline.identity(nets, x)
    attr = pipeline.attributes(nets, x)
    stages = {
        "E_ID": (jax.jit(pipeline.identity), (nets, x)),
        "E_Attr": (jax.jit(pipeline.attributes), (nets, x)),
        "T": (jax.jit(lambda n, z, k: n.apply("flow", z, k)), (nets, z, k)),
        "M+G": (jax.jit(pipeline.render), (nets, z, attr)),
        "mask": (jax.jit(pipeline.face_mask), (nets, x)),
    }
    ms = {s: 1e3 * timed(fn, *args, repeats=repeats) for s, (fn, args) in stages.items()}
    both = jax.jit(lambda n, x, k: pipeline.recover(n, pipeline.anonymize(n, x, k)[0], k)[0])
    t = timed(both, nets, x, k, repeats=repeats)
    per_stage = ", ".join(f"{s} {v:.0f}" for s, v in ms.items())
    print(f"{name:5s} batch {batch}: {batch / t:7.3f} images/s anonymize+recover "
          f"({t * 1e3:.0f} ms/batch; per pass, ms/batch: {per_stage})")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", default="small,real")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    configs = {"small": random_nets.SMALL_CONFIGS, "real": random_nets.REAL_CONFIGS}
    for name in args.widths.split(","):
        for b in (int(v) for v in args.batches.split(",")):
            bench(name, configs[name], b, args.repeats)


if __name__ == "__main__":
    main()
