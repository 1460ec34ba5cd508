"""Converts an LPIPS network (richzhang/PerceptualSimilarity) into ifadit-jax weights.

LPIPS has two official weight files: the trunk (torchvision `alexnet`/`vgg16` weights, e.g.
`alexnet-owt-7be5be79.pth` or `vgg16-397923af.pth`; only `features.*` is used) and the linear
layers (`lpips/weights/v0.1/alex.pth` or `vgg.pth`, keys `lin{l}.model.1.weight`). A whole LPIPS
`state_dict` (trunk as `net.slice{k}.{i}.*`) is accepted for either. A DataParallel `module.`
prefix is stripped.

Usage: python ports/convert_lpips.py --net alex|vgg --trunk TRUNK.pth --lin LIN.pth OUT.safetensors [--force]
"""

from __future__ import annotations

import argparse
import os
import re

import numpy as np

from ifadit_jax import cli, weights
from ifadit_jax.errors import IfaditError, WeightsError
from ifadit_jax.nets import lpips as lp
from ports import common

_SLICE_KEY = re.compile(r"^net\.slice\d+\.(\d+)\.(weight|bias)$")
_LIN_KEY = re.compile(r"^lin(\d+)\.model\.1\.weight$")


def _flat(path: str) -> dict[str, np.ndarray]:
    return common.state_dict(path, "LPIPS trunk or lin layers")


def trunk_state(path: str, net: str) -> dict[str, np.ndarray]:
    """`features.{i}.{weight,bias}` of the trunk; LPIPS' `net.slice{k}.{i}.*` is renamed to that."""
    state = {}
    for k, v in _flat(path).items():
        m = _SLICE_KEY.match(k)
        state[f"features.{m.group(1)}.{m.group(2)}" if m else k] = v
    found = sorted(int(k.split(".")[1]) for k in state
                   if re.fullmatch(r"features\.\d+\.weight", k))
    expected = lp.conv_indices(net)
    if found != expected:
        raise WeightsError(
            f"{path}: trunk has convolutions at features.{found or '[]'}, but --net {net} expects "
            f"features.{expected} (torchvision {'alexnet' if net == 'alex' else 'vgg16'}; "
            "is --net right?)")
    return state


def _is_not_trunk(k: str) -> bool:
    return k.startswith(("classifier.", "lin", "scaling_layer."))


def _is_not_lin(k: str) -> bool:
    return k.startswith(("features.", "classifier.", "net.", "lins.", "scaling_layer."))


def rules(net: str) -> list[common.Rule]:
    out: list[common.Rule] = []
    for i in lp.conv_indices(net):
        out += [(f"features.{i}.weight", f"params/features_{i}/kernel", common.conv),
                (f"features.{i}.bias", f"params/features_{i}/bias", common.same)]
    return out


def lin_rules(n_lins: int = 5) -> list[common.Rule]:
    return [(f"lin{l}.model.1.weight", f"params/lin{l}/kernel", common.conv) for l in range(n_lins)]


def convert(trunk: str, *, lin: str, net: str, version: str = "0.1") -> tuple[dict, weights.Meta]:
    """LPIPS from its two files (`trunk` is the converter's SRC) -> (variables, meta) of kind
    "lpips"; `net` is "alex" or "vgg"."""
    if net not in lp.STAGES or version not in lp.VERSIONS:
        raise IfaditError(f"net must be one of {sorted(lp.STAGES)} and version one of "
                          f"{list(lp.VERSIONS)}")
    trunk_sd = trunk_state(trunk, net)
    lin_sd = _flat(lin)
    if not any(_LIN_KEY.match(k) for k in lin_sd):
        raise WeightsError(f"{lin}: no 'lin{{l}}.model.1.weight' keys (is this an LPIPS "
                           "linear-layer file, e.g. lpips/weights/v0.1/alex.pth?)")
    widths = [int(np.shape(trunk_sd[f"features.{i}.weight"])[0]) for i in lp.conv_indices(net)]
    config = {"net": net, "widths": widths, "version": version}
    common.check_config(config, trunk)
    variables = common.apply_table(trunk_sd, rules(net), trunk, ignore=_is_not_trunk)
    lins = common.apply_table(lin_sd, lin_rules(), lin, ignore=_is_not_lin)
    variables["params"].update(lins["params"])
    module = lp.LPIPS(net=net, widths=tuple(widths), version=version)
    expected = common.expected_variables(module, (1, 64, 64, 3), (1, 64, 64, 3))
    return common.finish(variables, expected, src=trunk, kind="lpips", config=config,
                         what=f"{trunk} + {lin}", lin_file=os.path.basename(lin),
                         lin_sha256=weights.sha256_file(lin))


def main(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", required=True, choices=sorted(lp.STAGES), help="trunk network")
    parser.add_argument("--trunk", required=True, help="torchvision alexnet/vgg16 state dict")
    parser.add_argument("--lin", required=True, help="LPIPS linear layers, e.g. weights/v0.1/alex.pth")
    parser.add_argument("--lpips-version", default="0.1", choices=lp.VERSIONS,
                        help="LPIPS version of the lin weights (0.1 uses the scaling layer)")
    common.add_output_arguments(parser)
    cli.add_common_arguments(parser)  # its --version is this tool's
    args = parser.parse_args(argv)
    cli.setup(args)
    return common.run_converter(convert, args.trunk, out=args.out, force=args.force,
                                quiet=args.quiet, inputs=[args.trunk, args.lin], lin=args.lin,
                                net=args.net, version=args.lpips_version)


if __name__ == "__main__":
    cli.run(main)
