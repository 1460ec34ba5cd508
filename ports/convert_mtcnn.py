"""Converts facenet-pytorch's MTCNN weights (pnet.pt, rnet.pt, onet.pt) into one ifadit-jax file.

Usage: python ports/convert_mtcnn.py DIR OUT.safetensors [--force]

DIR holds the three state dicts shipped in the facenet-pytorch package (`facenet_pytorch/data/`).
The output holds params/pnet/..., params/rnet/..., params/onet/... (kind "mtcnn"); the sha256 of
each source file is recorded in the metadata ("extra").
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from ifadit_jax import weights
from ifadit_jax.errors import InputError, WeightsError
from ifadit_jax.nets import mtcnn
from ports import common
from ports.reader import flatten_state_dict, read_checkpoint

NETS = ("pnet", "rnet", "onet")

# Official layer names per net, in forward order: (kind, torch name); widths come from the shapes.
_LAYERS = {
    "pnet": [("conv", "conv1"), ("prelu", "prelu1"), ("conv", "conv2"), ("prelu", "prelu2"),
             ("conv", "conv3"), ("prelu", "prelu3"), ("conv", "conv4_1"), ("conv", "conv4_2")],
    "rnet": [("conv", "conv1"), ("prelu", "prelu1"), ("conv", "conv2"), ("prelu", "prelu2"),
             ("conv", "conv3"), ("prelu", "prelu3"), ("dense", "dense4"), ("prelu", "prelu4"),
             ("dense", "dense5_1"), ("dense", "dense5_2")],
    "onet": [("conv", "conv1"), ("prelu", "prelu1"), ("conv", "conv2"), ("prelu", "prelu2"),
             ("conv", "conv3"), ("prelu", "prelu3"), ("conv", "conv4"), ("prelu", "prelu4"),
             ("dense", "dense5"), ("prelu", "prelu5"), ("dense", "dense6_1"), ("dense", "dense6_2"),
             ("dense", "dense6_3")],
}
# Layers whose output widths make up each net's config (the heads have fixed widths).
_WIDTH_LAYERS = {
    "pnet": ("conv1", "conv2", "conv3"),
    "rnet": ("conv1", "conv2", "conv3", "dense4"),
    "onet": ("conv1", "conv2", "conv3", "conv4", "dense5"),
}


def rules(net: str) -> list[common.Rule]:
    out: list[common.Rule] = []
    for kind, name in _LAYERS[net]:
        dst = f"params/{net}/{name}"
        if kind == "prelu":
            out.append((f"{name}.weight", f"{dst}/negative_slope", common.same))
        else:
            hook = common.conv if kind == "conv" else common.linear
            out.append((f"{name}.weight", f"{dst}/kernel", hook))
            out.append((f"{name}.bias", f"{dst}/bias", common.same))
    return out


def infer_config(states: dict[str, dict[str, np.ndarray]], paths: dict[str, str]) -> dict:
    return {f"{net}_widths": [int(np.shape(common.require(states[net], f"{name}.weight", paths[net]))[0])
                              for name in _WIDTH_LAYERS[net]]
            for net in NETS}


def _paths(src_dir: str) -> dict[str, str]:
    return {net: os.path.join(src_dir, f"{net}.pt") for net in NETS}


def convert(src_dir: str) -> tuple[dict, weights.Meta]:
    """The folder holding pnet.pt, rnet.pt, onet.pt -> (variables, meta) of kind "mtcnn"."""
    if not os.path.isdir(src_dir):
        raise InputError(f"{src_dir}: not a directory (expected the folder holding pnet.pt, rnet.pt "
                         "and onet.pt)")
    paths = _paths(src_dir)
    for net, path in paths.items():
        if not os.path.isfile(path):
            raise WeightsError(f"{path}: missing (the MTCNN folder must hold pnet.pt, rnet.pt and onet.pt)")
    states = {net: flatten_state_dict(read_checkpoint(path)) for net, path in paths.items()}
    config = infer_config(states, paths)
    common.check_config(config, src_dir)
    variables: dict = {"params": {}}
    for net in NETS:
        converted = common.apply_table(states[net], rules(net), paths[net])
        variables["params"].update(converted["params"])
    inputs = [tuple(np.shape(x)) for x in mtcnn.init_inputs()]
    expected = common.expected_variables(mtcnn.MTCNNNets(**config), *inputs)
    shas = {f"{net}.pt": weights.sha256_file(path) for net, path in paths.items()}
    meta = weights.Meta(
        kind="mtcnn", config=config, source_file=os.path.basename(os.path.normpath(src_dir)),
        # One digest for the set: sha256 of "name sha256\n" lines in pnet, rnet, onet order.
        source_sha256=hashlib.sha256("".join(f"{k} {v}\n" for k, v in shas.items()).encode()).hexdigest(),
        converter_version=common.CONVERTER_VERSION, extra={"source_sha256": shas})
    return common.finish(variables, expected, src=src_dir, kind="mtcnn", config=config, meta=meta)


if __name__ == "__main__":
    common.converter_main(__doc__.split("\n\n")[0], convert,
                          src_help="folder with facenet-pytorch's pnet.pt, rnet.pt, onet.pt",
                          inputs=lambda args: list(_paths(args.src).values()))
