"""Helpers for tests: fixture paths, official NCHW arrays, and running the real CLIs."""

from __future__ import annotations

import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


def fixture(name: str) -> Path:
    path = FIXTURES / name
    if not path.exists():
        pytest.fail(f"missing test fixture {path}")
    return path


def load_npz(name: str) -> dict[str, np.ndarray]:
    with np.load(fixture(name)) as d:
        return {k: d[k] for k in d.files}


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.transpose(x, (0, 2, 3, 1))


def xla_env(devices: int) -> dict[str, str]:
    """XLA_FLAGS for a subprocess with `devices` fake CPU devices, keeping any flags already set."""
    return {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} "
                         f"--xla_force_host_platform_device_count={devices}".strip()}


def run_cli(*args: str, check: bool = True, env: dict | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Runs `python ARGS...` from the repository root, as a user would."""
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("JAX_PLATFORMS", "cpu")
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          env=full_env, input=input, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def load_config(phase: int, arg: str | None = "smoke"):
    """configs/phase{phase}.py's config for `arg` (loaded by path, as the training CLI does)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"cfg{phase}", ROOT / "configs" / f"phase{phase}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def smoke(phase: int, data, arg: str = "smoke", **fields):
    """A smoke training config of `phase` on the images in `data`, 3 checkpoints kept, with
    `fields` set."""
    c = load_config(phase, arg)
    c.data.path = str(data)
    c.keep_checkpoints = 3
    for k, v in fields.items():
        c[k] = v
    return c


def leaves(tree) -> dict[str, np.ndarray]:
    """{key path: leaf} of a pytree, as numpy arrays."""
    import jax

    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def convert(script: str, *args: str, out: Path) -> Path:
    """Runs the real converter CLI `ports/<script>` and returns the written file."""
    run_cli(f"ports/{script}", *args, str(out))
    assert out.exists()
    return out


# Official release file name -> fixture file (random weights in the official formats).
RELEASE_FIXTURES = {
    "attr_best.pth": "ifadit_attr_best.pth",
    "mlp_best.pth": "ifadit_mlp_latent_mapper.pth",
    "G_net_15.pth": "ifadit_inn_G_net.pth",
    "fuse_mlp_15.pth": "ifadit_icl_fusion_mapper10.pth",
    "550000.pt": "ifadit_stylegan2_256_style512.pt",
    "model_ir_se50.pth": "ifadit_model_ir_se50.pth",
    "79999_iter.pth": "bisenet_faceparsing.pth",
}


def small_weights_folder(root: Path) -> Path:
    """A weights folder of the small random fixture networks plus the MTCNN detector, built with
    the real converters (what the anonymize / recover CLIs load) -> root / "weights"."""
    from ports import release

    official = root / "official"
    official.mkdir()
    for name, src in RELEASE_FIXTURES.items():
        os.symlink(fixture(src), official / name)
    release.convert_release(str(official), str(root / "weights"))
    run_cli("ports/convert_mtcnn.py", str(fixture("mtcnn_weights")), str(root / "weights" / "mtcnn.safetensors"))
    return root / "weights"


# ----------------------------------------------------------------------------------------------
# Short synthetic clips (video and folder tests): scikit-image's astronaut panned across
# 129x97 frames (odd on both sides), a two-frame cut and face-free noise frames at the end.

CLIP_SIZE = (97, 129)  # height, width: odd on purpose
CLIP_TIME_BASE = Fraction(1, 90)
CLIP_FACE_FRAMES = [0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 13]
CLIP_FRAMES = 17


def face_frame(step: int) -> np.ndarray:
    from PIL import Image
    from skimage import data

    img = data.astronaut()  # 512x512, the face near x 170-260, y 60-170
    x0 = 40 + 8 * step
    crop = img[10:310, x0:x0 + 400]
    return np.asarray(Image.fromarray(crop).resize((CLIP_SIZE[1], CLIP_SIZE[0]), Image.BILINEAR))


def plain_frame(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)  # noise: no face, and every pixel value matters
    return rng.integers(0, 256, (*CLIP_SIZE, 3), dtype=np.uint8)


def clip_frames() -> list[np.ndarray]:
    frames = []
    for i in range(CLIP_FRAMES):
        frames.append(face_frame(i) if i in CLIP_FACE_FRAMES else plain_frame(i))
    return frames


def clip_pts() -> list[int]:
    # Variable frame rate: gaps of 3 and 4 ticks of 1/90 s alternate.
    return [int(sum(3 + (j % 2) for j in range(i))) for i in range(CLIP_FRAMES)]


def write_audio(out, a, seconds: float) -> None:
    """A quiet 440 Hz tone (AAC, 8 kHz mono) of about `seconds` into stream `a`."""
    import av

    t = np.arange(int(seconds * 8000) // 1024 * 1024 + 1024) / 8000
    tone = (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for i in range(0, len(tone), 1024):
        f = av.AudioFrame.from_ndarray(tone[None, i:i + 1024], format="fltp", layout="mono")
        f.sample_rate, f.pts = 8000, i
        out.mux(a.encode(f))
    out.mux(a.encode())


def write_clip(path, frames, pts, codec="ffv1", audio=False, rotation=0):
    import av

    with av.open(str(path), "w") as out:
        s = out.add_stream(codec, rate=25)
        s.height, s.width = frames[0].shape[:2]
        s.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
        s.codec_context.time_base = CLIP_TIME_BASE
        if rotation:
            s.set_display_rotation(rotation)
        a = out.add_stream("aac", rate=8000, layout="mono") if audio else None
        for fr, p in zip(frames, pts):
            f = av.VideoFrame.from_ndarray(fr, format="rgb24")
            f.pts, f.time_base = p, CLIP_TIME_BASE
            out.mux(s.encode(f))
        out.mux(s.encode())
        if audio:
            write_audio(out, a, pts[-1] / 90)


def read_clip(path):
    """-> (frames uint8, pts in seconds)."""
    import av

    with av.open(str(path)) as c:
        got = [(f.to_ndarray(format="rgb24"), float(f.pts * f.time_base)) for f in c.decode(video=0)]
    return [g[0] for g in got], [g[1] for g in got]
