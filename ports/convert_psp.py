"""Converts a pixel2style2pixel GradualStyleEncoder into ifadit-jax weights of kind "psp_encoder".

Usage: python ports/convert_psp.py [--input-range=auto|0,1|-1,1] SRC OUT.safetensors [--force]

SRC is either
  (a) a pSp training checkpoint {state_dict (encoder.*, decoder.*), latent_avg, opts}
      (e.g. `psp_ffhq_encode.pt`), or
  (b) a bare pSp state dict with `encoder.*` (and `decoder.*`) keys (iFADIT's `attr_best.pth`).
Only the `encoder.*` tensors are converted (the decoder is a StyleGAN2 generator: use
ports/convert_stylegan2.py); `latent_avg` is kept when present, and `opts.start_from_latent_avg`
(false without opts, as in iFADIT) is recorded. Widths, n_styles and w_dim come from the shapes.

--input-range says what the weights were trained on (the converted network always takes [-1, 1]
images and maps them there): auto = [-1, 1] for (a) (pSp normalizes its inputs), [0, 1] for (b)
(the official iFADIT code feeds [0, 1] images to attr_best.pth).
"""

from __future__ import annotations

import argparse
import re

import numpy as np

from ifadit_jax import weights
from ifadit_jax.errors import IfaditError, WeightsError
from ifadit_jax.nets import irse, psp
from ports import common
from ports.convert_arcface import body_config, body_rules, not_batch_counter
from ports.reader import flatten_state_dict, read_checkpoint

RANGES = {"0,1": psp.UNIT, "-1,1": psp.SIGNED}


def read_psp(path: str) -> tuple[dict[str, np.ndarray], np.ndarray | None, dict | None]:
    """-> (encoder state dict without the `encoder.` prefix, latent_avg or None, opts or None)."""
    tree = read_checkpoint(path)
    if not isinstance(tree, dict):
        raise WeightsError(f"{path}: expected a pSp checkpoint or state dict, got {type(tree).__name__}")
    latent_avg, opts = None, None
    if isinstance(tree.get("state_dict"), dict):
        latent_avg, opts = tree.get("latent_avg"), tree.get("opts")
        tree = tree["state_dict"]
    state = {k[len("encoder."):]: v for k, v in flatten_state_dict(tree).items()
             if k.startswith("encoder.")}
    if not state:
        raise WeightsError(f"{path}: no encoder.* tensors; not a pSp checkpoint (for a bare IR-SE50 "
                           "ArcFace use ports/convert_arcface.py)")
    if opts is not None and not isinstance(opts, dict):
        opts = vars(opts) if hasattr(opts, "__dict__") else None
    return state, (None if latent_avg is None else np.asarray(latent_avg, np.float32)), opts


def infer_config(state: dict, what: str, opts: dict | None) -> dict:
    if opts and opts.get("encoder_type", "GradualStyleEncoder") != "GradualStyleEncoder":
        raise WeightsError(f"{what}: encoder_type {opts['encoder_type']!r} is not supported "
                           "(only GradualStyleEncoder)")
    config = body_config(state, what)
    if config["units"] != list(irse.STAGE_UNITS[50]):
        raise WeightsError(f"{what}: GradualStyleEncoder needs the IR-SE50 body (24 units), "
                           f"got {sum(config['units'])}")
    n_styles = len({k.split(".")[1] for k in state if re.match(r"styles\.\d+\.linear\.weight$", k)})
    if n_styles == 0:
        raise WeightsError(f"{what}: no styles.*.linear.weight; not a GradualStyleEncoder")
    if opts and "n_styles" in opts and int(opts["n_styles"]) != n_styles:
        raise WeightsError(f"{what}: {n_styles} style blocks but opts.n_styles = {opts['n_styles']}")
    w_dim, style_width = (int(d) for d in common.require(state, "styles.0.linear.weight", what).shape)
    config.update(n_styles=n_styles, style_width=style_width, w_dim=w_dim)
    return config


def rules(config: dict) -> list[common.Rule]:
    out = body_rules(config)
    for name in ("latlayer1", "latlayer2"):
        out += [(f"{name}.weight", f"params/{name}/kernel", common.conv),
                (f"{name}.bias", f"params/{name}/bias", common.same)]
    for i in range(config["n_styles"]):
        for j in range(psp.style_convs(i)):  # official Sequential: conv at even, LeakyReLU at odd
            src, dst = f"styles.{i}.convs.{2 * j}", f"params/style_{i}/conv_{j}"
            out += [(f"{src}.weight", f"{dst}/kernel", common.conv),
                    (f"{src}.bias", f"{dst}/bias", common.same)]
        out += [(f"styles.{i}.linear.weight", f"params/style_{i}/linear/weight", common.linear),
                (f"styles.{i}.linear.bias", f"params/style_{i}/linear/bias", common.same)]
    return out


def _latent_avg(latent_avg: np.ndarray, config: dict, what: str) -> np.ndarray:
    n, d = config["n_styles"], config["w_dim"]
    if latent_avg.shape in ((d,), (1, d)):  # a plain W average: pSp repeats it over the styles
        latent_avg = np.tile(latent_avg.reshape(1, d), (n, 1))
    if latent_avg.shape != (n, d):
        raise WeightsError(f"{what}: latent_avg has shape {latent_avg.shape}, expected ({n}, {d})")
    return latent_avg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-range", default="auto", choices=["auto", *RANGES],
                        help="value range the weights were trained on (write --input-range=-1,1); "
                             "auto: [-1,1] for pSp checkpoints with opts, [0,1] for bare state dicts")


def convert(src: str, input_range: str = "auto") -> tuple[dict, weights.Meta]:
    """pSp GradualStyleEncoder -> (variables, meta) of kind "psp_encoder"; `input_range` is
    "auto", "0,1" or "-1,1" (see the module docstring)."""
    if input_range not in ("auto", *RANGES):
        raise IfaditError(f"input_range must be auto, 0,1 or -1,1, got {str(input_range)[:20]!r}")
    state, latent_avg, opts = read_psp(src)
    config = infer_config(state, src, opts)
    choice = input_range if input_range != "auto" else ("-1,1" if opts is not None else "0,1")
    config["input_range"] = list(RANGES[choice])
    config["start_from_latent_avg"] = bool(opts.get("start_from_latent_avg", False)) if opts else False
    common.check_config(config, src)
    variables = common.apply_table(state, rules(config), src, ignore=not_batch_counter)
    expected = common.expected_variables(psp.module_from_config(config),
                                         (1, 256, 256, config["in_channels"]))
    weights.check_tree(expected, variables, src)
    if latent_avg is not None:
        variables["consts"] = {"latent_avg": _latent_avg(latent_avg, config, src)}
        expected = {**expected, "consts": {"latent_avg": variables["consts"]["latent_avg"]}}
    elif config["start_from_latent_avg"]:
        raise WeightsError(f"{src}: opts.start_from_latent_avg is set but there is no latent_avg")
    return common.finish(variables, expected, src=src, kind="psp_encoder", config=config,
                         input_range_choice=input_range)


if __name__ == "__main__":
    common.converter_main(__doc__, convert, add_arguments)
