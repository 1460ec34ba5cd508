"""Converts the official iFADIT checkpoints (lixionga/ProFace, FacePrivacy/iFADIT) into ifadit-jax weights.

Usage:
  python ports/convert_ifadit.py inn    G_net_*.pth     OUT.safetensors   # SIF T (kind "sif")
  python ports/convert_ifadit.py mapper mlp_best.pth    OUT.safetensors   # LatentMapper M
  python ports/convert_ifadit.py icl    fuse_mlp_*.pth  OUT.safetensors   # FusionMapper10 C
  python ports/convert_ifadit.py release SRC_DIR OUT_DIR                  # all of them + manifest
Each takes --force to replace an OUT that this tool wrote (never anything else).

This is only the command line: the converters are `ports.ifadit.convert_inn`, `convert_mapper`
and `convert_icl` (plain functions, src -> (variables, meta)), and `ports.release` converts the
release folder with them.
"""

from __future__ import annotations

import argparse
from typing import Callable

from ifadit_jax import cli
from ports import common, ifadit, release


def _one_file(convert: Callable):
    """SRC OUT.safetensors [--force], written atomically (nothing is written on error)."""

    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("src", help="official checkpoint file")
        common.add_output_arguments(p)

    def run(args) -> int:
        return common.run_converter(convert, args.src, out=args.out, force=args.force,
                                    quiet=args.quiet)

    return add_arguments, run


# name -> (help, add_arguments(parser), run(args) -> exit code)
COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "release": ("the whole official release folder -> one weights folder (see ports/release.py)",
                release.add_arguments, release.run),
    "inn": ("identity INN / SIF T: G_net_*.pth -> kind 'sif'", *_one_file(ifadit.convert_inn)),
    "mapper": ("LatentMapper M: mlp_best.pth -> kind 'latent_mapper'",
               *_one_file(ifadit.convert_mapper)),
    "icl": ("FusionMapper10 (ICL, C): fuse_mlp_*.pth -> kind 'icl'", *_one_file(ifadit.convert_icl)),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert_ifadit.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(command)
        cli.add_common_arguments(command)
    return parser


def main(argv=None) -> None:
    parser = build_parser()

    def run(args_list):
        args = parser.parse_args(args_list)
        cli.setup(args)
        return COMMANDS[args.command][2](args)

    cli.run(run, argv)


if __name__ == "__main__":
    main()
