"""Converts an AdaFace backbone checkpoint (mk-minchul/AdaFace, e.g. `adaface_ir50_ms1mv2.ckpt`,
`adaface_ir101_webface12m.ckpt`) into ifadit-jax weights of kind "adaface".

Usage: python ports/convert_adaface.py SRC OUT.safetensors [--force]

SRC is the released PyTorch Lightning `.ckpt`: a dict whose 'state_dict' holds the backbone under
`model.*` (the official `inference.load_pretrained_model` keeps those keys and strips `model.`) and
the AdaFace training head under `head.*` (ignored: inference does not use it). A bare backbone
state dict (keys `input_layer.*`, `body.*`, `output_layer.*`) is accepted too. Depth
(IR-18/34/50/101), stage widths and input size (112 or 224) are read from the tensor shapes;
`num_batches_tracked` entries are optional.
"""

from __future__ import annotations

import re

from ifadit_jax import weights
from ifadit_jax.errors import WeightsError
from ifadit_jax.nets import adaface
from ports import common

PREFIX = "model."


def state_dict(path: str) -> dict:
    """The backbone's flat state dict, `model.` stripped, the head's keys dropped."""
    flat = common.state_dict(path, "AdaFace checkpoint")
    if any(k.startswith(PREFIX) for k in flat):
        return {k[len(PREFIX):]: v for k, v in flat.items() if k.startswith(PREFIX)}
    return {k: v for k, v in flat.items() if not k.startswith("head.")}


def infer_config(state: dict, what: str) -> dict:
    first = common.require(state, "input_layer.0.weight", what)
    if first.ndim != 4 or first.shape[1] != 3:
        raise WeightsError(f"{what}: input_layer.0.weight has shape {tuple(first.shape)}, "
                           "expected a 3x3 conv on 3 channels")
    if "body.0.res_layer.1.weight" in state and "body.0.res_layer.2.running_mean" not in state:
        raise WeightsError(f"{what}: IR units without AdaFace's BatchNorm at res_layer.2: this "
                           "is a pSp/TreB1eN ArcFace backbone; convert it with "
                           "ports/convert_arcface.py")
    if "body.0.res_layer.6.fc1.weight" in state:
        raise WeightsError(f"{what}: an IR-SE AdaFace backbone (SE modules in body.*.res_layer.6); "
                           "only the IR backbones of the released checkpoints are supported")
    if "body.0.res_layer.8.weight" in state:
        raise WeightsError(f"{what}: a bottleneck (IR-152/200) AdaFace backbone; only IR-18/34/50/"
                           "101 are supported")
    n = len({m.group(1) for k in state if (m := re.match(r"body\.(\d+)\.", k))})
    layouts = {sum(u): (depth, u) for depth, u in adaface.STAGE_UNITS.items()}
    if n not in layouts:
        raise WeightsError(f"{what}: {n} IR units in 'body', expected one of {sorted(layouts)} "
                           "(AdaFace IR-18/34/50/101)")
    depth, units = layouts[n]
    starts = [sum(units[:i]) for i in range(4)]
    widths = [int(common.require(state, f"body.{i}.res_layer.1.weight", what).shape[0])
              for i in starts]
    linear = common.require(state, "output_layer.3.weight", what)
    emb_dim, n_in = (int(d) for d in linear.shape)
    spatial = {49: 112, 196: 224}.get(n_in // widths[-1]) if n_in % widths[-1] == 0 else None
    if spatial is None:
        raise WeightsError(f"{what}: output Linear takes {n_in} inputs, expected "
                           f"{widths[-1]}*7*7 or {widths[-1]}*14*14")
    return {"num_layers": depth, "widths": widths, "units": list(units), "emb_dim": emb_dim,
            "input_size": spatial}


def rules(config: dict) -> list[common.Rule]:
    out = [("input_layer.0.weight", "params/body/input_conv/kernel", common.conv)]
    out += common.batch_norm("input_layer.1", "body/input_bn")
    out.append(("input_layer.2.weight", "params/body/input_prelu/negative_slope", common.same))
    i, in_ch = 0, config["widths"][0]
    for depth, n in zip(config["widths"], config["units"]):
        for _ in range(n):
            o, d = f"body.{i}.", f"body/unit_{i}"
            if in_ch != depth:  # else the shortcut is MaxPool2d(1, stride): no parameters
                out.append((o + "shortcut_layer.0.weight", f"params/{d}/shortcut_conv/kernel",
                            common.conv))
                out += common.batch_norm(o + "shortcut_layer.1", f"{d}/shortcut_bn")
            out += common.batch_norm(o + "res_layer.0", f"{d}/bn1")
            out.append((o + "res_layer.1.weight", f"params/{d}/conv1/kernel", common.conv))
            out += common.batch_norm(o + "res_layer.2", f"{d}/bn_mid")
            out.append((o + "res_layer.3.weight", f"params/{d}/prelu/negative_slope", common.same))
            out.append((o + "res_layer.4.weight", f"params/{d}/conv2/kernel", common.conv))
            out += common.batch_norm(o + "res_layer.5", f"{d}/bn2")
            in_ch, i = depth, i + 1
    out += common.batch_norm("output_layer.0", "output_bn")
    out += [("output_layer.3.weight", "params/output_linear/kernel", common.linear),
            ("output_layer.3.bias", "params/output_linear/bias", common.same)]
    out += common.batch_norm("output_layer.4", "output_bn1d", affine=False)
    return out


def convert(src: str) -> tuple[dict, weights.Meta]:
    """AdaFace IR backbone -> (variables, meta) of kind "adaface"."""
    state = state_dict(src)
    config = infer_config(state, src)
    variables = common.apply_table(state, rules(config), src,
                                   ignore=lambda k: k.endswith("num_batches_tracked"))
    s = config["input_size"]
    expected = common.expected_variables(adaface.module_from_config(config), (1, s, s, 3))
    return common.finish(variables, expected, src=src, kind="adaface", config=config)


if __name__ == "__main__":
    common.converter_main(__doc__, convert)
