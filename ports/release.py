"""Converts the official iFADIT release folder into one ifadit-jax weights folder.

`python ports/convert_ifadit.py release SRC_DIR OUT_DIR` (this module does the work). SRC_DIR
holds the files the official test script loads, under their official names:

| role | official file | network |
|---|---|---|
| attribute encoder E_Attr | `attr_best.pth` | pSp GradualStyleEncoder (whole pSp state dict) |
| latent mapper M | `mlp_best.pth` | LatentMapper |
| secure identity flow T | `G_net_*.pth` (exactly one) | FrEIA SequenceINN of AllInOneBlocks |
| identity compensation C | `fuse_mlp_*.pth` (exactly one) | FusionMapper10 |
| generator G and f | `550000.pt` | rosinality StyleGAN2 256 px |
| identity encoder E_ID | `model_ir_se50.pth` | IR-SE50 ArcFace |
| face parser (refinement) | `79999_iter.pth` | BiSeNet |

OUT_DIR receives one `.safetensors` file per network (the names `ifadit_jax.roles.ROLES`
gives) and `manifest.json` with the conventions, each file's sha256 and its source's name and
sha256, and a weights id derived from the tensors. `ifadit_jax.weights_folder.write` builds it
beside OUT_DIR and moves it into place only when every network converted, so a failure leaves
nothing behind; `--force` replaces only a folder this tool wrote and never one that is, holds or
lies inside SRC_DIR.
"""

from __future__ import annotations

import argparse
import glob
import os
from typing import Callable

from ifadit_jax import pipeline, roles, weights_folder
from ifadit_jax.errors import InputError, WeightsError
from ports import common, convert_arcface, convert_bisenet, convert_psp, convert_stylegan2, ifadit

SOURCES = {
    "attr_encoder": ("attr_best.pth",),
    "mapper": ("mlp_best.pth",),
    "flow": ("G_net_*.pth", "G_net.pth"),
    "icl": ("fuse_mlp_*.pth", "fuse_mlp.pth"),
    "generator": ("550000.pt",),
    "id_encoder": ("model_ir_se50.pth",),
    "parser": ("79999_iter.pth",),
}


# role -> the converter function (src -> (variables, meta)) for its official file.
CONVERTERS: dict[str, Callable] = {
    "attr_encoder": convert_psp.convert,  # input range "auto": [0, 1] for the bare attr_best.pth
    "mapper": ifadit.convert_mapper,
    "flow": ifadit.convert_inn,
    "icl": ifadit.convert_icl,
    "generator": convert_stylegan2.convert,
    "id_encoder": convert_arcface.convert,
    "parser": convert_bisenet.convert,
}


def find_sources(src_dir: str) -> dict[str, str]:
    """role -> path of its official file; one clear error listing everything missing."""
    if not os.path.isdir(src_dir):
        raise InputError(f"release folder not found: {src_dir}")
    found, missing = {}, []
    for role, patterns in SOURCES.items():
        matches = sorted({p for pattern in patterns for p in glob.glob(os.path.join(glob.escape(src_dir), pattern))})
        if len(matches) > 1:
            names = ", ".join(os.path.basename(m) for m in matches)
            raise InputError(f"{src_dir}: several candidates for the {role} ({names}); keep one")
        if not matches:
            missing.append(patterns[0])
        else:
            found[role] = matches[0]
    if missing:
        raise InputError(f"{src_dir}: missing official file(s) {', '.join(missing)} "
                         "(see README 'Official iFADIT release')")
    return found


def convert_release(src_dir: str, out_dir: str, force: bool = False) -> dict:
    """Converts every official file and writes OUT_DIR atomically. Returns the manifest."""
    sources = find_sources(src_dir)
    protected = [src_dir, *sources.values()]
    # Refuse a bad OUT before minutes of conversion; `write` checks again before replacing.
    weights_folder.check_target(os.path.abspath(out_dir), force=force, sources=protected)
    networks = {}
    for role, src in sources.items():
        name, kind = roles.ROLES[role].file, roles.ROLES[role].kind
        variables, meta = common.guarded_convert(CONVERTERS[role], src)
        if meta.kind != kind:
            raise WeightsError(f"{src}: converted to a '{meta.kind}' network, expected '{kind}'")
        networks[role] = (name, variables, meta)
    return weights_folder.write(out_dir, networks, pipeline.OFFICIAL.name, force=force,
                                sources=protected)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src_dir", help="folder with the official files (attr_best.pth, mlp_best.pth, "
                                   "G_net_*.pth, fuse_mlp_*.pth, 550000.pt, model_ir_se50.pth, 79999_iter.pth)")
    p.add_argument("out_dir", help="output weights folder (must not exist unless --force)")
    p.add_argument("--force", action="store_true",
                   help="replace OUT_DIR if it is a weights folder this tool wrote (nothing else)")


def run(args) -> int:
    manifest = convert_release(args.src_dir, args.out_dir, args.force)
    if not args.quiet:
        print(f"wrote {args.out_dir}: weights id {manifest['weights_id']}, "
              f"{len(manifest['files'])} networks, conventions '{manifest['conventions']}'")
    return 0
