"""What several benchmarks share: random weights of a module's shapes, and a timing loop."""

from __future__ import annotations

import time

import jax

from ifadit_jax import random_nets


def random_variables(module, *example, seed: int = 0) -> dict:
    """Random weights for `module` at the shapes its init gives for `example` (speed does not
    depend on their values; `random_nets.random_like` keeps activations in range)."""
    return random_nets.random_like(jax.eval_shape(module.init, jax.random.key(0), *example), seed)


def time_it(fn, iters: int, *args) -> tuple[float, float]:
    """(seconds of the first call, i.e. compilation and one run; mean seconds per later call)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(iters):
        jax.block_until_ready(fn(*args))
    return compile_s, (time.perf_counter() - t0) / iters


def report(name: str, batch: int, compile_s: float, step_s: float) -> None:
    print(f"{name:46s} {batch / step_s:9.1f} images/s   ({step_s * 1e3:8.1f} ms/batch, "
          f"first call {compile_s:5.1f} s)", flush=True)
