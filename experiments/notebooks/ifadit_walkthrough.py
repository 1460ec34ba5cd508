# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # iFADIT in JAX: convert, anonymize, recover, measure, plot
#
# A research notebook in jupytext's percent format: open it in Jupyter with jupytext
# (`jupytext --to notebook experiments/notebooks/ifadit_walkthrough.py`), or run it as a script
# from the repository root:
#
#     python experiments/notebooks/ifadit_walkthrough.py
#
# Inputs, from environment variables:
#
# * `IFADIT_OFFICIAL_DIR`: a folder with the official iFADIT release files (`attr_best.pth`,
#   `mlp_best.pth`, `G_net_*.pth`, `fuse_mlp_*.pth`, `550000.pt`, `model_ir_se50.pth`,
#   `79999_iter.pth`). Unset: the checkpoints in `tests/fixtures`, which have the official
#   formats but **random weights** at small widths: everything runs, no number means anything.
# * `IFADIT_LPIPS_TRUNK`, `IFADIT_LPIPS_LIN`: torchvision's `alexnet-owt-7be5be79.pth` and the
#   lpips package's `weights/v0.1/alex.pth` (default: the fixtures' copies).
# * `IFADIT_NOTEBOOK_OUT`: where everything is written (default `out/notebook`).
#
# Plots are drawn with Pillow (matplotlib is not a dependency of the project).

# %%
import json
import os
import subprocess
import sys
import time


def find_root() -> str:
    """The repository root: above this file, or above the working directory in Jupyter."""
    start = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else os.getcwd()
    d = start
    while not os.path.isdir(os.path.join(d, "experiments")) or not os.path.isdir(os.path.join(d, "ports")):
        parent = os.path.dirname(d)
        if parent == d:
            raise RuntimeError(f"run this notebook inside the ifadit-jax repository (from {start})")
        d = parent
    return d


ROOT = find_root()
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from experiments import evaluate as ev  # noqa: E402
from experiments import tables  # noqa: E402
from ifadit_jax import imageio, keys, metrics, pipeline, weights  # noqa: E402

OUT = os.path.abspath(os.environ.get("IFADIT_NOTEBOOK_OUT", os.path.join(ROOT, "out", "notebook")))
os.makedirs(OUT, exist_ok=True)
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
print("jax", jax.__version__, "on", jax.default_backend(), "| output:", OUT)

# %% [markdown]
# ## 1. Convert the official checkpoints
#
# Converters read the PyTorch files without PyTorch (a restricted unpickler) and write one
# `.safetensors` file per network; `release` converts the whole official folder and writes a
# `manifest.json`. In Jupyter you would write `!python ports/convert_ifadit.py release SRC OUT`;
# here the same command lines run through `subprocess`.

# %%
# official file name -> the fixture with the same format (random weights)
FIXTURE_RELEASE = {
    "attr_best.pth": "ifadit_attr_best.pth", "mlp_best.pth": "ifadit_mlp_latent_mapper.pth",
    "G_net_15.pth": "ifadit_inn_G_net.pth", "fuse_mlp_15.pth": "ifadit_icl_fusion_mapper10.pth",
    "550000.pt": "ifadit_stylegan2_256_style512.pt", "model_ir_se50.pth": "ifadit_model_ir_se50.pth",
    "79999_iter.pth": "bisenet_faceparsing.pth",
}
official = os.environ.get("IFADIT_OFFICIAL_DIR")
RANDOM_WEIGHTS = official is None
if RANDOM_WEIGHTS:
    official = os.path.join(OUT, "official_fixtures")
    os.makedirs(official, exist_ok=True)
    for name, src in FIXTURE_RELEASE.items():
        link = os.path.join(official, name)
        if not os.path.lexists(link):
            os.symlink(os.path.join(FIXTURES, src), link)


def convert(*args: str) -> None:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr}")
    print(proc.stdout.strip().splitlines()[-1], f"({time.perf_counter() - t:.1f} s)")


weights_dir = os.path.join(OUT, "weights")
if not os.path.isdir(weights_dir):
    convert("ports/convert_ifadit.py", "release", official, weights_dir)
lpips_file = os.path.join(OUT, "lpips_alex.safetensors")
if not os.path.isfile(lpips_file):
    convert("ports/convert_lpips.py", "--net", "alex",
            "--trunk", os.environ.get("IFADIT_LPIPS_TRUNK", os.path.join(FIXTURES, "lpips_alex_trunk_torchvision.pth")),
            "--lin", os.environ.get("IFADIT_LPIPS_LIN", os.path.join(FIXTURES, "lpips_weights", "v0.1", "alex.pth")),
            lpips_file)
manifest = json.load(open(os.path.join(weights_dir, "manifest.json")))
for role, f in sorted(manifest["files"].items()):
    print(f"{role:13s} {f['file']:26s} from {f['source_file']}")

# %% [markdown]
# ## 2. Load the pipeline and two aligned faces
#
# `pipeline.load` returns jitted `anonymize` / `recover` over a `Nets` pytree; the pure
# functions `pipeline.anonymize(pipe.nets, x, k)` are there for your own `jit`, `vmap` or
# `grad`. Faces are 256x256 FFHQ-aligned crops in [0, 1]: here two crops of scikit-image's
# astronaut photograph (aligned from its landmarks; `ifadit_jax.commands.detect_faces` + `align`
# do the same for any photo with MTCNN).

# %%
pipe = pipeline.load(weights_dir)
print("weights", pipe.weights_id, "| conventions:", pipe.conventions)
x = np.stack(ev.demo_faces(2))
print("faces", x.shape, x.dtype, float(x.min()), float(x.max()))

# %% [markdown]
# ## 3. Keys
#
# The paper derives the key from a secret: k = f(Norm(Argon2id(s))) (Eq. 4), f being
# StyleGAN2's mapping network. The official release draws k = f(u) from a random vector
# instead; both are available. Argon2id is memory-hard on purpose (about 0.1 s per guess
# with the defaults); the fixtures run use a cheap setting. Record `kdf.to_dict()` with your
# outputs (never the secret).

# %%
kdf = keys.KdfParams(memory_cost=64, iterations=1) if RANDOM_WEIGHTS else keys.KdfParams()
secrets = [b"alice's secret", b"bob's secret", b"carol's secret"]
wrong_secret = b"mallory's guess"
B = len(x)


def batch_key(k):
    return jnp.broadcast_to(jnp.asarray(k), (B, 512))  # one key for the batch


t = time.perf_counter()
ks = [batch_key(pipe.key_from_secret(s, kdf)) for s in secrets]
k_wrong = batch_key(pipe.key_from_secret(wrong_secret, kdf))
k_official = pipe.key_from_vector(keys.official_key_seed(jax.random.key(0), B))  # [B, 512]
print(f"{len(ks) + 1} keys from secrets in {time.perf_counter() - t:.2f} s; KDF {kdf.to_dict()}")
print("official key path:", k_official.shape)

# %% [markdown]
# ## 4. Anonymize (Eq. 9, 11) and recover (Eq. 10)
#
# X_anon = refine(G(M(T(E_ID(X), k), E_Attr(X))), X), and with the same key
# X_rec = refine(G(M(T^-1(C(E_ID(X_anon)), k), E_Attr(X_anon))), X_anon). A wrong key still
# yields a face, of another identity: the flow is a bijection for every key.

# %%
t = time.perf_counter()
anon = [pipe.anonymize(x, k) for k in ks]
x_anon, inter = anon[0]
x_rec, rec_inter = pipe.recover(x_anon, ks[0])
x_wrong, _ = pipe.recover(x_anon, k_wrong)
jax.block_until_ready(x_wrong)
print(f"anonymized under {len(ks)} keys and recovered twice in {time.perf_counter() - t:.1f} s "
      "(compilation included)")
print("intermediates:", {k: tuple(v.shape) for k, v in inter.items() if v is not None})

# %% [markdown]
# ## 5. Metrics
#
# Identity cosines (the pipeline's ArcFace E_ID), PSNR / SSIM / LPIPS of the recovery, and the
# diversity of the three anonymizations (mean pairwise cosine and KFFA, the mean pairwise
# angle in degrees). `experiments.evaluate` and `experiments.tables` compute the paper's
# tables the same way over whole folders (`python -m experiments.run`).

# %%
lpips = weights.load(lpips_file)
identity = jax.jit(pipeline.identity)  # E_ID as a pure function of the Nets pytree
clip = lambda img: np.clip(np.asarray(img), 0.0, 1.0)  # noqa: E731  images as they are viewed
e_x = identity(pipe.nets, x)
e_anon = [identity(pipe.nets, clip(a)) for a, _ in anon]
e_rec = identity(pipe.nets, clip(x_rec))
e_wrong = identity(pipe.nets, clip(x_wrong))
summary = {
    "weights_id": pipe.weights_id, "random_weights": RANDOM_WEIGHTS, "kdf": kdf.to_dict(),
    "cos_anonymized": [float(v) for v in np.asarray(metrics.cosine(e_anon[0], e_x))],
    "cos_recovered": [float(v) for v in np.asarray(metrics.cosine(e_rec, e_x))],
    "cos_wrong_key": [float(v) for v in np.asarray(metrics.cosine(e_wrong, e_x))],
    "psnr_recovered": [float(v) for v in np.asarray(metrics.psnr(clip(x_rec), x))],
    "ssim_recovered": [float(v) for v in np.asarray(metrics.ssim(clip(x_rec), x))],
    "lpips_recovered": [float(v) for v in np.asarray(lpips(clip(x_rec), x, normalize=True))],
    "kffa_3_keys": [float(v) for v in np.asarray(metrics.kffa(jnp.stack(e_anon, axis=1)))],
}
for name, values in summary.items():
    if isinstance(values, list):
        print(f"{name:16s}", " ".join(f"{v:8.4f}" for v in values))

# %% [markdown]
# The same numbers as tables, over an image set: Tables 1, 3 and 4 with seeded per-image keys.
# Networks not given (here AdaFace, the FID Inception and MTCNN) are skipped, and the tables say
# so.

# %%
nets = ev.MetricNets(lpips=lpips, sources={
    "lpips": {"file": lpips_file},
    **{r: {"skipped": f"not converted in this notebook (--{r})"} for r in ("adaface", "inception", "mtcnn")}})
made = tables.produce(["table1", "table3", "table4"], {"release": pipe}, [ev.demo_dataset(2)], nets,
                      ev.KeyScheme(path="kdf", seed=0, kdf=kdf), ev.Settings(batch=2, div_keys=3, samples=2),
                      pipe_sources={"release": weights_dir}, out_dir=os.path.join(OUT, "tables"),
                      demo=RANDOM_WEIGHTS, progress=False)
print(made["table3"].markdown())

# %% [markdown]
# ## 6. Plots
#
# A labelled image grid, a bar chart of the identity cosines, and a scatter plot of the identity
# vector z = E_ID(X) against the recovered one z_rec = T^-1(C(E_ID(X_anon)), k): with trained
# weights the points lie on the diagonal (recovery restores the identity).

# %%
def image_grid(tiles, tile=192):
    canvas = Image.new("RGB", (tile * len(tiles[0]), (tile + 16) * len(tiles)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(tiles):
        for j, (label, img) in enumerate(row):
            canvas.paste(Image.fromarray(imageio.to_uint8(img)).resize((tile, tile), Image.LANCZOS),
                         (j * tile, i * (tile + 16)))
            draw.text((j * tile + 4, i * (tile + 16) + tile + 2), label, fill="black")
    return canvas


def bar_chart(groups, title, size=(640, 320), lo=-1.0, hi=1.0):
    """groups: {label: [values]} -> one bar per value, grouped, y axis from lo to hi."""
    w, h = size
    left, bottom, top = 40, 40, 28
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    y = lambda v: top + (hi - v) / (hi - lo) * (h - top - bottom)  # noqa: E731
    draw.text((left, 6), title, fill="black")
    for v in (lo, 0.0, hi):
        draw.line([left, y(v), w - 10, y(v)], fill=(200, 200, 200))
        draw.text((4, y(v) - 6), f"{v:+.1f}", fill="black")
    slot = (w - left - 10) / len(groups)
    colours = [(66, 110, 190), (230, 140, 40), (90, 170, 90), (200, 70, 70)]
    for g, (label, values) in enumerate(groups.items()):
        bw = slot * 0.8 / len(values)
        for i, v in enumerate(values):
            x0 = left + g * slot + slot * 0.1 + i * bw
            draw.rectangle([x0, min(y(v), y(0.0)), x0 + bw - 2, max(y(v), y(0.0))], fill=colours[i % 4])
        draw.text((left + g * slot + 4, h - bottom + 6), label, fill="black")
    for i in range(max(len(v) for v in groups.values())):
        draw.rectangle([w - 90, 8 + 14 * i, w - 80, 18 + 14 * i], fill=colours[i % 4])
        draw.text((w - 74, 6 + 14 * i), f"face {i + 1}", fill="black")
    return img


def scatter(xs, ys, title, size=360):
    lim = float(max(np.abs(xs).max(), np.abs(ys).max())) * 1.05 or 1.0
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    p = lambda a, b: (size / 2 + a / lim * (size / 2 - 20), size / 2 - b / lim * (size / 2 - 20))  # noqa: E731
    draw.line([p(-lim, -lim), p(lim, lim)], fill=(200, 200, 200))
    for a, b in zip(xs, ys):
        cx, cy = p(a, b)
        draw.ellipse([cx - 1.5, cy - 1.5, cx + 1.5, cy + 1.5], fill=(66, 110, 190))
    draw.text((6, 6), title, fill="black")
    return img


note = " (RANDOM fixture weights)" if RANDOM_WEIGHTS else ""
rows = [[("original", x[i]), *((f"anonymized, secret {j + 1}", clip(a[0][i])) for j, a in enumerate(anon)),
         ("recovered", clip(x_rec[i])), ("wrong secret", clip(x_wrong[i]))] for i in range(B)]
plots = {
    "walkthrough_grid.png": image_grid(rows),
    "identity_cosines.png": bar_chart(
        {"anonymized": summary["cos_anonymized"], "recovered": summary["cos_recovered"],
         "wrong key": summary["cos_wrong_key"]}, "ArcFace cosine with the original, per face" + note),
    "identity_scatter.png": scatter(np.asarray(rec_inter["z_rec"][0]), np.asarray(inter["z"][0]),
                                    "z_rec (x) against z = E_ID(X) (y)" + note),
}
for name, img in plots.items():
    img.save(os.path.join(OUT, name))
    print("wrote", os.path.join(OUT, name), img.size)
with open(os.path.join(OUT, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
print("wrote", os.path.join(OUT, "summary.json"))
