"""Throughput of E_ID (ArcFace IR-SE50) and E_Attr (pSp GradualStyleEncoder), random weights.

Prints images/s, cost-analysis FLOPs and the fraction of the machine's measured peak
(bench/common.py) at batch 4 (default) for: ArcFace on 112x112 crops, ArcFace's 256x256 identity
path (crop + adaptive pool + network), and the pSp encoder on 256x256 images; each at the test
fixtures' reduced widths and at the official widths. Weights are random (drawn from the shapes,
no checkpoint needed): speed does not depend on their values.

Usage: python bench/bench_encoders.py [--batch 4] [--iters 5] [--only fixture|official]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from common import measure, random_variables  # bench/common.py

from ifadit_jax.nets import arcface, psp

ARCFACE = {"fixture": (16, 24, 28, 32), "official": (64, 128, 256, 512)}
# (stage widths, style conv width, w_dim); 14 styles at 256 px.
PSP = {"fixture": ((16, 32, 48, 64), 64, 64), "official": ((64, 128, 256, 512), 512, 512)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--only", choices=["fixture", "official"])
    args = parser.parse_args()
    b = args.batch
    rng = np.random.default_rng(1)
    x112 = jnp.asarray(rng.uniform(-1, 1, (b, 112, 112, 3)), jnp.float32)
    x256 = jnp.asarray(rng.uniform(-1, 1, (b, 256, 256, 3)), jnp.float32)
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), batch {b}")
    for which in [args.only] if args.only else ["fixture", "official"]:
        net = arcface.ArcFace(widths=ARCFACE[which])
        v = random_variables(net, x112)
        measure(f"ArcFace IR-SE50 112px ({which} widths)", net.apply, b, args.iters, v, x112)
        identity = jax.jit(lambda v, x, net=net: net.apply(v, x, method="identity"))
        measure(f"ArcFace identity path 256px ({which} widths)", identity, b, args.iters, v, x256)
        widths, style_width, w_dim = PSP[which]
        enc = psp.GradualStyleEncoder(widths=widths, style_width=style_width, w_dim=w_dim, n_styles=14)
        v = random_variables(enc, x256)
        measure(f"pSp encoder 256px -> 14x{w_dim} ({which} widths)", enc.apply, b, args.iters,
                v, x256)


if __name__ == "__main__":
    main()
