"""Converts an IR-SE ArcFace backbone (pSp/TreB1eN `model_irse.Backbone`: `model_ir_se50.pth`,
iFADIT's copy of it) into ifadit-jax weights of kind "arcface".

Usage: python ports/convert_arcface.py SRC OUT.safetensors [--force]

SRC is a plain state dict (`input_layer.*`, `body.*`, `output_layer.*`; `num_batches_tracked`
entries are optional), or a dict holding one under 'state_dict'. Widths, depth (50/100/152),
IR vs IR-SE, input size and the final BatchNorm1d's affine flag are read from the tensor shapes.
The IR body rules here are shared with ports/convert_psp.py.
"""

from __future__ import annotations

import re

import numpy as np

from ifadit_jax import weights
from ifadit_jax.errors import WeightsError
from ifadit_jax.nets import arcface, irse
from ports import common


def body_config(state: dict, what: str, prefix: str = "") -> dict:
    """Input layer + IR body config from a flat state dict whose keys start with `prefix`:
    {in_channels, widths (4 stage widths), units (per stage), se}."""
    first = common.require(state, f"{prefix}input_layer.0.weight", what)
    n = len({m.group(1) for k in state if (m := re.match(re.escape(prefix) + r"body\.(\d+)\.", k))})
    layouts = {sum(u): u for u in irse.STAGE_UNITS.values()}
    if n not in layouts:
        raise WeightsError(f"{what}: {n} IR units in '{prefix}body', expected one of "
                           f"{sorted(layouts)} (IR-50/100/152)")
    units = layouts[n]
    starts = np.cumsum((0,) + units[:-1])
    widths = [int(common.require(state, f"{prefix}body.{i}.res_layer.1.weight", what).shape[0])
              for i in starts]
    return {"in_channels": int(first.shape[1]), "widths": widths, "units": list(units),
            "se": f"{prefix}body.0.res_layer.5.fc1.weight" in state}


def body_rules(config: dict, src: str = "", dst: str = "body") -> list[common.Rule]:
    """Official input_layer.* and body.* (under prefix `src`) -> our IRBody at `dst`."""
    rules = [(f"{src}input_layer.0.weight", f"params/{dst}/input_conv/kernel", common.conv)]
    rules += common.batch_norm(f"{src}input_layer.1", f"{dst}/input_bn")
    rules.append((f"{src}input_layer.2.weight", f"params/{dst}/input_prelu/negative_slope", common.same))
    i, in_ch = 0, config["widths"][0]
    for depth, n in zip(config["widths"], config["units"]):
        for _ in range(n):
            o, d = f"{src}body.{i}.", f"{dst}/unit_{i}"
            if in_ch != depth:  # else the shortcut is MaxPool2d(1, stride): no parameters
                rules.append((o + "shortcut_layer.0.weight", f"params/{d}/shortcut_conv/kernel",
                              common.conv))
                rules += common.batch_norm(o + "shortcut_layer.1", f"{d}/shortcut_bn")
            rules += common.batch_norm(o + "res_layer.0", f"{d}/bn1")
            rules.append((o + "res_layer.1.weight", f"params/{d}/conv1/kernel", common.conv))
            rules.append((o + "res_layer.2.weight", f"params/{d}/prelu/negative_slope", common.same))
            rules.append((o + "res_layer.3.weight", f"params/{d}/conv2/kernel", common.conv))
            rules += common.batch_norm(o + "res_layer.4", f"{d}/bn2")
            if config["se"]:
                rules.append((o + "res_layer.5.fc1.weight", f"params/{d}/se_fc1/kernel", common.conv))
                rules.append((o + "res_layer.5.fc2.weight", f"params/{d}/se_fc2/kernel", common.conv))
            in_ch, i = depth, i + 1
    return rules


def not_batch_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def state_dict(path: str) -> dict[str, np.ndarray]:
    """The flat backbone state dict (a bare one, or under 'state_dict'; `module.` stripped)."""
    state = common.state_dict(path, "IR-SE ArcFace backbone")
    if any(k.startswith("encoder.") for k in state):
        raise WeightsError(f"{path}: this is a pSp checkpoint (encoder.* keys), not an ArcFace "
                           "backbone; convert it with ports/convert_psp.py")
    return state


def infer_config(state: dict, what: str) -> dict:
    config = body_config(state, what)
    if config["in_channels"] != 3:
        raise WeightsError(f"{what}: ArcFace input layer takes {config['in_channels']} channels, "
                           "expected 3")
    linear = common.require(state, "output_layer.3.weight", what)
    emb_dim, n_in = (int(d) for d in linear.shape)
    top = config["widths"][-1]
    spatial = {49: 112, 196: 224}.get(n_in // top) if n_in % top == 0 else None
    if spatial is None:
        raise WeightsError(f"{what}: output Linear takes {n_in} inputs, expected "
                           f"{top}*7*7 or {top}*14*14")
    config.update(emb_dim=emb_dim, input_size=spatial,
                  bn1d_affine="output_layer.4.weight" in state)
    return config


def rules(config: dict) -> list[common.Rule]:
    out = body_rules(config)
    out += common.batch_norm("output_layer.0", "output_bn")
    out += [("output_layer.3.weight", "params/output_linear/kernel", common.linear),
            ("output_layer.3.bias", "params/output_linear/bias", common.same)]
    out += common.batch_norm("output_layer.4", "output_bn1d", affine=config["bn1d_affine"])
    return out


def convert(src: str) -> tuple[dict, weights.Meta]:
    """IR-SE ArcFace backbone -> (variables, meta) of kind "arcface"."""
    state = state_dict(src)
    config = infer_config(state, src)
    variables = common.apply_table(state, rules(config), src, ignore=not_batch_counter)
    s = config["input_size"]
    expected = common.expected_variables(arcface.module_from_config(config), (1, s, s, 3))
    return common.finish(variables, expected, src=src, kind="arcface", config=config)


if __name__ == "__main__":
    common.converter_main(__doc__, convert)
