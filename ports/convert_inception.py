"""Converts pytorch-fid's FID Inception weights (`pt_inception-2015-12-05-6726825d.pth`, the state
dict of `fid_inception_v3()`) into ifadit-jax weights of kind "inception".

Usage: python ports/convert_inception.py SRC OUT.safetensors [--force]

Every channel width is read from the tensor shapes (the constructor's channel constants, see
`ifadit_jax/nets/inception.py`). The 1008-class `fc` layer is not used for FID features and is
dropped; `num_batches_tracked` entries are optional. torchvision's ImageNet Inception
(`inception_v3_google-*.pth`: 1000 classes, AuxLogits) has the same layer names but is a different
network (FID needs the TensorFlow graph's weights and pooling) and is refused.
"""

from __future__ import annotations

from ifadit_jax import weights
from ifadit_jax.errors import WeightsError
from ifadit_jax.nets import inception
from ports import common

FID_CLASSES = 1008  # the TF graph's classifier; torchvision's ImageNet model has 1000

# Our leaf (collection, name) -> official suffix and layout hook.
LEAVES = {("params", "conv/kernel"): ("conv.weight", common.conv),
          ("params", "bn/scale"): ("bn.weight", common.same),
          ("params", "bn/bias"): ("bn.bias", common.same),
          ("batch_stats", "bn/mean"): ("bn.running_mean", common.same),
          ("batch_stats", "bn/var"): ("bn.running_var", common.same)}


def state_dict(path: str) -> dict:
    state = common.state_dict(path, "FID Inception")
    if any(k.startswith("AuxLogits.") for k in state) or (
            "fc.weight" in state and state["fc.weight"].shape[0] != FID_CLASSES):
        raise WeightsError(f"{path}: this is torchvision's ImageNet InceptionV3, not the FID "
                           "Inception; use pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    return state


def _out(state: dict, name: str, what: str) -> int:
    return int(common.require(state, f"{name}.conv.weight", what).shape[0])


def infer_config(state: dict, what: str) -> dict:
    first = common.require(state, "Conv2d_1a_3x3.conv.weight", what)
    if first.ndim != 4 or first.shape[1] != 3:
        raise WeightsError(f"{what}: Conv2d_1a_3x3.conv.weight has shape {tuple(first.shape)}, "
                           "expected a conv on 3 input channels")

    def outs(block, names):
        return [_out(state, f"{block}.{n}", what) for n in names]

    widths = {
        "stem": [_out(state, n, what) for n in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3",
                                                "Conv2d_3b_1x1", "Conv2d_4a_3x3")],
        "a": outs("Mixed_5b", ("branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1",
                               "branch3x3dbl_2", "branch3x3dbl_3")),
        "a_pool": [_out(state, f"{m}.branch_pool", what)
                   for m in ("Mixed_5b", "Mixed_5c", "Mixed_5d")],
        "b": outs("Mixed_6a", ("branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3")),
        "c": outs("Mixed_6b", ("branch1x1", "branch7x7_3", "branch_pool")),
        "c7": [_out(state, f"{m}.branch7x7_1", what)
               for m in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e")],
        "d": outs("Mixed_7a", ("branch3x3_1", "branch3x3_2", "branch7x7x3_1")),
        "e": outs("Mixed_7b", ("branch1x1", "branch3x3_1", "branch3x3dbl_1", "branch3x3dbl_2",
                               "branch_pool")),
    }
    return {"widths": widths, "feature_dim": inception.feature_dim(widths)}


def rules(expected: dict) -> list[common.Rule]:
    """One rule per leaf of the module's variables: our names are the official module names."""
    out = []
    for path in weights.flatten(expected):
        collection, rest = path.split("/", 1)
        module, leaf = rest.rsplit("/", 2)[0], "/".join(rest.rsplit("/", 2)[1:])
        suffix, hook = LEAVES[(collection, leaf)]
        out.append((f"{module.replace('/', '.')}.{suffix}", path, hook))
    return out


def ignored(key: str) -> bool:
    return key.endswith("num_batches_tracked") or key.startswith("fc.")


def convert(src: str) -> tuple[dict, weights.Meta]:
    """FID Inception -> (variables, meta) of kind "inception"."""
    state = state_dict(src)
    config = infer_config(state, src)
    common.check_config(config, src)
    size = inception.INPUT_SIZE
    expected = common.expected_variables(inception.module_from_config(config), (1, size, size, 3))
    variables = common.apply_table(state, rules(expected), src, ignore=ignored)
    return common.finish(variables, expected, src=src, kind="inception", config=config)


if __name__ == "__main__":
    common.converter_main(__doc__, convert)
