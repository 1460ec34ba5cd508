"""`make demo`: renders a sample grid from the built-in small generator and prints throughput.

The built-in generator has the parity fixtures' widths (style dim 64, channels / 8) and RANDOM
weights: its images are colourful noise, not faces, and the grid says so. With
`--weights G.safetensors` (a converted official generator) the same command renders real samples.

  python -m ifadit_jax.demo [--weights G.safetensors] [--out out/demo_grid.png] [--n 8]
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
from PIL import Image, ImageDraw

from ifadit_jax import cli
from ifadit_jax.files import atomic_path
from ifadit_jax.nets import stylegan2

BUILTIN = stylegan2.Config(resolution=256, z_dim=64, w_dim=64,
                           channels=stylegan2.rosinality_channels(256, 2, 8))


def to_uint8(images) -> np.ndarray:
    """[B,H,W,3] in about [-1,1] -> uint8."""
    return np.asarray(np.clip((np.asarray(images) + 1) * 127.5, 0, 255).round(), np.uint8)


def grid(images: np.ndarray, cols: int, label: str | None = None) -> Image.Image:
    b, h, w, _ = images.shape
    rows = -(-b // cols)
    top = 24 if label else 0
    canvas = Image.new("RGB", (cols * w, rows * h + top), "white")
    for i, img in enumerate(images):
        canvas.paste(Image.fromarray(img), ((i % cols) * w, (i // cols) * h + top))
    if label:
        ImageDraw.Draw(canvas).text((6, 6), label, fill="black")
    return canvas


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", help="converted StyleGAN2 .safetensors (default: built-in random weights)")
    p.add_argument("--out", default="out/demo_grid.png")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--truncation", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    if args.weights:
        G = stylegan2.load(args.weights)
        label = f"StyleGAN2 {args.weights}, truncation {args.truncation}"
    else:
        G = stylegan2.random_generator(BUILTIN, seed=args.seed)
        label = "built-in small StyleGAN2 with RANDOM weights (not a trained model)"
    z = jax.random.normal(jax.random.key(args.seed), (args.n, G.z_dim))

    t0 = time.perf_counter()
    images = G.synthesis(G.mapping(z, truncation=args.truncation)).block_until_ready()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    images = G.synthesis(G.mapping(z, truncation=args.truncation)).block_until_ready()
    steady = time.perf_counter() - t0

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with atomic_path(args.out) as tmp:
        grid(to_uint8(images), cols=4, label=label).save(tmp, format="PNG")
    print(f"wrote {args.out}: {args.n} samples at {G.resolution}px ({label})")
    print(f"throughput: {args.n / steady:.2f} images/s at batch {args.n} on "
          f"{jax.devices()[0].platform} (first call incl. compilation {first:.1f} s)")


if __name__ == "__main__":
    cli.run(main)
