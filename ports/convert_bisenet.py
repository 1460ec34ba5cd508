"""Converts zllrunning/face-parsing.PyTorch's `79999_iter.pth` (BiSeNet face parser, a plain
state dict) into ifadit-jax weights. Widths and block counts are read from the tensor shapes.

Usage: python ports/convert_bisenet.py SRC OUT.safetensors [--force]
"""

from __future__ import annotations

import re

import numpy as np

from ifadit_jax import weights
from ifadit_jax.errors import WeightsError
from ifadit_jax.nets import bisenet
from ports import common


def _conv_rule(src: str, dst: str) -> list[common.Rule]:
    return [(f"{src}.weight", f"params/{dst}/kernel", common.conv)]


def _cbr_rules(src: str, dst: str) -> list[common.Rule]:
    """ConvBNReLU: `.conv` + `.bn`."""
    return _conv_rule(f"{src}.conv", f"{dst}/conv") + common.batch_norm(f"{src}.bn", f"{dst}/bn")


def rules(config: dict) -> list[common.Rule]:
    out: list[common.Rule] = []
    r, d = "cp.resnet", "cp/resnet"
    out += _conv_rule(f"{r}.conv1", f"{d}/conv1") + common.batch_norm(f"{r}.bn1", f"{d}/bn1")
    in_width = config["stem_width"]
    for li, (width, blocks) in enumerate(zip(config["layer_widths"], config["layer_blocks"])):
        for bi in range(blocks):
            s, t = f"{r}.layer{li + 1}.{bi}", f"{d}/layer{li + 1}_{bi}"
            out += _conv_rule(f"{s}.conv1", f"{t}/conv1") + common.batch_norm(f"{s}.bn1", f"{t}/bn1")
            out += _conv_rule(f"{s}.conv2", f"{t}/conv2") + common.batch_norm(f"{s}.bn2", f"{t}/bn2")
            stride = 2 if (li > 0 and bi == 0) else 1
            if in_width != width or stride != 1:
                out += _conv_rule(f"{s}.downsample.0", f"{t}/downsample_conv")
                out += common.batch_norm(f"{s}.downsample.1", f"{t}/downsample_bn")
            in_width = width
    for arm in ("arm16", "arm32"):
        out += _cbr_rules(f"cp.{arm}.conv", f"cp/{arm}/conv")
        out += _conv_rule(f"cp.{arm}.conv_atten", f"cp/{arm}/conv_atten")
        out += common.batch_norm(f"cp.{arm}.bn_atten", f"cp/{arm}/bn_atten")
    for name in ("conv_head32", "conv_head16", "conv_avg"):
        out += _cbr_rules(f"cp.{name}", f"cp/{name}")
    out += _cbr_rules("ffm.convblk", "ffm/convblk")
    out += _conv_rule("ffm.conv1", "ffm/conv1") + _conv_rule("ffm.conv2", "ffm/conv2")
    for head in ("conv_out", "conv_out16", "conv_out32"):
        out += _cbr_rules(f"{head}.conv", f"{head}/conv")
        out += _conv_rule(f"{head}.conv_out", f"{head}/conv_out")
    return out


def state_dict(path: str) -> dict[str, np.ndarray]:
    """The flat state dict: a bare one (as released), or under 'state_dict'."""
    return common.state_dict(path, "BiSeNet face-parsing checkpoint")


def _out_channels(state, key: str, path: str) -> int:
    w = common.require(state, key, path)
    if np.ndim(w) != 4:
        raise WeightsError(f"{path}: {key} has shape {tuple(np.shape(w))}, expected a conv kernel")
    return int(np.shape(w)[0])


def infer_config(state: dict[str, np.ndarray], path: str) -> dict:
    if "cp.resnet.conv1.weight" not in state:
        raise WeightsError(f"{path}: not a BiSeNet face-parsing checkpoint: no "
                           "'cp.resnet.conv1.weight' (is this the right network?)")
    blocks = []
    for li in range(1, 5):
        idx = {int(m.group(1)) for k in state
               if (m := re.match(rf"cp\.resnet\.layer{li}\.(\d+)\.conv1\.weight$", k))}
        if not idx or idx != set(range(len(idx))):
            raise WeightsError(f"{path}: cp.resnet.layer{li} has blocks {sorted(idx)}, "
                               "expected 0..n-1 (is this the right network?)")
        blocks.append(len(idx))
    return {
        "n_classes": _out_channels(state, "conv_out.conv_out.weight", path),
        "stem_width": _out_channels(state, "cp.resnet.conv1.weight", path),
        "layer_widths": [_out_channels(state, f"cp.resnet.layer{li}.0.conv1.weight", path)
                         for li in range(1, 5)],
        "layer_blocks": blocks,
        "context_width": _out_channels(state, "cp.arm16.conv.conv.weight", path),
        "fusion_width": _out_channels(state, "ffm.convblk.conv.weight", path),
        "fusion_attention_width": _out_channels(state, "ffm.conv1.weight", path),
        "head_widths": [_out_channels(state, f"{h}.conv.conv.weight", path)
                        for h in ("conv_out", "conv_out16", "conv_out32")],
    }


def convert(src: str) -> tuple[dict, weights.Meta]:
    """BiSeNet face parser -> (variables, meta) of kind "bisenet"."""
    state = state_dict(src)
    config = infer_config(state, src)
    variables = common.apply_table(state, rules(config), src,
                                   ignore=lambda k: k.endswith("num_batches_tracked"))
    # 64x64 is enough to build every layer (strides up to 32); shapes do not depend on the size.
    expected = common.expected_variables(bisenet.module_from_config(config), (1, 64, 64, 3))
    return common.finish(variables, expected, src=src, kind="bisenet", config=config)


if __name__ == "__main__":
    common.converter_main(__doc__, convert)
