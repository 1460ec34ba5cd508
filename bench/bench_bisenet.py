"""Throughput of the BiSeNet face parser and the iFADIT mask + blend, random weights.

Usage: python bench/bench_bisenet.py [--batch 4] [--iters 3] [--widths fixture|real|both]
Prints images/s (batch 4 by default) on the default JAX device (CPU unless a GPU is present).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from ifadit_jax import refine
from ifadit_jax.nets import bisenet

FIXTURE_CONFIG = {"n_classes": 19, "stem_width": 8, "layer_widths": [8, 16, 32, 64],
                  "layer_blocks": [2, 2, 2, 2], "context_width": 16, "fusion_width": 32,
                  "fusion_attention_width": 8, "head_widths": [32, 8, 8]}


def _rate(fn, args, batch: int, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    t0 = time.perf_counter()
    for _ in range(iters):
        jax.block_until_ready(fn(*args))
    return batch * iters / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--widths", choices=["fixture", "real", "both"], default="both")
    args = ap.parse_args()
    b = args.batch
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), batch {b}")
    rng = np.random.default_rng(0)
    images256 = jnp.asarray(rng.random((b, 256, 256, 3), np.float32))
    configs = {"fixture": FIXTURE_CONFIG, "real": bisenet.DEFAULT_CONFIG}
    names = ["fixture", "real"] if args.widths == "both" else [args.widths]
    for name in names:
        module = bisenet.module_from_config(configs[name])
        x = bisenet.preprocess(images256)
        variables = module.init(jax.random.key(0), x[:1])
        net = bisenet.LoadedBiSeNet(configs[name], variables)
        full = jax.jit(lambda v, x: net.module.apply(v, x))
        r = _rate(full, (net.variables, x), b, args.iters)
        print(f"parser ({name} widths), 512x512, 3 heads upsampled: {r:8.2f} images/s")
        r = _rate(net.lowres, (x,), b, args.iters)
        print(f"parser ({name} widths), 512x512, heads before upsampling: {r:8.2f} images/s")
        r = _rate(lambda im: refine.face_mask_from_images(net, im), (images256,), b, args.iters)
        print(f"face_mask_from_images ({name} widths), 256 -> 512 -> 256 soft mask: {r:8.2f} images/s")
    fg = jnp.asarray(rng.random((b, 256, 256, 3), np.float32))
    masks = jnp.asarray((rng.random((b, 256, 256, 1)) > 0.5).astype(np.float32))
    r = _rate(jax.jit(refine.soften_and_blend), (fg, images256, masks), b, args.iters * 10)
    print(f"soften_and_blend (dilate 5x5 + blur 15x15 + blend), 256x256: {r:8.2f} images/s")


if __name__ == "__main__":
    main()
