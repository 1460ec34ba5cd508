"""The paper's tables from converted weights and image folders.

  python -m experiments.run TABLE --weights DIR --images [NAME=]DIR [...] --out OUT [options]
  python -m experiments.run table5 --ablation full=DIR --ablation no_icl=DIR ... --images ... --out OUT
  python -m experiments.run all --demo --out OUT        # built-in random-weight model, no download
  python -m experiments.run video --weights DIR --videos DIR --out OUT [--crf 18 --crf 28]

TABLE: table1 (anonymization), table2 (utility), table3 (de-anonymization), table4 (diversity),
all (tables 1-4 in one pass over the images), table5 (ablations), video (clips: identity
consistency, flicker, recovery through FFV1 and H.264, speed per stage; not part of all). Each
writes OUT/TABLE.md, .csv, _per_image.csv, .json and _samples.png. Metric networks that are not given are skipped and
the tables say so. See experiments/README.md for the expected image layouts.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Sequence

from experiments import evaluate as ev
from experiments import tables
from experiments import video as video_experiment
from ifadit_jax import cli, keys, pipeline
from ifadit_jax.errors import InputError

CHOICES = ("table1", "table2", "table3", "table4", "all", "table5", "video")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.run",
                                description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", choices=CHOICES)
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    src = p.add_argument_group("what to evaluate")
    src.add_argument("--weights", metavar="DIR", help="weights folder (ports/convert_ifadit.py release)")
    src.add_argument("--ablation", action="append", default=[], metavar="NAME=DIR",
                     help="table5: one weights folder per ablation (full, no_div, no_img, no_icl, "
                          "single_phase); repeat")
    src.add_argument("--demo", action="store_true",
                     help="the built-in model (random weights, small widths); random metric networks "
                          "for those not given; built-in faces if no --images; for table5 five "
                          "built-in variants")
    src.add_argument("--images", action="append", default=[], metavar="[NAME=]DIR",
                     help="a folder of aligned faces or an FFHQ* folder; repeat for several datasets")
    src.add_argument("--videos", metavar="DIR", help="video: a folder of clips (or one clip)")
    src.add_argument("--limit", type=int, help="evaluate the first N images of each dataset")
    src.add_argument("--split", choices=("all", "train", "val"), default="all",
                     help="the training code's deterministic 90/10 split (default: all images)")
    src.add_argument("--split-seed", type=int, default=0)
    src.add_argument("--align", action="store_true",
                     help="images are photos (e.g. LFW): align the largest MTCNN face to the FFHQ crop")
    m = p.add_argument_group("metric networks (converted .safetensors; missing ones are skipped)")
    for role, what in (("arcface", "an ArcFace for evaluation (default: the pipeline's E_ID)"),
                       ("adaface", "AdaFace (ports/convert_adaface.py)"),
                       ("lpips", "LPIPS (ports/convert_lpips.py; alex as the lpips package's default)"),
                       ("inception", "FID Inception (ports/convert_inception.py)"),
                       ("mtcnn", "MTCNN (ports/convert_mtcnn.py; default WEIGHTS/mtcnn.safetensors)")):
        m.add_argument(f"--{role}", metavar="FILE", help=what)
    m.add_argument("--metrics", metavar="DIR", help="folder with " + ", ".join(ev.METRIC_FILES.values()))
    r = p.add_argument_group("run")
    r.add_argument("--batch", type=int, default=4, help="images per batch (default 4)")
    r.add_argument("--seed", type=int, default=0, help="key seed (default 0)")
    r.add_argument("--div-keys", type=int, default=5, help="keys per face for Table 4 (default 5)")
    r.add_argument("--samples", type=int, default=4, help="rows of each sample grid (default 4)")
    r.add_argument("--crf", type=int, action="append", metavar="N",
                   help="video: H.264 quality to recover through; repeat (default 18 and 28)")
    r.add_argument("--no-refine", action="store_true", help="skip the face-mask blending (Eq. 11)")
    r.add_argument("--quantize", action="store_true",
                   help="recover from X_anon stored as 8-bit values (as a saved PNG)")
    r.add_argument("--key-path", choices=("vector", "kdf"),
                   help="k = f(u) from seeded vectors (official) or from seeded secrets through "
                        "Argon2id (paper); default: the weights' conventions")
    r.add_argument("--kdf-memory-kib", type=int, default=keys.KdfParams().memory_cost)
    r.add_argument("--kdf-iterations", type=int, default=keys.KdfParams().iterations)
    r.add_argument("--kdf-salt", metavar="HEX", help="Argon2id salt (default: the project's public salt)")
    r.add_argument("--force", action="store_true", help="overwrite existing tables in OUT")
    cli.add_common_arguments(p)  # --quiet: no progress bar, no table on stdout
    return p


def _pipelines(args) -> tuple[dict[str, pipeline.Pipeline], dict[str, str]]:
    if args.table == "table5":
        if args.weights:
            raise InputError("table5 takes --ablation NAME=DIR folders, not --weights")
        if args.demo:
            if args.ablation:
                raise InputError("give either --demo or --ablation folders")
            base = ev.demo_pipeline(seed=0)
            pipes = ev.demo_ablations(base)
            return pipes, {v: f"built-in demo ({v}, random weights)" for v in pipes}
        if not args.ablation:
            raise InputError("table5 needs --ablation NAME=DIR for each ablation (or --demo)")
        pipes, where = {}, {}
        for spec in args.ablation:
            name, path = spec.split("=", 1) if "=" in spec else (os.path.basename(os.path.normpath(spec)), spec)
            if name in pipes:
                raise InputError(f"ablation name {name!r} given twice")
            pipes[name], where[name] = pipeline.load(path), os.path.abspath(path)
        return pipes, where
    if args.ablation:
        raise InputError("--ablation is for table5")
    if args.weights and args.demo:
        raise InputError("give either --weights or --demo")
    if args.weights:
        return {"model": pipeline.load(args.weights)}, {"model": os.path.abspath(args.weights)}
    if args.demo:
        return {"model": ev.demo_pipeline(seed=0)}, {"model": "built-in demo (random weights)"}
    raise InputError("give --weights DIR (a converted release) or --demo")


def _kdf(args) -> keys.KdfParams:
    fields = {"memory_cost": args.kdf_memory_kib, "iterations": args.kdf_iterations}
    if args.kdf_salt:
        try:
            fields["salt"] = bytes.fromhex(args.kdf_salt)
        except ValueError:
            raise InputError("--kdf-salt must be hexadecimal") from None
    return keys.KdfParams(**fields)


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    cli.setup(args)
    names = list(ev.TABLES) if args.table == "all" else [args.table]
    settings = ev.Settings(batch=args.batch, refine=not args.no_refine, quantize=args.quantize,
                           div_keys=args.div_keys, samples=args.samples)
    if args.limit is not None and args.limit < 1:
        raise InputError("--limit must be at least 1")
    kdf = _kdf(args)
    if args.table == "video":
        return video_experiment.main(args, "python -m experiments.run " + shlex.join(argv), kdf)
    # Everything that can fail is checked before any evaluation runs.
    tables.check_outputs(args.out, names, args.force)
    datasets = [ev.open_dataset(spec, limit=args.limit, split=args.split, split_seed=args.split_seed,
                                align_faces=args.align) for spec in args.images]
    if not datasets:
        if not args.demo:
            raise InputError("give --images [NAME=]DIR (or --demo for the built-in faces)")
        datasets = [ev.demo_dataset(args.limit or 4)]
    names_seen = [d.name for d in datasets]
    if len(set(names_seen)) != len(names_seen):
        raise InputError(f"two datasets share a name ({names_seen}); name them: --images NAME=DIR")
    files = {role: getattr(args, role) for role in ev.METRIC_ROLES}
    if files["mtcnn"] is None and args.weights:
        default = os.path.join(args.weights, "mtcnn.safetensors")
        files["mtcnn"] = default if os.path.isfile(default) else None
    nets = ev.load_metric_nets(files, args.metrics, demo=args.demo)
    pipes, where = _pipelines(args)
    first = next(iter(pipes.values()))
    key_scheme = ev.KeyScheme(path=args.key_path or first.conventions.key_path, seed=args.seed, kdf=kdf)
    command = "python -m experiments.run " + shlex.join(argv)
    made = tables.produce(names, pipes, datasets, nets, key_scheme, settings, pipe_sources=where,
                          out_dir=args.out, command=command, demo=args.demo, progress=not args.quiet)
    for name, table in made.items():
        if not args.quiet:
            print(table.markdown())
        print(f"wrote {', '.join(os.path.basename(p) for p in tables.output_paths(args.out, name))} "
              f"in {args.out}", file=sys.stderr if args.quiet else sys.stdout)
    return 0


if __name__ == "__main__":
    cli.run(main)
