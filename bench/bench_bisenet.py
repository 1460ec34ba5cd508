"""Throughput of the BiSeNet face parser and the iFADIT mask + blend, random weights.

Usage: python bench/bench_bisenet.py [--batch 4] [--iters 3] [--widths fixture|real|both]
Prints images/s (batch 4 by default) on the default JAX device (CPU unless a GPU is present),
with cost-analysis FLOPs and the fraction of the machine's measured peak (bench/common.py).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from common import measure  # bench/common.py

from ifadit_jax import refine
from ifadit_jax.nets import bisenet

FIXTURE_CONFIG = {"n_classes": 19, "stem_width": 8, "layer_widths": [8, 16, 32, 64],
                  "layer_blocks": [2, 2, 2, 2], "context_width": 16, "fusion_width": 32,
                  "fusion_attention_width": 8, "head_widths": [32, 8, 8]}


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
        measure(f"parser ({name}), 512px, 3 heads upsampled", lambda v, x, net=net: net.module.apply(v, x),
                b, args.iters, net.variables, x)
        measure(f"parser ({name}), 512px, heads before upsampling",
                lambda v, x, net=net: net.module.apply(v, x, upsample=False), b, args.iters,
                net.variables, x)
        measure(f"face mask ({name}), 256 -> 512 -> 256 soft mask",
                lambda v, im, net=net: refine.face_mask_from_parser(net.module, v, im), b, args.iters,
                net.variables, images256)
    fg = jnp.asarray(rng.random((b, 256, 256, 3), np.float32))
    masks = jnp.asarray((rng.random((b, 256, 256, 1)) > 0.5).astype(np.float32))
    measure("soften_and_blend (dilate, blur, blend), 256px", refine.soften_and_blend, b,
            args.iters * 10, fg, images256, masks)


if __name__ == "__main__":
    main()
