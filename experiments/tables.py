"""Tables 1-5 from per-image results (`experiments.evaluate.Result`): Markdown, CSV, JSON and a
PNG sample grid per table.

A cell is a summary over images ({"mean", "std", "n"}), {"skipped": why} when the network it
needs was not given, or {"na": why} when it is undefined for these images (e.g. box L1 when no
anonymized face was detected). Skipped and undefined cells are written as such in every format,
never as zeros.

Files for table T in OUT: T.md (the table, its notes and settings), T.csv (one row per table row;
for every metric its mean, `_std` and `_n`), T_per_image.csv (every image's values), T.json
(everything, including the key scheme, seeds, metric-network sources and timings) and
T_samples.png.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import time
from typing import Any, Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw

import ifadit_jax
from experiments import evaluate as ev
from ifadit_jax import imageio
from ifadit_jax.errors import InputError
from ifadit_jax.files import atomic_path

SUFFIXES = (".md", ".csv", "_per_image.csv", ".json", "_samples.png")


@dataclasses.dataclass(frozen=True)
class Column:
    key: str            # value name (and CSV column)
    title: str          # Markdown header
    better: str = ""    # "↑" higher is better, "↓" lower is better
    fmt: str = ".4f"
    scale: float = 1.0  # 100 for percentages


@dataclasses.dataclass
class Table:
    name: str
    title: str
    labels: list[str]          # label columns, e.g. ["dataset"] or ["variant", "dataset"]
    columns: list[Column]
    rows: list[dict]           # label -> str, "n" -> int, column key -> cell
    notes: list[str]
    meta: dict
    per_image: list[dict]      # one dict per image: labels, file, index, values

    def markdown(self) -> str:
        head = [*self.labels, "n", *(f"{c.title} {c.better}".strip() for c in self.columns)]
        lines = [f"## {self.title}", "", "| " + " | ".join(head) + " |",
                 "|" + "|".join(["---"] * len(self.labels) + ["---:"] * (len(head) - len(self.labels))) + "|"]
        for row in self.rows:
            cells = [str(row[l]) for l in self.labels] + [str(row["n"])]
            cells += [format_cell(row[c.key], c) for c in self.columns]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow([*self.labels, "n", *(f"{c.key}{s}" for c in self.columns for s in ("", "_std", "_n"))])
        for row in self.rows:
            cells = [row[l] for l in self.labels] + [row["n"]]
            for c in self.columns:
                cell = row[c.key]
                if "mean" in cell and cell["mean"] is not None:
                    cells += [repr(cell["mean"] * c.scale), repr(cell["std"] * c.scale), cell["n"]]
                elif "value" in cell:
                    cells += [repr(cell["value"]), "", cell.get("n", "")]
                else:
                    cells += [cell_text(cell), "", cell.get("n", 0)]
            w.writerow(cells)
        return out.getvalue()

    def per_image_csv(self) -> str:
        out = io.StringIO()
        keys = list(dict.fromkeys(k for r in self.per_image for k in r))
        w = csv.writer(out, lineterminator="\n")
        w.writerow(keys)
        for r in self.per_image:
            w.writerow([_csv_value(r.get(k, "")) for k in keys])
        return out.getvalue()

    def to_dict(self) -> dict:
        return {"table": self.name, "title": self.title, "labels": self.labels,
                "columns": [dataclasses.asdict(c) for c in self.columns], "rows": self.rows,
                "notes": self.notes, **self.meta}


def _csv_value(v):
    return repr(float(v)) if isinstance(v, (float, np.floating)) else v


def cell_text(cell: dict) -> str:
    if "skipped" in cell:
        return "skipped"
    if "na" in cell or cell.get("mean", 0) is None:
        return "n/a"
    return ""


def format_cell(cell: dict, col: Column) -> str:
    if "value" in cell:
        return format(cell["value"] * col.scale, col.fmt)
    if cell.get("mean") is not None:
        v = cell["mean"] * col.scale
        return format(v, col.fmt) if math.isfinite(v) else str(v)
    return cell_text(cell)


# ----------------------------------------------------------------------------------------------
# Building the tables


def _cell(result: ev.Result, name: str, nets: ev.MetricNets, role: str | None, na: str = "") -> dict:
    why = nets.skipped(role) if role else None
    if why:
        return {"skipped": why}
    if name not in result.values:
        return {"skipped": "not computed"}
    s = ev.summary(result.values[name])
    if s["n"] == 0:
        return {"na": na or "undefined for every image", "n": 0}
    return s


def _role(name: str) -> str | None:
    for role in ("adaface", "lpips"):
        if name.endswith(role):
            return role
    return None


def _skip_notes(nets: ev.MetricNets, roles: Sequence[str]) -> list[str]:
    what = {"adaface": "AdaFace columns", "lpips": "LPIPS columns", "inception": "FID",
            "mtcnn": "detection columns (detection rate, box and landmark L1)"}
    return [f"{what[r]} skipped: {nets.skipped(r)}." for r in roles if nets.skipped(r)]


T1_COLUMNS = [Column("anon_cos_arcface", "ArcFace cos", "↓"), Column("anon_l1_arcface", "ArcFace L1", "↑"),
              Column("anon_cos_adaface", "AdaFace cos", "↓"), Column("anon_l1_adaface", "AdaFace L1", "↑")]
T2_COLUMNS = [Column("det_original", "detected, original (%)", "", ".1f", 100.0),
              Column("det_anonymized", "detected, anonymized (%)", "↑", ".1f", 100.0),
              Column("box_l1", "box L1 (px)", "↓", ".2f"), Column("landmark_l1", "landmark L1 (px)", "↓", ".2f"),
              Column("fid", "FID", "↓", ".2f")]
T3_COLUMNS = [Column("mse", "MSE", "↓", ".5f"), Column("psnr", "PSNR (dB)", "↑", ".2f"),
              Column("ssim", "SSIM", "↑"), Column("lpips", "LPIPS", "↓"),
              Column("cos_arcface", "ArcFace cos", "↑"), Column("cos_adaface", "AdaFace cos", "↑")]
T4_COLUMNS = [Column("div_cos_arcface", "ArcFace mean cos", "↓"),
              Column("div_kffa_arcface", "ArcFace KFFA (deg)", "↑", ".2f"),
              Column("div_cos_adaface", "AdaFace mean cos", "↓"),
              Column("div_kffa_adaface", "AdaFace KFFA (deg)", "↑", ".2f")]
T5_COLUMNS = [Column("anon_cos_arcface", "anon. ArcFace cos", "↓"),
              Column("anon_cos_adaface", "anon. AdaFace cos", "↓"),
              Column("rec_psnr", "rec. PSNR (dB)", "↑", ".2f"), Column("rec_ssim", "rec. SSIM", "↑"),
              Column("rec_lpips", "rec. LPIPS", "↓"), Column("rec_cos_arcface", "rec. ArcFace cos", "↑"),
              Column("rec_cos_adaface", "rec. AdaFace cos", "↑"),
              Column("wrong_cos_arcface", "wrong-key ArcFace cos", "↓"),
              Column("div_cos_arcface", "div. ArcFace mean cos", "↓"),
              Column("div_kffa_arcface", "div. ArcFace KFFA (deg)", "↑", ".2f"),
              Column("div_kffa_adaface", "div. AdaFace KFFA (deg)", "↑", ".2f")]

COMMON_NOTES = [
    "Means over the evaluated images (std and per-column counts in the CSV, every image in "
    "*_per_image.csv). Images are aligned 256x256 crops in [0, 1]; outputs are clipped to [0, 1].",
    "Identity embeddings: ArcFace = the pipeline's E_ID (IR-SE50) unless --arcface, on the IDLoss "
    "crop [35:223, 32:220] pooled to 112 px; AdaFace on the same crop (its 112 px input, BGR).",
]


def _per_image(result: ev.Result, names: Sequence[str], labels: dict) -> list[dict]:
    present = [n for n in names if n in result.values]
    return [{**labels, "file": f, "index": i, **{n: float(result.values[n][j]) for n in present}}
            for j, (f, i) in enumerate(zip(result.files, result.indices))]


def table1(results: Sequence[ev.Result], nets: ev.MetricNets, meta: dict) -> Table:
    rows, per_image = [], []
    for r in results:
        rows.append({"dataset": r.dataset.name, "n": r.n,
                     **{c.key: _cell(r, c.key, nets, _role(c.key)) for c in T1_COLUMNS}})
        per_image += _per_image(r, ev.VALUE_NAMES["table1"], {"dataset": r.dataset.name})
    notes = [*COMMON_NOTES,
             "cos: cosine similarity between E(X_anon) and E(X) (lower: better anonymization); "
             "L1: mean absolute difference of the unit embeddings (higher: better).",
             *_skip_notes(nets, ["adaface"])]
    return Table("table1", "Table 1: anonymization (identity similarity of X_anon to X)",
                 ["dataset"], T1_COLUMNS, rows, notes, meta, per_image)


def table2(results: Sequence[ev.Result], nets: ev.MetricNets, meta: dict) -> Table:
    rows, per_image = [], []
    for r in results:
        row = {"dataset": r.dataset.name, "n": r.n}
        for c in T2_COLUMNS[:-1]:
            row[c.key] = _cell(r, c.key, nets, "mtcnn",
                               na="no image has a face detected in both the original and the anonymized image")
        if nets.skipped("inception"):
            row["fid"] = {"skipped": nets.skipped("inception")}
        else:
            row["fid"] = dict(r.fid)
        rows.append(row)
        per_image += _per_image(r, ev.VALUE_NAMES["table2"], {"dataset": r.dataset.name})
    notes = [*COMMON_NOTES,
             "MTCNN (facenet-pytorch's detector and thresholds) on the original and on the anonymized "
             "image; the largest face of each. detected: share of images with a face. box / landmark "
             "L1: mean absolute difference in pixels (256 px crops) over the 4 box coordinates / the "
             "10 landmark coordinates, over the images with a face in both (count in the CSV's _n).",
             "FID: pytorch-fid's Frechet distance between Inception pool3 features of the anonymized "
             "and of the original images of the dataset; it is biased upwards for small sets "
             "(reported with thousands of images in the paper).",
             *_skip_notes(nets, ["mtcnn", "inception"])]
    return Table("table2", "Table 2: utility (face detection and image quality of X_anon)",
                 ["dataset"], T2_COLUMNS, rows, notes, meta, per_image)


def table3(results: Sequence[ev.Result], nets: ev.MetricNets, meta: dict) -> Table:
    rows, per_image = [], []
    for r in results:
        for prefix, label in (("rec", "right"), ("wrong", "wrong")):
            rows.append({"dataset": r.dataset.name, "key": label, "n": r.n,
                         **{c.key: _cell(r, f"{prefix}_{c.key}", nets, _role(c.key)) for c in T3_COLUMNS}})
        per_image += _per_image(r, ev.VALUE_NAMES["table3"], {"dataset": r.dataset.name})
    notes = [*COMMON_NOTES,
             "X_rec = recover(X_anon, k) with the right key, and with a wrong key (another seeded "
             "key per image); every metric compares it with the original X. Arrows are for the "
             "right key; with a wrong key, recovery should fail (low cosine).",
             "PSNR is the mean of the per-image PSNRs (scikit-image's definition, data range 1); "
             "SSIM: 11x11 Gaussian window, sigma 1.5; LPIPS: the converted --lpips network "
             "(v0.1 lin weights) on [-1, 1] inputs.",
             *_skip_notes(nets, ["adaface", "lpips"])]
    return Table("table3", "Table 3: de-anonymization (X_rec against X)", ["dataset", "key"],
                 T3_COLUMNS, rows, notes, meta, per_image)


def table4(results: Sequence[ev.Result], nets: ev.MetricNets, meta: dict) -> Table:
    k = meta["settings"]["div_keys"]
    rows, per_image = [], []
    for r in results:
        rows.append({"dataset": r.dataset.name, "keys": k, "n": r.n,
                     **{c.key: _cell(r, c.key, nets, _role(c.key)) for c in T4_COLUMNS}})
        per_image += _per_image(r, ev.VALUE_NAMES["table4"], {"dataset": r.dataset.name})
    notes = [*COMMON_NOTES,
             f"Each image anonymized under K = {k} keys (the first is Table 1's). mean cos: the mean "
             "pairwise cosine between the K anonymized identities (lower: more diverse).",
             "KFFA is not defined in any source we found; we report the mean pairwise angle, in "
             "degrees, between the ArcFace (AdaFace) embeddings of the K anonymized faces "
             "(ifadit_jax.metrics.kffa; the paper's values, 20-75, fit degrees).",
             *_skip_notes(nets, ["adaface"])]
    return Table("table4", "Table 4: diversity (one face under several keys)", ["dataset", "keys"],
                 T4_COLUMNS, rows, notes, meta, per_image)


def table5(results: dict[str, Sequence[ev.Result]], nets: ev.MetricNets, meta: dict) -> Table:
    rows, per_image = [], []
    for variant, rs in results.items():
        for r in rs:
            rows.append({"variant": variant, "dataset": r.dataset.name, "n": r.n,
                         **{c.key: _cell(r, c.key, nets, _role(c.key)) for c in T5_COLUMNS}})
            per_image += _per_image(r, ev.VALUE_NAMES["table1"] + ev.VALUE_NAMES["table3"]
                                    + ev.VALUE_NAMES["table4"], {"variant": variant, "dataset": r.dataset.name})
    notes = [*COMMON_NOTES,
             "One row per ablation weights folder (full, no_div: without L_Div, no_img: without "
             "L_Img, no_icl: without ICL, single_phase: without the dual-phase training), all with "
             "the same images and the same seeded keys. Columns: Table 1 (anon.), Table 3 right "
             "key (rec.) and wrong key, Table 4 (div.). ArcFace: each folder's own E_ID (frozen "
             "in training, so the same network) unless --arcface.",
             *_skip_notes(nets, ["adaface", "lpips"])]
    return Table("table5", "Table 5: ablations", ["variant", "dataset"], T5_COLUMNS, rows, notes,
                 meta, per_image)


# ----------------------------------------------------------------------------------------------
# Sample grids

TILE = 160
CAPTION = 14
HEADER = 18


def _box_on_tile(box, scale: float, size: int) -> list[float] | None:
    """`box` (x0, y0, x1, y1) in image pixels -> the rectangle to draw on a `size` tile, or None.

    A detector (the demo's random one above all) can return corners in either order, boxes
    partly or wholly outside the image, or NaN; Pillow refuses x1 < x0, so the corners are
    ordered and clipped to the tile, and a box with nothing left inside is not drawn."""
    b = np.asarray(box, np.float64).reshape(-1)
    if b.shape != (4,) or not np.all(np.isfinite(b)):
        return None
    x0, x1 = sorted(np.clip(b[[0, 2]] * scale, 0.0, size - 1.0))
    y0, y1 = sorted(np.clip(b[[1, 3]] * scale, 0.0, size - 1.0))
    return None if x0 == x1 or y0 == y1 else [float(x0), float(y0), float(x1), float(y1)]


def _tile(img: np.ndarray, size: int, detection=None) -> Image.Image:
    tile = Image.fromarray(imageio.to_uint8(img)).resize((size, size), Image.LANCZOS)
    if detection is not None:
        box, lm = detection
        s = size / img.shape[0]
        draw = ImageDraw.Draw(tile)
        rect = _box_on_tile(box, s, size)
        if rect is not None:
            draw.rectangle(rect, outline=(0, 255, 0), width=2)
        for x, y in np.asarray(lm, np.float64).reshape(-1, 2):
            # Points off the tile or NaN (random detectors) are not drawn.
            if np.isfinite(x) and np.isfinite(y) and 0 <= x * s < size and 0 <= y * s < size:
                draw.ellipse([x * s - 2, y * s - 2, x * s + 2, y * s + 2], fill=(255, 0, 0))
    return tile


def grid(title: str, headers: Sequence[str], rows: Sequence[Sequence[tuple]], tile: int = TILE) -> Image.Image:
    """rows: per row, per column (image [S, S, 3] in [0, 1], caption, detection or None)."""
    ncol = max([len(headers)] + [len(r) for r in rows])
    row_h = tile + CAPTION
    canvas = Image.new("RGB", (max(ncol * tile, 480), 2 * HEADER + len(rows) * row_h), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 3), title, fill="black")
    for j, h in enumerate(headers):
        draw.text((j * tile + 4, HEADER + 3), h, fill="black")
    for i, row in enumerate(rows):
        y = 2 * HEADER + i * row_h
        for j, (img, caption, det) in enumerate(row):
            canvas.paste(_tile(img, tile, det), (j * tile, y))
            draw.text((j * tile + 3, y + tile + 1), caption[:28], fill="black")
    return canvas


def _fmt(v) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"


def sample_grid(name: str, results: Sequence[ev.Result] | dict, title: str) -> Image.Image:
    """The sample grid of table `name` (for table5, `results` maps variant -> results)."""
    rows = []
    if name == "table5":
        headers = ["original", "anonymized", "recovered", "wrong key", "2nd key"]
        for variant, rs in results.items():
            r = rs[0]
            if not r.samples.get("original"):
                continue
            sm = r.samples
            rows.append([(sm["original"][0], f"{variant}: {r.files[0]}", None),
                         (sm["anonymized"][0], f"cos {_fmt(r.values['anon_cos_arcface'][0])}", None),
                         (sm["recovered"][0], f"cos {_fmt(r.values['rec_cos_arcface'][0])}", None),
                         (sm["wrong_key"][0], f"cos {_fmt(r.values['wrong_cos_arcface'][0])}", None),
                         (sm["diversity"][0][1], "", None)])
        return grid(title, headers, rows)
    for r in results:
        sm = r.samples
        for i, orig in enumerate(sm.get("original", [])):
            label = f"{r.dataset.name}/{r.files[i]}"
            v = r.values
            if name == "table1":
                headers = ["original", "anonymized (key 1)"]
                rows.append([(orig, label, None),
                             (sm["anonymized"][i], f"ArcFace cos {_fmt(v['anon_cos_arcface'][i])}", None)])
            elif name == "table2":
                headers = ["original + MTCNN", "anonymized + MTCNN"]
                if "det_original" in sm:  # MTCNN given
                    d_o, d_a = sm["det_original"][i], sm["det_anonymized"][i]
                    rows.append([(orig, label + ("" if d_o is not None else " (no face)"), d_o),
                                 (sm["anonymized"][i], "face" if d_a is not None else "no face", d_a)])
                else:
                    rows.append([(orig, label, None), (sm["anonymized"][i], "MTCNN skipped", None)])
            elif name == "table3":
                headers = ["original", "anonymized", "recovered", "recovered, wrong key"]
                rows.append([(orig, label, None), (sm["anonymized"][i], "", None),
                             (sm["recovered"][i], f"PSNR {_fmt(v['rec_psnr'][i])}", None),
                             (sm["wrong_key"][i], f"PSNR {_fmt(v['wrong_psnr'][i])}", None)])
            elif name == "table4":
                k = len(sm["diversity"][i])
                headers = ["original", *(f"key {j + 1}" for j in range(k))]
                rows.append([(orig, label, None)] + [(sm["diversity"][i][j], "", None) for j in range(k)])
    return grid(title, headers if rows else ["(no samples)"], rows)


# ----------------------------------------------------------------------------------------------
# Writing


def output_paths(out_dir: str, name: str) -> list[str]:
    return [os.path.join(out_dir, name + s) for s in SUFFIXES]


def check_outputs(out_dir: str, names: Sequence[str], force: bool) -> None:
    """Refuses before any work if a table would overwrite earlier results (unless `force`)."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise InputError(f"output directory's parent does not exist: {parent}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"output is not a folder: {out_dir}")
    if not force:
        existing = [p for n in names for p in output_paths(out_dir, n) if os.path.exists(p)]
        if existing:
            raise InputError(f"output exists, not overwriting (use --force): {existing[0]}")


def write(table: Table, image: Image.Image, out_dir: str) -> list[str]:
    """Writes the five files of `table` atomically; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    md, csv_path, per_image, js, png = output_paths(out_dir, table.name)
    texts = {md: table.markdown() + "\n" + settings_markdown(table.meta), csv_path: table.csv(),
             per_image: table.per_image_csv(), js: ev.to_json(table.to_dict()) + "\n"}
    for path, text in texts.items():
        with atomic_path(path) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
    with atomic_path(png) as tmp:
        image.save(tmp, format="PNG")
    return [md, csv_path, per_image, js, png]


def settings_markdown(meta: dict) -> str:
    """The run's settings under the table: weights, datasets, keys, networks."""
    lines = ["### Settings", ""]
    for w in meta.get("pipelines", []):
        lines.append(f"- weights: `{w['source']}` (id {w['weights_id']}, {w['conventions']} "
                     f"conventions{'' if w['icl'] else ', no ICL'}){' — ' + w['variant'] if 'variant' in w else ''}")
    for d in meta.get("datasets", []):
        lines.append(f"- images `{d['name']}`: {d['root']} ({d['layout']}, split {d['split']}, "
                     f"{d['evaluated']} evaluated of {d['listed']} listed"
                     f"{', ' + str(d['no_face']) + ' without a face' if d.get('no_face') else ''})")
    k = meta.get("keys", {})
    lines.append(f"- keys: {k.get('path')} path, seed {k.get('seed')}"
                 + (f", Argon2id {k['kdf']['memory_cost']} KiB x {k['kdf']['iterations']}" if "kdf" in k else ""))
    s = meta.get("settings", {})
    lines.append("- settings: " + ", ".join(f"{a} {b}" for a, b in sorted(s.items())))
    for role, src in sorted(meta.get("metric_networks", {}).items()):
        desc = (src.get("source_file") or src.get("file") or src.get("pipeline")
                or ("random weights (demo)" if "random_seed" in src else src.get("skipped", "")))
        lines.append(f"- {role}: {desc}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# One call from settings to written tables (the CLI and the notebook use it)

BUILDERS = {"table1": table1, "table2": table2, "table3": table3, "table4": table4}
DEMO_NOTE = ("DEMO: the networks have RANDOM weights (built-in demo or test fixtures); these numbers "
             "test the machinery and mean nothing.")


def _evaluate_all(names, pipes, datasets, nets, key_scheme, settings,
                  progress: bool) -> dict[str, list[ev.Result]]:
    """variant -> one Result per dataset, computing once what all `names` need."""
    needs = set().union(*(ev.NEEDS[n] for n in names))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pipes) * sum(len(d.files) for d in datasets), unit="image",
                   disable=None, leave=False)
    results: dict[str, list[ev.Result]] = {}
    for variant, pipe in pipes.items():
        results[variant] = []
        for d in datasets:
            done = [0]

            def step(n_done, done=done):
                if bar is not None:
                    bar.update(n_done - done[0])
                done[0] = n_done

            results[variant].append(ev.evaluate(pipe, nets, d, key_scheme, settings, needs, step))
    if bar is not None:
        bar.close()
    return results


def _run_meta(names, pipes, results, nets, key_scheme, settings, pipe_sources, command,
              demo: bool, seconds: float) -> dict:
    """What every table's JSON and settings section record about the run."""
    first = next(iter(results.values()))
    return {
        "command": command,
        "pipelines": [{**ev.describe_pipeline(p, (pipe_sources or {}).get(v, "")),
                       **({"variant": v} if "table5" in names else {})} for v, p in pipes.items()],
        "datasets": [{**r.dataset.describe(), "evaluated": r.n, "no_face": len(r.no_face),
                      "files_without_face": r.no_face} for r in first],
        "keys": {**key_scheme.to_dict(),
                 "u_sha256": {r.dataset.name: r.key_digests for r in first}},
        "settings": dataclasses.asdict(settings),
        "metric_networks": nets.sources,
        "seconds": {"total": round(seconds, 2),
                    **{f"{v}/{r.dataset.name}": round(r.seconds, 2) for v, rs in results.items() for r in rs}},
        "versions": {"ifadit_jax": getattr(ifadit_jax, "__version__", ""), "jax": jax.__version__,
                     "backend": jax.default_backend()},
        "demo": demo,
    }


def produce(names: Sequence[str], pipes: dict[str, Any], datasets: Sequence[ev.Dataset],
            nets: ev.MetricNets, key_scheme: ev.KeyScheme, settings: ev.Settings, *,
            pipe_sources: dict[str, str] | None = None, out_dir: str | None = None,
            command: str = "", demo: bool = False, progress: bool = True) -> dict[str, Table]:
    """Evaluates every pipeline on every dataset once (with what all `names` need) and builds
    the tables; writes them to `out_dir` if given.

    names: "table1".."table4" (with one pipeline) or "table5" (pipes: variant -> pipeline).
    """
    if "table5" in names and len(names) > 1:
        raise InputError("table5 is produced on its own (it takes the ablation folders)")
    if "table5" not in names and len(pipes) != 1:
        raise InputError("tables 1-4 evaluate one weights folder")
    t0 = time.perf_counter()
    results = _evaluate_all(names, pipes, datasets, nets, key_scheme, settings, progress)
    meta = _run_meta(names, pipes, results, nets, key_scheme, settings, pipe_sources, command,
                     demo, time.perf_counter() - t0)
    first = next(iter(results.values()))
    tables = {}
    for name in names:
        table = table5(results, nets, meta) if name == "table5" else BUILDERS[name](first, nets, meta)
        if demo:
            table.notes.insert(0, DEMO_NOTE)
        tables[name] = table
        if out_dir is not None:
            image = sample_grid(name, results if name == "table5" else first, table.title
                                + (" [DEMO: random weights]" if demo else ""))
            write(table, image, out_dir)
    return tables
