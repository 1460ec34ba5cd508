"""Converts an LPIPS network (richzhang/PerceptualSimilarity) into ifadit-jax weights.

LPIPS has two official weight files: the trunk (torchvision `alexnet`/`vgg16` weights, e.g.
`alexnet-owt-7be5be79.pth` or `vgg16-397923af.pth`; only `features.*` is used) and the linear
layers (`lpips/weights/v0.1/alex.pth` or `vgg.pth`, keys `lin{l}.model.1.weight`). A whole LPIPS
`state_dict` (trunk as `net.slice{k}.{i}.*`) is accepted for either. A DataParallel `module.`
prefix is stripped.

Usage: python ports/convert_lpips.py --net alex|vgg --trunk TRUNK.pth --lin LIN.pth OUT.safetensors
"""

from __future__ import annotations

import argparse
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from ifadit_jax import cli, weights
from ifadit_jax.errors import InputError, WeightsError
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


def convert(args) -> tuple[dict, weights.Meta]:
    trunk = trunk_state(args.trunk, args.net)
    lin = _flat(args.lin)
    if not any(_LIN_KEY.match(k) for k in lin):
        raise WeightsError(f"{args.lin}: no 'lin{{l}}.model.1.weight' keys (is this an LPIPS "
                           "linear-layer file, e.g. lpips/weights/v0.1/alex.pth?)")
    widths = [int(trunk[f"features.{i}.weight"].shape[0]) for i in lp.conv_indices(args.net)]
    config = {"net": args.net, "widths": widths, "version": args.version}
    variables = common.apply_table(trunk, rules(args.net), args.trunk, ignore=_is_not_trunk)
    lins = common.apply_table(lin, lin_rules(), args.lin, ignore=_is_not_lin)
    variables["params"].update(lins["params"])
    module = lp.LPIPS(net=args.net, widths=tuple(config["widths"]), version=args.version)
    dummy = jnp.zeros((1, 64, 64, 3), jnp.float32)
    expected = jax.eval_shape(module.init, jax.random.key(0), dummy, dummy)
    weights.check_tree(expected, variables, f"{args.trunk} + {args.lin}")
    meta = common.meta_for(args.trunk, "lpips", config, lin_file=os.path.basename(args.lin),
                           lin_sha256=weights.sha256_file(args.lin))
    return variables, meta


def main(argv) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", required=True, choices=sorted(lp.STAGES), help="trunk network")
    parser.add_argument("--trunk", required=True, help="torchvision alexnet/vgg16 state dict")
    parser.add_argument("--lin", required=True, help="LPIPS linear layers, e.g. weights/v0.1/alex.pth")
    parser.add_argument("--version", default="0.1", choices=lp.VERSIONS,
                        help="LPIPS version of the lin weights (0.1 uses the scaling layer)")
    parser.add_argument("out", help="output .safetensors file")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    if not os.path.isdir(os.path.dirname(out)):
        raise InputError(f"output directory does not exist: {os.path.dirname(out)}")
    if out in (os.path.abspath(args.trunk), os.path.abspath(args.lin)):
        raise InputError("output would overwrite an input checkpoint")
    variables, meta = convert(args)
    weights.save(args.out, variables, meta)
    n = sum(int(np.prod(np.shape(v))) for v in weights.flatten(variables).values())
    print(f"wrote {args.out}: {meta.kind}, {n:,} values, config {meta.config}")


if __name__ == "__main__":
    cli.run(main)
