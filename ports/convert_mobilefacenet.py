"""Converts cunjian/pytorch_face_landmark's `mobilefacenet_model_best.pth.tar` (MobileFaceNet
68-point landmarks, `['state_dict']`) into ifadit-jax weights.

Usage: python ports/convert_mobilefacenet.py SRC OUT.safetensors [--force]
"""

from __future__ import annotations

import numpy as np

from ifadit_jax import weights
from ifadit_jax.errors import WeightsError
from ifadit_jax.nets import mobilefacenet as mfn
from ports import common

# (official prefix, our path) of every block, in the official module order.
_CONV_BLOCKS = ["conv1", "conv2_dw", "conv_6_sep"]
_DEPTHWISE = ["conv_23", "conv_34", "conv_45"]
_RESIDUAL = {"conv_3": 4, "conv_4": 6, "conv_5": 2}


def _bn_rules(src: str, dst: str) -> list[common.Rule]:
    return [(f"{src}.weight", f"params/{dst}/scale", common.same),
            (f"{src}.bias", f"params/{dst}/bias", common.same),
            (f"{src}.running_mean", f"batch_stats/{dst}/mean", common.same),
            (f"{src}.running_var", f"batch_stats/{dst}/var", common.same)]


def _block_rules(src: str, dst: str, prelu: bool) -> list[common.Rule]:
    rules = [(f"{src}.conv.weight", f"params/{dst}/conv/kernel", common.conv)]
    rules += _bn_rules(f"{src}.bn", f"{dst}/bn")
    if prelu:
        rules.append((f"{src}.prelu.weight", f"params/{dst}/prelu/negative_slope", common.same))
    return rules


def _depthwise_rules(src: str, dst: str) -> list[common.Rule]:
    return (_block_rules(f"{src}.conv", f"{dst}/conv", True)
            + _block_rules(f"{src}.conv_dw", f"{dst}/conv_dw", True)
            + _block_rules(f"{src}.project", f"{dst}/project", False))


def rules() -> list[common.Rule]:
    out: list[common.Rule] = []
    for name in _CONV_BLOCKS:
        out += _block_rules(name, name, True)
    for name in _DEPTHWISE:
        out += _depthwise_rules(name, name)
    for name, n in _RESIDUAL.items():
        for i in range(n):
            out += _depthwise_rules(f"{name}.model.{i}", f"{name}/model_{i}")
    out += _block_rules("output_layer.conv_6_dw", "output_layer/conv_6_dw", False)
    out.append(("output_layer.linear.weight", "params/output_layer/linear/kernel", common.linear))
    out += _bn_rules("output_layer.bn", "output_layer/bn")
    return out


def state_dict(path: str) -> dict[str, np.ndarray]:
    """The model's flat state dict: `['state_dict']` of a training checkpoint, or a bare one."""
    return common.state_dict(path, "MobileFaceNet checkpoint")


def convert(src: str) -> tuple[dict, weights.Meta]:
    """MobileFaceNet (GDC landmark head) -> (variables, meta) of kind "mobilefacenet"."""
    state = state_dict(src)
    if "output_layer.linear.weight" not in state:
        hint = (" (this is the GNAP head, only the GDC landmark head is supported)"
                if "output_layer.bn1.running_mean" in state else " (is this the right network?)")
        raise WeightsError(f"{src}: not a MobileFaceNet GDC checkpoint: no "
                           f"'output_layer.linear.weight'{hint}")
    linear = state["output_layer.linear.weight"]
    if np.ndim(linear) != 2:
        raise WeightsError(f"{src}: output_layer.linear.weight has shape {np.shape(linear)}, "
                           "expected [embedding_size, 512]")
    config = {"embedding_size": int(np.shape(linear)[0])}
    common.check_config(config, src)
    variables = common.apply_table(state, rules(), src,
                                   ignore=lambda k: k.endswith("num_batches_tracked"))
    size = mfn.INPUT_SIZE
    expected = common.expected_variables(mfn.MobileFaceNet(**config), (1, size, size, 3))
    return common.finish(variables, expected, src=src, kind="mobilefacenet", config=config)


if __name__ == "__main__":
    common.converter_main(__doc__, convert)
