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
gives) and `manifest.json` with the conventions, each file's source name and sha256, and a
weights id derived from them. It is written to a temporary folder beside OUT_DIR and renamed
into place only when every network converted, so a failure leaves nothing behind.
"""

from __future__ import annotations

import argparse
import glob
import os

from ifadit_jax import pipeline, roles, weights_folder
from ifadit_jax.errors import InputError, WeightsError

SOURCES = {
    "attr_encoder": ("attr_best.pth",),
    "mapper": ("mlp_best.pth",),
    "flow": ("G_net_*.pth", "G_net.pth"),
    "icl": ("fuse_mlp_*.pth", "fuse_mlp.pth"),
    "generator": ("550000.pt",),
    "id_encoder": ("model_ir_se50.pth",),
    "parser": ("79999_iter.pth",),
}


def _converter(role: str):
    from ports import convert_arcface, convert_bisenet, convert_ifadit, convert_psp, convert_stylegan2

    return {
        "attr_encoder": lambda src: convert_psp.convert(argparse.Namespace(src=src, input_range="auto")),
        "mapper": lambda src: convert_ifadit.convert_mapper(argparse.Namespace(src=src)),
        "flow": lambda src: convert_ifadit.convert_inn(argparse.Namespace(src=src)),
        "icl": lambda src: convert_ifadit.convert_icl(argparse.Namespace(src=src)),
        "generator": convert_stylegan2.convert_file,
        "id_encoder": lambda src: convert_arcface.convert(argparse.Namespace(src=src)),
        "parser": lambda src: convert_bisenet.convert(argparse.Namespace(src=src)),
    }[role]


def find_sources(src_dir: str) -> dict[str, str]:
    """role -> path of its official file; one clear error listing everything missing."""
    if not os.path.isdir(src_dir):
        raise InputError(f"release folder not found: {src_dir}")
    found, missing = {}, []
    for role, patterns in SOURCES.items():
        matches = sorted({p for pattern in patterns for p in glob.glob(os.path.join(src_dir, pattern))})
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
    networks = {}
    for role, src in sources.items():
        name, kind = roles.ROLES[role].file, roles.ROLES[role].kind
        variables, meta = _converter(role)(src)
        if meta.kind != kind:
            raise WeightsError(f"{src}: converted to a '{meta.kind}' network, expected '{kind}'")
        networks[role] = (name, variables, meta)
    return weights_folder.write(out_dir, networks, pipeline.OFFICIAL.name, force=force)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src_dir", help="folder with the official files (attr_best.pth, mlp_best.pth, "
                                   "G_net_*.pth, fuse_mlp_*.pth, 550000.pt, model_ir_se50.pth, 79999_iter.pth)")
    p.add_argument("out_dir", help="output weights folder (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")


def run(args) -> int:
    manifest = convert_release(args.src_dir, args.out_dir, args.force)
    print(f"wrote {args.out_dir}: weights id {manifest['weights_id']}, "
          f"{len(manifest['files'])} networks, conventions '{manifest['conventions']}'")
    return 0
