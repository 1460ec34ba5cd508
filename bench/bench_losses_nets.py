"""Throughput of the loss networks at batch 4: MobileFaceNet (E_LM) and LPIPS alex/vgg.

Random weights (module.init): speed does not depend on the values. LPIPS runs at the fixture
widths (alex is full width there; vgg is width/8) and at the real widths; `--grad` also times
the gradient with respect to the first image, as in training. Each line gives the cost-analysis
FLOPs and the fraction of the machine's measured peak (bench/common.py).

Usage: python bench/bench_losses_nets.py [--batch 4] [--size 256] [--iters 10] [--grad]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from common import measure  # bench/common.py

from ifadit_jax.nets import lpips as lp
from ifadit_jax.nets import mobilefacenet as mfn

VGG_REAL = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
VGG_FIXTURE = tuple(c // 8 for c in VGG_REAL)
ALEX = (64, 192, 384, 256, 256)


def bench_mobilefacenet(batch: int, size: int, iters: int, grad: bool) -> None:
    module = mfn.MobileFaceNet(136)
    images = jax.random.uniform(jax.random.key(1), (batch, size, size, 3), minval=-1, maxval=1)
    variables = module.init(jax.random.key(0), jnp.zeros((1, 112, 112, 3)))
    landmarks = lambda v, x: module.apply(v, mfn.preprocess(x))
    runs = {"forward": jax.jit(landmarks)}
    if grad:
        runs["grad"] = jax.jit(jax.grad(lambda v, x: landmarks(v, x).sum(), argnums=1))
    for what, fn in runs.items():
        measure(f"mobilefacenet {what} {size}->112", fn, batch, iters, variables, images)


def bench_lpips(name: str, net: str, widths, batch: int, size: int, iters: int, grad: bool) -> None:
    module = lp.LPIPS(net=net, widths=tuple(widths))
    a = jax.random.uniform(jax.random.key(1), (batch, size, size, 3), minval=-1, maxval=1)
    b = jax.random.uniform(jax.random.key(2), (batch, size, size, 3), minval=-1, maxval=1)
    variables = module.init(jax.random.key(0), a[:1], b[:1])
    runs = {"forward": jax.jit(module.apply)}
    if grad:
        runs["grad"] = jax.jit(jax.grad(lambda v, a, b: module.apply(v, a, b).sum(), argnums=1))
    for what, fn in runs.items():
        measure(f"lpips-{name} {what} {size}x{size}", fn, batch, iters, variables, a, b,
                unit="pairs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=256, help="input images are size x size")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--grad", action="store_true", help="also time d(output)/d(image)")
    args = parser.parse_args()
    print(f"backend {jax.default_backend()}, devices {jax.devices()}, batch {args.batch}")
    bench_mobilefacenet(args.batch, args.size, args.iters, args.grad)
    for name, net, widths in (("alex", "alex", ALEX), ("vgg/8", "vgg", VGG_FIXTURE),
                              ("vgg", "vgg", VGG_REAL)):
        bench_lpips(name, net, widths, args.batch, args.size, args.iters, args.grad)


if __name__ == "__main__":
    main()
