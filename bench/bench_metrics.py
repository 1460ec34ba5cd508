"""Throughput of the evaluation networks: AdaFace IR-50 and the FID InceptionV3, random weights.

Prints images/s, FLOPs and the fraction of the measured peak (bench/common.py) at batch 16
(default) for AdaFace on 112x112 face crops and for the FID Inception
on 256x256 images (resized to 299 inside, as pytorch-fid does), each at the test fixtures' reduced
widths and at the official widths, plus SSIM/PSNR on 256x256 image pairs. Weights are random
(drawn from the shapes, no checkpoint needed): speed does not depend on their values.

Usage: python bench/bench_metrics.py [--batch 16] [--iters 3] [--only fixture|official]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from common import measure, random_variables  # bench/common.py

from ifadit_jax import metrics
from ifadit_jax.nets import adaface, inception

ADAFACE = {"fixture": (16, 32, 48, 64), "official": (64, 128, 256, 512)}
INCEPTION = {"fixture": {k: tuple(c // 4 for c in v) for k, v in inception.OFFICIAL_WIDTHS.items()},
             "official": inception.OFFICIAL_WIDTHS}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--only", choices=["fixture", "official"])
    args = parser.parse_args()
    b = args.batch
    rng = np.random.default_rng(1)
    faces = jnp.asarray(rng.uniform(-1, 1, (b, 112, 112, 3)), jnp.float32)
    images = jnp.asarray(rng.uniform(0, 1, (b, 256, 256, 3)), jnp.float32)
    others = jnp.asarray(rng.uniform(0, 1, (b, 256, 256, 3)), jnp.float32)
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), batch {b}")
    for which in [args.only] if args.only else ["fixture", "official"]:
        net = adaface.AdaFace(widths=ADAFACE[which])
        measure(f"AdaFace IR-50 112px ({which} widths)", net.apply, b, args.iters,
                random_variables(net, faces), faces)
        net = inception.FIDInceptionV3(**INCEPTION[which])
        measure(f"FID Inception 256px -> pool3 ({which} widths)", net.apply, b, args.iters,
                random_variables(net, images), images)
    measure("SSIM 256px", metrics.ssim, b, args.iters, images, others)
    measure("PSNR 256px", metrics.psnr, b, args.iters, images, others)


if __name__ == "__main__":
    main()
