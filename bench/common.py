"""What several benchmarks share: random weights of a module's shapes, a timing loop, the
machine's measured peak, and XLA's FLOP count of a compiled function.

Every bench that prints a throughput measures `peak()` in its own process first and prints each
figure as a fraction of it: the development machine is shared, so an absolute figure says more
about the neighbours than about the code, while a fraction of a peak measured a moment earlier in
the same process mostly cancels them out.
"""

from __future__ import annotations

import math
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from ifadit_jax import random_nets


def random_variables(module, *example, seed: int = 0) -> dict:
    """Random weights for `module` at the shapes its init gives for `example` (speed does not
    depend on their values; `random_nets.random_like` keeps activations in range)."""
    return random_nets.random_like(jax.eval_shape(module.init, jax.random.key(0), *example), seed)


def time_it(fn, iters: int, *args) -> tuple[float, float]:
    """(seconds of the first call, i.e. compilation and one run; median seconds per later call)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, float(np.median(times))


_PEAK_FN = jax.jit(lambda a, b: a @ b)


def peak(n: int = 4096, repeats: int = 3, dtype=jnp.float32) -> float:
    """The machine's measured matmul FLOP/s right now: best of `repeats` n x n x n products.

    Best, not median: the peak is what the cores can do when the neighbours let them, and the
    figures it divides are themselves medians, so their fractions err low, never high.
    """
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    jax.block_until_ready(_PEAK_FN(a, a))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(_PEAK_FN(a, a))
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def time_against_peak(fn, repeats: int, *args) -> tuple[float, float]:
    """(seconds, peak FLOP/s) of the timed call whose fraction of peak is the median, with a peak
    (best of 2) measured right before every one of `repeats` timed calls, after one warm-up call.
    Pairing each call with its own peak divides like by like while a neighbour's load comes and
    goes; a peak measured once is as noisy as the figure itself on a shared machine."""
    jax.block_until_ready(fn(*args))
    times, peaks = [], []
    for _ in range(repeats):
        peaks.append(peak(repeats=2))
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    fracs = sorted(range(repeats), key=lambda i: 1.0 / (times[i] * peaks[i]))
    mid = fracs[(repeats - 1) // 2]  # the call of median fraction, with its own peak
    return times[mid], peaks[mid]


def flops(fn, *args, **kwargs) -> float:
    """FLOPs of one call of `fn(*args)` from XLA's cost analysis of its compiled form
    (NaN where the backend gives none).

    XLA counts a loop body once, whatever its trip count: for a function with a loop inside
    (`jax.lax.map`, e.g. StyleGAN2's chunked blocks at batches above their chunk size) the figure
    is too low, so this warns; count such a function at a loop-free size (the generator at
    batch 1) and scale."""
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    compiled = jitted.lower(*args, **kwargs).compile()
    if " while(" in compiled.as_text():
        warnings.warn("XLA's cost analysis counts this function's loop bodies once: its FLOPs "
                      "are undercounted", stacklevel=2)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def report(name: str, batch: int, compile_s: float, step_s: float, flop: float = float("nan"),
           peak_flops: float | None = None, unit: str = "images") -> None:
    """One line: images/s, ms/batch, compile seconds, and, with `flop` (per batch) and
    `peak_flops` (measured just before), GFLOP/s and its fraction of the peak."""
    line = (f"{name:46s} {batch / step_s:9.2f} {unit}/s   ({step_s * 1e3:8.1f} ms/batch, "
            f"compile {compile_s:5.1f} s)")
    if not math.isnan(flop):
        rate = flop / step_s
        line += f"  {flop / batch / 1e9:6.3f} GFLOP each  {rate / 1e9:6.1f} GFLOP/s"
        if peak_flops:
            line += f"  {rate / peak_flops:5.1%} of peak ({peak_flops / 1e9:.0f} GFLOP/s)"
    print(line, flush=True)


def measure(name: str, fn, batch: int, iters: int, *args, unit: str = "images") -> float:
    """Times jitted `fn(*args)` against the peak (`time_against_peak`, `iters` calls) and prints `report`'s line with cost-analysis FLOPs; returns seconds/call."""
    fn = fn if hasattr(fn, "lower") else jax.jit(fn)
    t0 = time.perf_counter()
    flop = flops(fn, *args)  # compiles; the jit's own first call then reuses the executable
    compile_s = time.perf_counter() - t0
    step_s, p = time_against_peak(fn, iters, *args)
    report(name, batch, compile_s, step_s, flop, p, unit=unit)
    return step_s
