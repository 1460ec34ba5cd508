"""Benchmark (not a test): video anonymization speed per stage and memory over a long clip.

  python bench/bench_video.py [--frames 300] [--faces 1,4] [--widths small,real]
                              [--mtcnn mtcnn.safetensors] [--memory-frames 3000]

Builds synthetic 640x360 FFV1 clips in a temporary folder (scikit-image's coffee as the
background, 1 or 4 copies of the astronaut's face sliding across it), anonymizes each with
random networks (`random_nets`, small = the fixtures' widths, real = the official widths) and
the real MTCNN (facenet-pytorch's weights: converted from tests/fixtures unless --mtcnn), after
a 3-frame warm-up of the same size (compilation excluded), and prints frames per second with the
share of each stage (`ifadit_jax.video.STAGES`, both passes).

With --memory-frames N (default 3000, the issue's figure; 0 skips it): one more run, small
widths and one face, over an N-frame clip, printing the resident set size (current and peak) at
frame --memory-mark (default 300) of the first pass and at the end: memory is bounded by a
frame, not by the clip, so the two should agree within 10%. The clip and its anonymized copy
are temporary FFV1 files (lossless: several hundred MB each for 3000 frames).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZE = (360, 640)  # height, width
FACE = 120  # pixels: the astronaut's face tile (her face is about half of it)


def _tiles():
    """(background uint8 [360, 640, 3], face tile [FACE, FACE, 3])."""
    import numpy as np
    from PIL import Image
    from skimage import data

    background = np.asarray(Image.fromarray(data.coffee()).resize(SIZE[::-1], Image.BILINEAR))
    face = np.asarray(Image.fromarray(data.astronaut()[20:260, 110:350]).resize((FACE, FACE), Image.BILINEAR))
    return background, face


def frame(t: int, faces: int, background, face):
    """Frame t: `faces` face tiles sliding right by 2 pixels a frame (wrapping)."""
    img = background.copy()
    for j in range(faces):
        x = (40 + 150 * j + 2 * t) % (SIZE[1] - FACE)
        y = 40 + 160 * (j % 2)
        img[y:y + FACE, x:x + FACE] = face
    return img


def write_clip(path: str, frames: int, faces: int) -> None:
    import av

    background, face = _tiles()
    with av.open(path, "w") as out:
        s = out.add_stream("ffv1", rate=25)
        s.height, s.width, s.pix_fmt = SIZE[0], SIZE[1], "bgr0"
        for t in range(frames):
            f = av.VideoFrame.from_ndarray(frame(t, faces, background, face), format="rgb24")
            f.pts = t
            out.mux(s.encode(f))
        out.mux(s.encode())


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident set size in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class CountingDetector:
    """The detector, noting the memory when pass 1 reaches frame `at`."""

    def __init__(self, detector, at: int):
        self.detector, self.at, self.calls, self.mark = detector, at, 0, None

    def detect_many(self, images, min_face_size=20.0):
        if self.calls < self.at <= self.calls + len(images):
            self.mark = rss_mib()
        self.calls += len(images)
        return self.detector.detect_many(images, min_face_size=min_face_size)


def anonymize(pipe, detector, src: str, dst: str):
    """-> (wall seconds, StageClock, sidecar record)."""
    import numpy as np

    from ifadit_jax import video

    k = pipe.key_from_vector(np.full((1, 512), 0.75, np.float32))[0]
    with video.stage_clock() as clock:
        t0 = time.perf_counter()
        record = video.anonymize_video(pipe, src, dst, k, detector=detector, key_record={"path": "vector"},
                                       batch=1)
        wall = time.perf_counter() - t0
    return wall, clock, record


def speed(pipe, detector, work: str, widths: str, faces: int, frames: int) -> None:
    src = os.path.join(work, f"clip_{faces}.mkv")
    write_clip(os.path.join(work, "warm.mkv"), 3, faces)
    anonymize(pipe, detector, os.path.join(work, "warm.mkv"), os.path.join(work, "warm_out.mkv"))
    write_clip(src, frames, faces)
    wall, clock, record = anonymize(pipe, detector, src, os.path.join(work, f"out_{faces}.mkv"))
    shares = ", ".join(f"{s} {t / wall:.0%}" for s, t in clock.seconds.items())
    face_frames = sum(len(t["frames"]) for t in record["tracks"])
    print(f"{widths:5s} widths, {faces} face(s): {frames / wall:7.3f} frames/s ({frames} frames "
          f"640x360, {len(record['tracks'])} tracks, {face_frames} face-frames); {shares}; "
          f"other {1 - sum(clock.seconds.values()) / wall:.0%}", flush=True)


def memory(pipe, detector, work: str, frames: int, at: int) -> None:
    src = os.path.join(work, "long.mkv")
    write_clip(os.path.join(work, "warm.mkv"), 3, 1)
    anonymize(pipe, detector, os.path.join(work, "warm.mkv"), os.path.join(work, "warm_out.mkv"))
    write_clip(src, frames, 1)
    counting = CountingDetector(detector, at)
    wall, _, _ = anonymize(pipe, counting, src, os.path.join(work, "long_out.mkv"))
    end = rss_mib()
    if counting.mark is None:
        print(f"memory: the clip has fewer than {at} frames", flush=True)
        return
    print(f"memory, {frames} frames (small widths, 1 face, {frames / wall:.2f} frames/s): RSS at "
          f"frame {at} of pass 1 {counting.mark[0]:.0f} MiB (peak {counting.mark[1]:.0f}); "
          f"at the end {end[0]:.0f} MiB (peak {end[1]:.0f}); peak ratio {end[1] / counting.mark[1]:.3f}",
          flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=300, help="frames of the speed clips (default 300)")
    p.add_argument("--faces", default="1,4")
    p.add_argument("--widths", default="small,real")
    p.add_argument("--mtcnn", help="converted MTCNN (default: convert the test fixtures' copy)")
    p.add_argument("--memory-frames", type=int, default=3000, help="0 skips the memory run")
    p.add_argument("--memory-mark", type=int, default=300, help="frame of the first RSS reading")
    p.add_argument("--platform", default="cpu", help="JAX platform (default cpu)")
    args = p.parse_args()
    os.environ["JAX_PLATFORMS"] = args.platform
    sys.path.insert(0, str(ROOT))

    import jax

    import ifadit_jax
    from ifadit_jax import random_nets, weights
    from ports import convert_mtcnn

    with tempfile.TemporaryDirectory(prefix="bench-video-") as work:
        path = args.mtcnn
        if path is None:
            path = os.path.join(work, "mtcnn.safetensors")
            weights.save(path, *convert_mtcnn.convert(str(ROOT / "tests/fixtures/mtcnn_weights")))
        detector = ifadit_jax.load(path)
        print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
              f"{os.cpu_count()} CPU cores visible", flush=True)
        for widths in filter(None, args.widths.split(",")):  # "" : the memory run only
            pipe = random_nets.random_pipeline(0, configs=random_nets.WIDTH_PRESETS[widths])
            for faces in (int(v) for v in args.faces.split(",")):
                speed(pipe, detector, work, widths, faces, args.frames)
        if args.memory_frames:
            memory(random_nets.random_pipeline(0), detector, work, args.memory_frames, args.memory_mark)


if __name__ == "__main__":
    main()
