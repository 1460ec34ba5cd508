"""Benchmark (not a test): anonymize + recover throughput, and per stage its FLOPs (XLA's cost
analysis), time, FLOP/s and fraction of the machine's peak measured just before it.

Random weights at the fixtures' small widths and at the official full widths; CPU or whatever
JAX runs on. Stages are timed as separately jitted pure functions of the same `Nets`; the peak
(a 4096^3 float32 matmul) is re-measured right before every timed call and each figure is the
call of median fraction (bench/common.py `time_against_peak`), so a neighbour's load on a shared
machine lowers both and mostly cancels out of the fraction.

  python bench/bench_pipeline.py [--widths small,real] [--batches 1,4] [--repeats 3]
                                 [--precision float32|bfloat16]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import flops, time_against_peak

from ifadit_jax import flow as flow_lib
from ifadit_jax import pipeline, random_nets


def stage_line(name: str, batch: int, fn, args, args_one, repeats: int) -> float:
    """Times one stage and prints its line; returns seconds per batch. FLOPs are counted on
    `args_one` (batch 1) and scaled: XLA counts a loop body once, and StyleGAN2 runs its
    high-resolution blocks as a loop over chunks of a larger batch on a CPU."""
    fn = jax.jit(fn)
    flop = flops(fn, *args_one) * batch
    t, p = time_against_peak(fn, repeats, *args)
    rate = flop / t
    print(f"  {name:18s} {flop / batch / 1e9:7.2f} GFLOP/image {t * 1e3:9.1f} ms/batch "
          f"{rate / 1e9:7.1f} GFLOP/s  {rate / p:6.1%} of peak ({p / 1e9:.0f} GFLOP/s)", flush=True)
    return t


def _flow_forward(nets, z, k):
    if hasattr(nets, "apply"):  # Nets keyed by role: the flow is one of them
        return nets.apply("flow", z, k)
    return flow_lib.sif_forward(nets.flow, z, k)


def bench(name: str, configs: dict, batch: int, repeats: int, precision: str) -> None:
    pipe = random_nets.random_pipeline(0, configs=configs)
    nets = pipe.nets
    if precision != "float32":
        if not hasattr(nets, "with_precision"):
            raise SystemExit(f"error: this checkout's pipeline has no {precision} mode")
        nets = nets.with_precision(precision)
    x = jax.random.uniform(jax.random.key(1), (batch, 256, 256, 3))
    k = pipe.key_from_vector(jnp.full((1, 512), 0.75))[0]
    print(f"{name} widths, batch {batch}, {precision} (fractions of the float32 peak):", flush=True)
    both = lambda n, x, k: pipeline.recover(n, pipeline.anonymize(n, x, k)[0], k)[0]
    stages = {
        "E_ID": lambda x: (pipeline.identity, (nets, x)),
        "E_Attr": lambda x: (pipeline.attributes, (nets, x)),
        "T": lambda x: (_flow_forward, (nets, pipeline.identity(nets, x), k)),
        "M+G": lambda x: (pipeline.render, (nets, pipeline.identity(nets, x),
                                            pipeline.attributes(nets, x))),
        "parser (mask)": lambda x: (pipeline.face_mask, (nets, x)),
        "anonymize+recover": lambda x: (both, (nets, x, k)),
    }
    for stage, make in stages.items():
        fn, args = make(x)
        t = stage_line(stage, batch, fn, args, make(x[:1])[1], repeats)
    print(f"  anonymize+recover: {batch / t:.3f} images/s at batch {batch}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", default="small,real")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", default="float32", choices=("float32", "bfloat16"))
    args = p.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind})")
    configs = {"small": random_nets.SMALL_CONFIGS, "real": random_nets.REAL_CONFIGS}
    for name in args.widths.split(","):
        for b in (int(v) for v in args.batches.split(",")):
            bench(name, configs[name], b, args.repeats, args.precision)


if __name__ == "__main__":
    main()
