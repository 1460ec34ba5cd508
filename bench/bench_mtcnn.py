"""MTCNN detection throughput: the 512x512 astronaut photo (one face), one image per call.

Usage: python bench/bench_mtcnn.py [--weights mtcnn.safetensors] [--iters 20] [--platform cpu]

Without --weights, converts the copies of facenet-pytorch's pnet/rnet/onet.pt in tests/fixtures
first. Prints the first call's time (XLA compilation of every PNet size bucket and the RNet/ONet
batch sizes this photo needs, plus one run), and the steady-state detections per second after
warm-up, with the time per stage.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _crop_net_flops(net, fn, crops) -> float:
    """Cost-analysis FLOPs of `net._batched(fn, crops)`: one call per padded chunk."""
    from common import flops

    from ifadit_jax.nets import mtcnn

    total = 0.0
    for start in range(0, len(crops), mtcnn._MAX_BATCH):
        n = mtcnn._batch_bucket(len(crops[start:start + mtcnn._MAX_BATCH]))
        total += flops(fn, net.variables, np.zeros((n, *crops.shape[1:]), np.float32))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", help="converted MTCNN file (default: convert the test fixtures)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--platform", default="cpu", help="JAX platform (default cpu)")
    args = parser.parse_args()
    os.environ["JAX_PLATFORMS"] = args.platform
    sys.path.insert(0, str(ROOT))

    import jax
    import numpy as np
    from PIL import Image

    import ifadit_jax
    from ifadit_jax import weights
    from ifadit_jax.nets import mtcnn
    from ports import convert_mtcnn

    with tempfile.TemporaryDirectory() as tmp:
        path = args.weights
        if path is None:
            path = os.path.join(tmp, "mtcnn.safetensors")
            weights.save(path, *convert_mtcnn.convert(str(ROOT / "tests/fixtures/mtcnn_weights")))
        net = ifadit_jax.load(path)
    image = np.asarray(Image.open(ROOT / "tests/fixtures/mtcnn_images/astronaut.png").convert("RGB"))

    t0 = time.perf_counter()
    boxes, _, _ = net.detect(image)
    first = time.perf_counter() - t0
    for _ in range(3):
        net.detect(image)
    t0 = time.perf_counter()
    for _ in range(args.iters):
        boxes, _, _ = net.detect(image)
    per_image = (time.perf_counter() - t0) / args.iters

    # Stage split (same work as detect, timed piecewise; device work is synchronised by the
    # numpy conversions inside each stage).
    h, w = image.shape[:2]
    integral = mtcnn.integral_image(image)
    sizes = mtcnn.pyramid_sizes(h, w, mtcnn.pyramid_scales(h, w))
    one = lambda v: np.array([v])
    t0 = time.perf_counter()
    for _ in range(args.iters):
        pending = [net._pnet_start(mtcnn.normalize(
            mtcnn.area_resize(integral, one(0), one(h), one(0), one(w), hs, ws)[0])) for hs, ws in sizes]
        for result in pending:
            result()
    pyramid = (time.perf_counter() - t0) / args.iters
    d = net.detect_stages(image)
    crops24 = np.zeros((len(d.rnet_reg), 24, 24, 3), np.float32)
    crops48 = np.zeros((len(d.onet_reg), 48, 48, 3), np.float32)
    t0 = time.perf_counter()
    for _ in range(args.iters):
        net._batched(net._rnet, crops24)
    rnet_t = (time.perf_counter() - t0) / args.iters
    t0 = time.perf_counter()
    for _ in range(args.iters):
        net._batched(net._onet, crops48)
    onet_t = (time.perf_counter() - t0) / args.iters

    sys.path.insert(0, str(ROOT / "bench"))
    from common import peak

    p = peak()
    net_flop = _crop_net_flops(net, net._rnet, crops24) + _crop_net_flops(net, net._onet, crops48)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"{os.cpu_count()} CPU cores visible; measured peak {p / 1e9:.0f} GFLOP/s")
    # PNet runs on a dozen pyramid sizes with host work between them, so only RNet + ONet get a
    # FLOP count; detection as a whole is bound by that host work, not by arithmetic.
    print(f"RNet + ONet: {net_flop / (rnet_t + onet_t) / p:.1%} of peak")
    print(f"image 512x512, {len(boxes)} face(s); {len(sizes)} pyramid levels, "
          f"{len(d.rnet_reg)} RNet and {len(d.onet_reg)} ONet candidates")
    print(f"first call (compile + run): {first:.2f} s")
    print(f"detect: {per_image * 1e3:.1f} ms/image = {1 / per_image:.1f} detections/s (images/s)")
    print(f"  pyramid resize + PNet: {pyramid * 1e3:.1f} ms, RNet: {rnet_t * 1e3:.1f} ms, "
          f"ONet: {onet_t * 1e3:.1f} ms, rest (NMS, crops): "
          f"{(per_image - pyramid - rnet_t - onet_t) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
