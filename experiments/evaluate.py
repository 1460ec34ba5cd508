"""Per-image evaluation of an iFADIT pipeline (paper §4, DESIGN §5): the numbers behind Tables 1-5.

One pass over a dataset computes, for every image X (aligned 256x256, RGB in [0, 1]) and its
seeded keys, whatever the requested tables need:

* anonymization (Table 1): X_anon = anonymize(X, k); cosine and L1 between the identity
  embeddings E(X_anon) and E(X), for ArcFace and AdaFace;
* utility (Table 2): MTCNN on X and on X_anon (largest face): detected or not, and the L1
  distance in pixels between the two boxes (4 coordinates) and the two sets of five landmarks
  (10 coordinates), averaged over the coordinates; FID between the sets {X_anon} and {X};
* de-anonymization (Table 3): X_rec = recover(X_anon, k) and X_wrong = recover(X_anon, k_wrong);
  MSE, PSNR, SSIM, LPIPS and the ArcFace / AdaFace cosines of each against X;
* diversity (Table 4): X anonymized under K keys (the first is Table 1's); mean pairwise cosine
  and KFFA (`ifadit_jax.metrics.kffa`: mean pairwise angle in degrees, our reading of the paper)
  of their identity embeddings.

Conventions (written into every table's notes and JSON):

* identity embeddings: ArcFace is the pipeline's own E_ID (IR-SE50 on the IDLoss crop
  [35:223, 32:220] pooled to 112, as the paper's training and evaluation use it) unless a separate
  converted ArcFace is given; AdaFace sees the same crop and pooling (its aligned 112 px input).
* images are compared as they would be viewed: clipped to [0, 1]. Recovery gets the anonymizer's
  raw output (the official code does not clamp) unless `quantize`, which stores X_anon as 8-bit
  PNG values (clip, round) first, as a saved file would be.
* keys (`KeyScheme`) are a pure function of (seed, stream, image index), so the numbers do not
  depend on the batch size or on which other images are evaluated, and every ablation sees the
  same keys.

Networks not given are skipped (their values are absent, and the tables say so); `--demo` fills
every missing one with random weights at the parity fixtures' small widths (`demo_metric_net`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import os
import time
import warnings
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ifadit_jax import align, imageio, keys as keys_lib, metrics, pipeline, random_nets
from ifadit_jax import weights
from ifadit_jax.data import sources
from ifadit_jax.errors import InputError
from ifadit_jax.nets import adaface as adaface_lib
from ifadit_jax.nets import arcface as arcface_lib

CROP = 256
TABLES = ("table1", "table2", "table3", "table4")
# What each table needs computed (anonymization is always done).
NEEDS = {"table1": {"embed"}, "table2": {"detect", "fid"}, "table3": {"embed", "recover"},
         "table4": {"embed", "diversity"}, "table5": {"embed", "recover", "diversity"}}

# ----------------------------------------------------------------------------------------------
# Metric networks

METRIC_ROLES = ("arcface", "adaface", "lpips", "inception", "mtcnn")
# File names looked up in --metrics DIR (those that are missing are skipped).
METRIC_FILES = {"adaface": "adaface.safetensors", "lpips": "lpips_alex.safetensors",
                "inception": "fid_inception.safetensors", "mtcnn": "mtcnn.safetensors"}
# The parity fixtures' widths (tests/fixtures): the demo's random metric networks.
DEMO_CONFIGS = {
    "adaface": {"num_layers": 50, "widths": [16, 32, 48, 64], "units": [3, 4, 14, 3],
                "emb_dim": 512, "input_size": 112},
    "lpips": {"net": "alex", "version": "0.1", "widths": [64, 192, 384, 256, 256]},
    "inception": {"feature_dim": 512, "widths": {
        "stem": [8, 8, 16, 20, 48], "a": [16, 12, 16, 16, 24, 24], "a_pool": [8, 16, 16],
        "b": [96, 16, 24, 24], "c": [48, 48, 48], "c7": [32, 40, 40, 48], "d": [48, 80, 48],
        "e": [80, 96, 112, 96, 48]}},
    "mtcnn": {"pnet_widths": [10, 16, 32], "rnet_widths": [28, 48, 64, 128],
              "onet_widths": [32, 64, 64, 128, 256]},
}


@dataclasses.dataclass
class MetricNets:
    """The evaluation networks; None where not given (those columns are skipped).

    arcface: a loaded ArcFace for evaluation; None uses each pipeline's own E_ID.
    sources: role -> where it came from ({"file", "sha256"}, {"random_seed"} or {"skipped"}),
    recorded in every table's JSON.
    """

    arcface: Any = None
    adaface: Any = None
    lpips: Any = None
    inception: Any = None
    mtcnn: Any = None
    sources: dict = dataclasses.field(default_factory=dict)

    def skipped(self, role: str) -> str | None:
        """Why `role`'s columns are skipped, or None if the network is there."""
        if getattr(self, role) is not None or role == "arcface":
            return None
        return self.sources.get(role, {}).get("skipped", f"no {role} network")


@functools.lru_cache(maxsize=None)
def demo_metric_net(role: str, seed: int = 0):
    """One evaluation network with random weights at the fixtures' widths (DEMO_CONFIGS).
    Cached: repeated runs in one process share it and its compiled programs."""
    from ifadit_jax.nets import inception, lpips, mtcnn

    config = DEMO_CONFIGS[role]
    zeros = functools.partial(jnp.zeros, dtype=jnp.float32)
    module, inputs = {
        "adaface": lambda: (adaface_lib.module_from_config(config), [zeros((1, 112, 112, 3))]),
        "lpips": lambda: (lpips.LPIPS(net=config["net"], widths=tuple(config["widths"]),
                                      version=config["version"]), [zeros((1, 64, 64, 3))] * 2),
        "inception": lambda: (inception.module_from_config(config), [zeros((1, 299, 299, 3))]),
        "mtcnn": lambda: (mtcnn.MTCNNNets(tuple(config["pnet_widths"]), tuple(config["rnet_widths"]),
                                          tuple(config["onet_widths"])), list(mtcnn.init_inputs())),
    }[role]()
    variables = random_nets.random_like(jax.eval_shape(module.init, jax.random.key(0), *inputs), seed)
    return weights.loader(role)(variables, weights.Meta(kind=role, config=config))


def load_metric_nets(files: dict[str, str | None], metrics_dir: str | None = None,
                     demo: bool = False, seed: int = 0) -> MetricNets:
    """Loads the evaluation networks.

    files: role -> converted file (or None); metrics_dir: a folder looked up for the METRIC_FILES
    names; demo: random networks (DEMO_CONFIGS) for every role still missing (not arcface: the
    pipeline's E_ID serves). Wrong or unreadable files raise WeightsError naming them.
    """
    if metrics_dir and not os.path.isdir(metrics_dir):
        raise InputError(f"metric networks folder does not exist: {metrics_dir}")
    nets = MetricNets()
    for role in METRIC_ROLES:
        path = files.get(role)
        flag = f"--{role}"
        if path is None and metrics_dir and role in METRIC_FILES:
            candidate = os.path.join(metrics_dir, METRIC_FILES[role])
            path = candidate if os.path.isfile(candidate) else None
            flag = f"{METRIC_FILES[role]} in --metrics"
        if path is not None:
            variables, meta = weights.read(path, kind=role)
            setattr(nets, role, weights.loader(role)(variables, meta))
            nets.sources[role] = {"file": os.path.abspath(path), "source_file": meta.source_file,
                                  "source_sha256": meta.source_sha256}
        elif role == "arcface":
            nets.sources[role] = {"pipeline": "each pipeline's own E_ID (arcface.safetensors)"}
        elif demo:
            setattr(nets, role, demo_metric_net(role, seed))
            nets.sources[role] = {"random_seed": seed, "config": DEMO_CONFIGS[role],
                                  "note": "random weights (demo): numbers are meaningless"}
        else:
            nets.sources[role] = {"skipped": f"no {role} weights given ({flag})"}
    return nets


_pipeline_identity = jax.jit(pipeline.identity)


@functools.partial(jax.jit, static_argnums=0)
def _adaface_identity(module, variables, images01):
    x112 = arcface_lib.identity_crop_pool(images01)
    return module.apply(variables, adaface_lib.preprocess(x112))[0]


def embed(nets: MetricNets, pipe_nets: pipeline.Nets, images) -> dict[str, jax.Array]:
    """Identity embeddings {"arcface": [B, 512], "adaface": [B, 512] if available} of aligned
    images [B, 256, 256, 3] in [0, 1] (unit vectors)."""
    id_nets = pipe_nets
    if nets.arcface is not None:
        # A separate evaluation ArcFace runs through the pipeline's own identity path (same
        # crop, pooling and input range), standing in for E_ID.
        id_nets = pipe_nets.with_role("id_encoder", nets.arcface.module, nets.arcface.variables)
    out = {"arcface": _pipeline_identity(id_nets, images)}
    if nets.adaface is not None:
        out["adaface"] = _adaface_identity(nets.adaface.module, nets.adaface.variables, images)
    return out


# ----------------------------------------------------------------------------------------------
# Keys

STREAM_IDS = {"anon": 0, "wrong": 1}  # diversity key j >= 1 of image i: stream f"div{j}", id 1 + j
SECRET_RULE = "ifadit-jax/experiments/seed={seed}/{stream}/{index}"


def stream_id(stream: str) -> int:
    if stream in STREAM_IDS:
        return STREAM_IDS[stream]
    if stream.startswith("div") and stream[3:].isdigit() and int(stream[3:]) >= 1:
        return 1 + int(stream[3:])
    raise ValueError(f"unknown key stream {stream!r}")


@jax.jit
def _uniform_vectors(base, indices):
    return jax.vmap(lambda i: keys_lib.official_key_seed(jax.random.fold_in(base, i)))(indices)


_key_from_vector = jax.jit(lambda nets, u: keys_lib.key_from_vector(u, pipeline.mapping(nets)))


@dataclasses.dataclass(frozen=True)
class KeyScheme:
    """Seeded keys: image `index` in `stream` ("anon": its key, "wrong": another key for the
    wrong-key recovery, "div{j}": diversity key j >= 1) gets k = f(u) with

    * path "vector" (the official key path): u = (U + 1) / 2, U uniform in [0, 1)^512 drawn with
      jax.random from fold_in(fold_in(key(seed), stream id), index);
    * path "kdf" (the paper's KeyGen): u = Norm(Argon2id(secret)) with the public evaluation
      secret SECRET_RULE.format(seed, stream, index) and the recorded `kdf` parameters.
    """

    path: str = "vector"
    seed: int = 0
    kdf: keys_lib.KdfParams = keys_lib.KdfParams()

    def __post_init__(self):
        if self.path not in ("vector", "kdf"):
            raise InputError(f"key path must be 'vector' or 'kdf', got {self.path!r}")

    def vectors(self, stream: str, indices: Sequence[int]) -> np.ndarray:
        """u [n, 512] float32 for the given image indices."""
        indices = np.asarray(indices, np.int64)
        if self.path == "vector":
            base = jax.random.fold_in(jax.random.key(self.seed), stream_id(stream))
            return np.asarray(_uniform_vectors(base, jnp.asarray(indices, jnp.uint32)))
        return np.stack([keys_lib.normalize_bytes(keys_lib.kdf_bytes(
            SECRET_RULE.format(seed=self.seed, stream=stream, index=int(i)).encode(), self.kdf))
            for i in indices])

    def keys(self, pipe_nets: pipeline.Nets, u: np.ndarray) -> jax.Array:
        """k = f(u): [n, 512]."""
        return _key_from_vector(pipe_nets, jnp.asarray(u, jnp.float32))

    def to_dict(self) -> dict:
        d = {"path": self.path, "seed": self.seed,
             "streams": {"anon": "the key of image i (Tables 1-3; diversity key 0)",
                         "wrong": "the wrong key of image i (Table 3)",
                         "div{j}": "diversity key j >= 1 of image i (Table 4)"},
             "stream_ids": {**STREAM_IDS, "div{j}": "1 + j"}}
        if self.path == "vector":
            d["rule"] = ("u = (jax.random.uniform(fold_in(fold_in(key(seed), stream_id), index), "
                         "[512]) + 1) / 2; k = f(u) (the official key path)")
        else:
            d["rule"] = ("u = Norm(Argon2id(secret)), secret = '" + SECRET_RULE + "' (public "
                         "evaluation secrets); k = f(u) (paper Eq. 4)")
            d["kdf"] = self.kdf.to_dict()
        return d


# ----------------------------------------------------------------------------------------------
# Datasets


@dataclasses.dataclass
class Dataset:
    """Images to evaluate. `indices[i]` is file i's position in the full sorted listing of its
    folder: it names the image's keys, so a subset (--limit, --split) gets the same keys as in
    a full run. layout: "aligned" (FFHQ-aligned faces, centre-cropped to a square and resized to
    256 px), "ffhq_star" (DIR/images of an FFHQ* folder), "photo" (detect the largest face with
    MTCNN and align it to the FFHQ crop) or "demo" (built-in faces, `images`)."""

    name: str
    root: str
    files: list[str]
    indices: np.ndarray
    layout: str = "aligned"
    listed: int = 0
    split: str = "all"
    images: list[np.ndarray] | None = None

    def describe(self) -> dict:
        return {"name": self.name, "root": self.root, "layout": self.layout, "split": self.split,
                "listed": self.listed, "selected": len(self.files)}


def parse_named(spec: str) -> tuple[str, str]:
    """"NAME=PATH" -> (NAME, PATH); a bare PATH is named after its last folder."""
    name, sep, path = spec.partition("=")
    if sep and name and os.sep not in name:
        return name, path
    path = spec
    return os.path.basename(os.path.normpath(path)) or "images", path


def open_dataset(spec: str, *, limit: int | None = None, split: str = "all", split_seed: int = 0,
                 val_fraction: float = 0.1, align_faces: bool = False) -> Dataset:
    """A folder of images (recursive, sorted; see `ifadit_jax.data.sources.list_images`) or an
    FFHQ* folder (meta.json + images/). split: "all", or "train"/"val" of the training code's
    deterministic split (for FFHQ*: evaluate on "val"). limit: the first N selected images."""
    name, root = parse_named(spec)
    if not os.path.isdir(root):
        raise InputError(f"image folder does not exist: {root}")
    layout = "photo" if align_faces else "aligned"
    if os.path.isfile(os.path.join(root, sources.FFHQ_STAR_META)):
        sources.read_ffhq_star_meta(root, check_complete=False)
        root = os.path.join(root, sources.FFHQ_STAR_IMAGES)
        layout = "photo" if align_faces else "ffhq_star"
    files = sources.list_images(root)
    n = len(files)
    if split == "all":
        idx = np.arange(n, dtype=np.int64)
    else:
        idx = sources.split_indices(n, split, split_seed=split_seed, val_fraction=val_fraction)
    if limit is not None:
        idx = idx[:limit]
    if len(idx) == 0:
        raise InputError(f"{root}: no images selected (split {split!r}, limit {limit})")
    return Dataset(name=name, root=os.path.abspath(root), files=[files[i] for i in idx],
                   indices=idx, layout=layout, listed=n, split=split)


# MTCNN's landmarks of the astronaut (as in ifadit_jax.demo), jittered per demo face.
def demo_faces(n: int) -> list[np.ndarray]:
    """n aligned 256x256 faces in [0, 1] cut from scikit-image's astronaut photograph: the FFHQ
    crop of its landmarks, rotated by a few degrees and rescaled per face, every second one
    mirrored. Real faces (MTCNN finds them) for runs without any download."""
    from ifadit_jax import demo

    photo = demo.astronaut()
    lm = np.asarray(demo.ASTRONAUT_LANDMARKS, np.float64)
    centre = lm.mean(0)
    faces = []
    for i in range(n):
        angle = np.deg2rad(4.0 * ((i + 1) // 2) * (-1) ** i)
        scale = 1.0 + 0.05 * (i // 2)
        rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        crop = align.warp_to_crop(photo, align.crop_transform((lm - centre) @ rot.T + centre, CROP), CROP)
        faces.append(np.ascontiguousarray(crop[:, ::-1] if i % 2 else crop))
    return faces


def demo_dataset(n: int = 4) -> Dataset:
    return Dataset(name="demo", root="(built-in: skimage astronaut)",
                   files=[f"astronaut_{i:02d}.png" for i in range(n)],
                   indices=np.arange(n, dtype=np.int64), layout="demo", listed=n,
                   images=demo_faces(n))


def iter_images(dataset: Dataset, detector=None) -> Iterator[tuple[int, np.ndarray | None]]:
    """(position in dataset, aligned image [256, 256, 3] in [0, 1] or None: no face found)."""
    from ifadit_jax import commands as faces_lib

    for pos, rel in enumerate(dataset.files):
        if dataset.images is not None:
            yield pos, dataset.images[pos]
        elif dataset.layout == "photo":
            photo = imageio.read_rgb(os.path.join(dataset.root, rel), min_size=1)
            found = faces_lib.detect_faces(detector, photo)
            yield pos, (align.warp_to_crop(photo, np.asarray(found[0].transform), CROP)
                        if found else None)
        else:
            yield pos, sources.load_image(os.path.join(dataset.root, rel), CROP).astype(np.float32) / 255.0


# ----------------------------------------------------------------------------------------------
# Evaluation


@dataclasses.dataclass(frozen=True)
class Settings:
    batch: int = 4
    refine: bool = True
    quantize: bool = False
    div_keys: int = 5
    samples: int = 4

    def __post_init__(self):
        if self.batch < 1:
            raise InputError("--batch must be at least 1")
        if self.div_keys < 2:
            raise InputError("--div-keys must be at least 2 (diversity compares keys)")
        if self.samples < 0:
            raise InputError("--samples must be >= 0")


@dataclasses.dataclass
class Result:
    """Per-image values of one dataset under one pipeline.

    values: name -> [n] float64 (names in `VALUE_NAMES`; absent when the network was skipped;
    NaN where undefined, e.g. box L1 without a face in both images). files: the evaluated
    images (those where a face was found). fid: {"value": float} or {"na": reason} or None.
    samples: the first `Settings.samples` images of each kind, for the grids.
    """

    dataset: Dataset
    weights_id: str
    files: list[str]
    indices: list[int]
    values: dict[str, np.ndarray]
    fid: dict | None
    samples: dict[str, list]
    no_face: list[str]
    seconds: float
    key_digests: dict[str, str]

    @property
    def n(self) -> int:
        return len(self.files)


VALUE_NAMES = {
    "table1": ["anon_cos_arcface", "anon_l1_arcface", "anon_cos_adaface", "anon_l1_adaface"],
    "table2": ["det_original", "det_anonymized", "box_l1", "landmark_l1"],
    "table3": [f"{w}_{m}" for w in ("rec", "wrong") for m in
               ("mse", "psnr", "ssim", "lpips", "cos_arcface", "cos_adaface")],
    "table4": ["div_cos_arcface", "div_kffa_arcface", "div_cos_adaface", "div_kffa_adaface"],
}


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    """Pads the batch axis to `size` by repeating the last row (one compiled program per size)."""
    if len(a) == size:
        return a
    return np.concatenate([a, np.repeat(a[-1:], size - len(a), axis=0)])


def _largest_face(detector, image01: np.ndarray):
    boxes, _, landmarks = detector.detect(imageio.to_uint8(image01))
    return None if len(boxes) == 0 else (np.asarray(boxes[0], np.float64),
                                        np.asarray(landmarks[0], np.float64))


def _pairwise_mean_cos(e: np.ndarray) -> np.ndarray:
    """e [B, K, D] unit-normalised here -> mean cosine over the K(K-1)/2 pairs, [B]."""
    e = e / np.linalg.norm(e, axis=-1, keepdims=True)
    gram = np.einsum("bkd,bld->bkl", e, e)
    k = e.shape[1]
    iu = np.triu_indices(k, 1)
    return gram[:, iu[0], iu[1]].mean(axis=1)


@dataclasses.dataclass
class _Run:
    """What one `evaluate` call accumulates over its batches."""

    pipe: pipeline.Pipeline
    nets: MetricNets
    key_scheme: KeyScheme
    settings: Settings
    needs: set[str]
    vals: dict[str, list] = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    samples: dict[str, list] = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    digests: dict[str, Any] = dataclasses.field(default_factory=dict)
    fid_x: Any = None
    fid_anon: Any = None

    def key(self, stream: str, idx: list[int]) -> jax.Array:
        """The keys of images `idx` in `stream`, padded to the batch size; their u are hashed."""
        u = self.key_scheme.vectors(stream, idx)
        self.digests.setdefault(stream, hashlib.sha256()).update(
            np.ascontiguousarray(u, np.float32).tobytes())
        return self.key_scheme.keys(self.pipe.nets, _pad(u, self.settings.batch))

    def view(self, x: np.ndarray, k) -> np.ndarray:
        """anonymize(x, k) clipped to [0, 1], as it would be viewed."""
        return np.clip(np.asarray(self.pipe.anonymize(x, k, refine=self.settings.refine)[0]), 0.0, 1.0)

    def add(self, name: str, values) -> None:
        self.vals[name].append(np.asarray(values))


@dataclasses.dataclass
class _Batch:
    """One padded batch: x [batch, 256, 256, 3]; the first n rows are real, the first `shown`
    go into the sample grids."""

    x: np.ndarray
    idx: list[int]
    n: int
    shown: int
    k: Any = None
    x_anon: np.ndarray | None = None   # the raw anonymizer output
    view: np.ndarray | None = None     # clipped (and quantized with --quantize)
    e_x: dict | None = None
    e_anon: dict | None = None


def _anonymize_batch(run: _Run, images: list[np.ndarray], idx: list[int]) -> _Batch:
    n = len(images)
    shown = max(0, min(n, run.settings.samples - len(run.samples["original"])))
    bt = _Batch(x=_pad(np.stack(images).astype(np.float32), run.settings.batch), idx=idx, n=n,
                shown=shown)
    bt.k = run.key("anon", idx)
    bt.x_anon = np.asarray(run.pipe.anonymize(bt.x, bt.k, refine=run.settings.refine)[0])
    bt.view = np.clip(bt.x_anon, 0.0, 1.0)
    if run.settings.quantize:
        bt.view = np.round(bt.view * 255.0) / 255.0
    run.samples["original"].extend(bt.x[:shown])
    run.samples["anonymized"].extend(bt.view[:shown])
    if run.needs & {"embed", "diversity"}:
        bt.e_x = {m: np.asarray(e) for m, e in embed(run.nets, run.pipe.nets, bt.x).items()}
        bt.e_anon = {m: np.asarray(e) for m, e in embed(run.nets, run.pipe.nets, bt.view).items()}
    return bt


def _anonymization_values(run: _Run, bt: _Batch) -> None:
    """Table 1: cosine and L1 between E(X_anon) and E(X)."""
    for m in bt.e_x:
        run.add(f"anon_cos_{m}", np.asarray(metrics.cosine(bt.e_anon[m], bt.e_x[m]))[:bt.n])
        run.add(f"anon_l1_{m}", np.asarray(metrics.l1(bt.e_anon[m], bt.e_x[m]))[:bt.n])


def _utility_values(run: _Run, bt: _Batch) -> None:
    """Table 2: MTCNN on X and X_anon (largest face each), and the FID statistics."""
    if "detect" in run.needs and run.nets.mtcnn is not None:
        for i in range(bt.n):
            d_x, d_a = _largest_face(run.nets.mtcnn, bt.x[i]), _largest_face(run.nets.mtcnn, bt.view[i])
            run.add("det_original", [float(d_x is not None)])
            run.add("det_anonymized", [float(d_a is not None)])
            both = d_x is not None and d_a is not None
            run.add("box_l1", [np.mean(np.abs(d_a[0] - d_x[0])) if both else np.nan])
            run.add("landmark_l1", [np.mean(np.abs(d_a[1] - d_x[1])) if both else np.nan])
            if i < bt.shown:
                run.samples["det_original"].append(d_x)
                run.samples["det_anonymized"].append(d_a)
    if run.fid_x is not None:
        run.fid_x.update(np.asarray(run.nets.inception(bt.x))[:bt.n])
        run.fid_anon.update(np.asarray(run.nets.inception(bt.view))[:bt.n])


def _recovery_values(run: _Run, bt: _Batch) -> None:
    """Table 3: recover X_anon (raw, or 8-bit with --quantize) with the right and a wrong key."""
    stored = bt.view if run.settings.quantize else bt.x_anon
    k_wrong = run.key("wrong", bt.idx)
    for which, kk in (("rec", bt.k), ("wrong", k_wrong)):
        out = np.clip(np.asarray(run.pipe.recover(stored, kk, refine=run.settings.refine)[0]), 0.0, 1.0)
        run.add(f"{which}_mse", np.asarray(metrics.mse(out, bt.x))[:bt.n])
        run.add(f"{which}_psnr", np.asarray(metrics.psnr(out, bt.x))[:bt.n])
        run.add(f"{which}_ssim", np.asarray(metrics.ssim(out, bt.x))[:bt.n])
        if run.nets.lpips is not None:
            run.add(f"{which}_lpips", np.asarray(run.nets.lpips(out, bt.x, normalize=True))[:bt.n])
        for m, e in embed(run.nets, run.pipe.nets, out).items():
            run.add(f"{which}_cos_{m}", np.asarray(metrics.cosine(e, bt.e_x[m]))[:bt.n])
        run.samples["recovered" if which == "rec" else "wrong_key"].extend(out[:bt.shown])


def _diversity_values(run: _Run, bt: _Batch) -> None:
    """Table 4: X under K keys (the first is Table 1's); pairwise cosine and KFFA."""
    per_key = {m: [bt.e_anon[m]] for m in bt.e_anon}
    div_views = [bt.view]
    for j in range(1, run.settings.div_keys):
        out = run.view(bt.x, run.key(f"div{j}", bt.idx))
        div_views.append(out)
        for m, e in embed(run.nets, run.pipe.nets, out).items():
            per_key[m].append(np.asarray(e))
    for m, es in per_key.items():
        e = np.stack(es, axis=1)[:bt.n]  # [n, K, D]
        run.add(f"div_cos_{m}", _pairwise_mean_cos(e))
        run.add(f"div_kffa_{m}", np.asarray(metrics.kffa(e)))
    run.samples["diversity"].extend(np.stack(div_views, axis=1)[:bt.shown])


def _evaluate_batch(run: _Run, images: list[np.ndarray], idx: list[int]) -> None:
    bt = _anonymize_batch(run, images, idx)
    if "embed" in run.needs:
        _anonymization_values(run, bt)
    _utility_values(run, bt)
    if "recover" in run.needs:
        _recovery_values(run, bt)
    if "diversity" in run.needs:
        _diversity_values(run, bt)


def _batches(dataset: Dataset, detector, size: int, no_face: list[str]):
    """Batches of at most `size` (images, positions in the dataset); images without a face
    (photo layout) are appended to `no_face` and left out."""
    images, positions = [], []
    for pos, image in iter_images(dataset, detector):
        if image is None:
            no_face.append(dataset.files[pos])
            continue
        images.append(image)
        positions.append(pos)
        if len(images) == size:
            yield images, positions
            images, positions = [], []
    if images:
        yield images, positions


def _fid_result(run: _Run) -> dict | None:
    if "fid" not in run.needs or run.fid_x is None:
        return None
    fid_x, fid_anon = run.fid_x, run.fid_anon
    if fid_x.count < 2:
        return {"na": "FID needs at least 2 images"}
    fid = {"n": fid_x.count, "feature_dim": int(fid_x.dim)}
    with warnings.catch_warnings():
        if fid_x.count <= fid_x.dim:  # singular covariances: expected, and noted instead
            warnings.simplefilter("ignore")
            fid["note"] = ("fewer images than feature dimensions: singular covariances, "
                           "an unreliable estimate")
        fid["value"] = fid_x.frechet_distance(fid_anon)
    return fid


def evaluate(pipe: pipeline.Pipeline, nets: MetricNets, dataset: Dataset, key_scheme: KeyScheme,
             settings: Settings, needs: set[str], progress: Callable | None = None) -> Result:
    """Runs the anonymizer (and what `needs` asks: "embed", "detect", "fid", "recover",
    "diversity") over `dataset` in batches of `settings.batch` (the last one padded)."""
    t0 = time.perf_counter()
    if dataset.layout == "photo" and nets.mtcnn is None:
        raise InputError(f"{dataset.name}: aligning photos (--align) needs MTCNN weights (--mtcnn)")
    run = _Run(pipe, nets, key_scheme, settings, set(needs))
    if "fid" in needs and nets.inception is not None:
        run.fid_x, run.fid_anon = metrics.FIDStatistics(), metrics.FIDStatistics()
    files, indices, no_face = [], [], []
    for images, positions in _batches(dataset, nets.mtcnn, settings.batch, no_face):
        idx = [int(dataset.indices[p]) for p in positions]
        files += [dataset.files[p] for p in positions]
        indices += idx
        _evaluate_batch(run, images, idx)
        if progress:
            progress(len(files))
    if not files:
        raise InputError(f"{dataset.name}: no face found in any of the {len(dataset.files)} images")
    values = {name: np.concatenate([np.asarray(v, np.float64).ravel() for v in parts])
              for name, parts in run.vals.items()}
    return Result(dataset=dataset, weights_id=pipe.weights_id, files=files, indices=indices,
                  values=values, fid=_fid_result(run), samples=dict(run.samples), no_face=no_face,
                  seconds=time.perf_counter() - t0,
                  key_digests={s: h.hexdigest() for s, h in run.digests.items()})


# ----------------------------------------------------------------------------------------------
# The built-in demo model and ablations (Table 5)

def demo_pipeline(seed: int = 0) -> pipeline.Pipeline:
    """The built-in model of `--demo`: `random_nets.random_pipeline(seed)` (every network at the
    fixtures' small widths, random weights, with gains so that the key visibly matters)."""
    return random_nets.random_pipeline(seed=seed)


ABLATIONS = ("full", "no_div", "no_img", "no_icl", "single_phase")


def demo_ablations(base: pipeline.Pipeline) -> dict[str, pipeline.Pipeline]:
    """Built-in stand-ins for the five ablation folders: the demo model with its flow's weights
    perturbed per variant (the trainable part of phase II), and without ICL for "no_icl".
    Random weights: they exercise Table 5's machinery, nothing else."""
    out = {}
    for i, name in enumerate(ABLATIONS):
        nets = base.nets
        if name == "no_icl":
            nets = nets.drop("icl")
        elif name != "full":
            rng = np.random.default_rng(100 + i)
            # tree.map keeps the flow's static part (permutations), so no new programs compile
            nets = nets.with_variables({"flow": jax.tree.map(
                lambda a: a + np.float32(0.05) * rng.standard_normal(a.shape).astype(np.float32), nets["flow"])})
        out[name] = pipeline.Pipeline(nets, weights_id=f"{base.weights_id}-{name}", manifest=base.manifest)
    return out


def describe_pipeline(pipe: pipeline.Pipeline, where: str) -> dict:
    return {"weights_id": pipe.weights_id, "conventions": pipe.conventions.name, "source": where,
            "icl": "icl" in pipe.nets, "refinement": "parser" in pipe.nets}


def summary(values: np.ndarray) -> dict:
    """mean, std (population) and n over the finite entries (NaN = undefined for that image)."""
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": int(len(v))}


def to_json(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
