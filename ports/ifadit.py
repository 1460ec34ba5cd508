"""Converts the official iFADIT checkpoints (lixionga/ProFace, FacePrivacy/iFADIT) into ifadit-jax weights.

The converters are plain functions `convert_inn(src)`, `convert_mapper(src)`, `convert_icl(src)`
-> (variables, meta); `ports/convert_ifadit.py` is their command line and `ports/release.py`
converts the whole release folder with them.

The official test.py loads these files with `utils.loading_pretrianed`, which ignores key names:
it walks the model's state_dict in order and takes the file's next tensor whenever the shapes
agree. The converters take the tensors in the same order and by shape, but every tensor must
fit (the official loader would silently keep a random tensor where one does not). Widths are read
from the shapes. The INN's FrEIA generation is told by `w_perm`: a (dim, dim) 0/1 matrix is
FrEIA 0.2 (soft clamp 2*tanh(a)), a (dim,) index vector is GitHub master (2*tanh(a/2)).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ifadit_jax import flow, weights
from ifadit_jax.errors import WeightsError
from ifadit_jax.nets import mappers
from ports import common
from ports.reader import flatten_state_dict, read_checkpoint

Tensors = list[tuple[str, np.ndarray]]
# The official inn.py: LeakyReLU(0.01) in the subnets; AllInOneBlock(affine_clamping=2.0).
INN_NEGATIVE_SLOPE = 0.01
INN_CLAMP = 2.0


def _ordered_tensors(src: str) -> Tensors:
    """The checkpoint's tensors in file order (key names are kept only for messages)."""
    tensors = list(flatten_state_dict(read_checkpoint(src)).items())
    if not tensors:
        raise WeightsError(f"{src}: no tensors found (not a state dict)")
    return tensors


def _describe(tensors: Tensors, i: int) -> str:
    if i >= len(tensors):
        return "the end of the file"
    name, t = tensors[i]
    return f"tensor {i} '{name}' {tuple(np.shape(t))}"


def _linear_layers(tensors: Tensors, start: int, what: str) -> tuple[list[tuple[int, int]], int]:
    """Reads consecutive (weight [out, in], bias [out]) pairs from `start` and checks that each
    layer takes what the previous one gives; returns their (in, out) sizes and the index after
    the last pair."""
    layers, i = [], start
    while (i + 1 < len(tensors) and np.ndim(tensors[i][1]) == 2 and np.ndim(tensors[i + 1][1]) == 1
           and np.shape(tensors[i + 1][1])[0] == np.shape(tensors[i][1])[0]):
        out_f, in_f = np.shape(tensors[i][1])
        if layers and in_f != layers[-1][1]:
            raise WeightsError(f"{what}: {_describe(tensors, i)} takes {in_f} inputs, but the layer "
                               f"before gives {layers[-1][1]}")
        layers.append((int(in_f), int(out_f)))
        common.check_limit(len(layers), "depth", "Linear layers in a row", what)
        i += 2
    return layers, i


def _take_in_order(tensors: Tensors, slots: list[tuple[str, tuple[int, ...], Callable]],
                   what: str) -> dict:
    """Assigns tensors to slots [(dst 'collection/path', official shape, hook)] one by one in file
    order; every slot must get a tensor of its shape and no tensor may be left over."""
    if len(tensors) != len(slots):
        raise WeightsError(f"{what}: has {len(tensors)} tensors, the network needs {len(slots)}")
    flat = {}
    for i, ((name, t), (dst, shape, hook)) in enumerate(zip(tensors, slots)):
        if tuple(np.shape(t)) != tuple(shape):
            raise WeightsError(f"{what}: tensor {i} '{name}' has shape {tuple(np.shape(t))}, "
                               f"expected {tuple(shape)} for {dst}")
        flat[dst] = hook(common.f32(np.asarray(t)))
    return weights.unflatten(flat)


# ----------------------------------------------------------------------------------------------
# INN (SIF T)


def _permutation_index(what: str) -> Callable[[np.ndarray], np.ndarray]:
    """FrEIA's w_perm/w_perm_inv -> int32 index vector: out[:, i] = in[:, index[i]]."""

    def hook(w: np.ndarray) -> np.ndarray:
        w = np.asarray(w)
        if w.ndim == 1:  # master: already an index vector
            if w.dtype.kind == "f" and not np.all(w == np.round(w)):
                raise WeightsError(f"{what}: permutation index vector has non-integer entries")
            return w.astype(np.int32)
        if not (np.all((w == 0) | (w == 1)) and np.all(w.sum(axis=0) == 1) and np.all(w.sum(axis=1) == 1)):
            raise WeightsError(f"{what}: w_perm is not a 0/1 permutation matrix (a soft or learned "
                               "permutation, which the official iFADIT model does not use)")
        return np.argmax(w, axis=1).astype(np.int32)

    return hook


def infer_inn_config(tensors: Tensors, what: str) -> flow.SifConfig:
    """Reads the SequenceINN layout from the shapes: per block global_scale (1, D),
    global_offset (1, D), w_perm, w_perm_inv, then the subnet's Linear layers."""
    not_inn = f"{what}: not an iFADIT INN (FrEIA SequenceINN of AllInOneBlocks)"
    i, blocks = 0, []
    while i < len(tensors):
        shapes = [tuple(np.shape(tensors[j][1])) if j < len(tensors) else None for j in range(i, i + 4)]
        gs = shapes[0]
        if len(gs) != 2 or gs[0] != 1 or shapes[1] != gs:
            raise WeightsError(f"{not_inn}: at {_describe(tensors, i)}, expected global_scale and "
                               "global_offset of shape (1, dim)")
        dim = gs[1]
        if shapes[2] not in ((dim, dim), (dim,)) or shapes[3] != shapes[2]:
            raise WeightsError(f"{not_inn}: at {_describe(tensors, i + 2)}, expected w_perm and "
                               f"w_perm_inv of shape ({dim}, {dim}) or ({dim},)")
        layers, i = _linear_layers(tensors, i + 4, what)
        if not layers:
            raise WeightsError(f"{not_inn}: no subnet Linear layers at {_describe(tensors, i)}")
        blocks.append((dim, shapes[2], layers))
    common.check_limit(len(blocks), "depth", "coupling blocks", what)
    dim, perm_shape, layers = blocks[0]
    for b, block in enumerate(blocks[1:], start=1):
        if block != blocks[0]:
            raise WeightsError(f"{what}: block {b} differs in shape from block 0 ({block[2]} vs {layers})")
    d1, d2 = dim - dim // 2, dim // 2
    cond_dim = layers[0][0] - d1
    if cond_dim < 1 or layers[-1][1] != 2 * d2:
        raise WeightsError(f"{not_inn}: subnet maps {layers[0][0]} -> {layers[-1][1]}, expected "
                           f"({d1} + key size) -> {2 * d2}")
    return flow.SifConfig(variant="allinone", n_blocks=len(blocks), dim=dim, cond_dim=cond_dim,
                          hidden=tuple(o for _, o in layers[:-1]), negative_slope=INN_NEGATIVE_SLOPE,
                          clamp=INN_CLAMP, freia="0.2" if len(perm_shape) == 2 else "master")


def inn_slots(cfg: flow.SifConfig, what: str):
    flat = lambda w: np.reshape(w, (-1,))  # noqa: E731
    perm_shape = (cfg.dim, cfg.dim) if cfg.freia == "0.2" else (cfg.dim,)
    d1, d2 = cfg.split
    widths = [d1 + cfg.cond_dim, *cfg.hidden, 2 * d2]
    slots = []
    for b in range(cfg.n_blocks):
        p, c = f"params/block_{b}", f"consts/block_{b}"
        slots += [(f"{p}/global_scale", (1, cfg.dim), flat), (f"{p}/global_offset", (1, cfg.dim), flat),
                  (f"{c}/perm", perm_shape, _permutation_index(f"{what}: block {b}")),
                  (f"{c}/perm_inv", perm_shape, _permutation_index(f"{what}: block {b}"))]
        for j, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
            slots += [(f"{p}/subnet/fc{j}/kernel", (n_out, n_in), common.linear),
                      (f"{p}/subnet/fc{j}/bias", (n_out,), common.same)]
    return slots


def convert_inn(src: str) -> tuple[dict, weights.Meta]:
    """SIF T from `G_net_*.pth` -> (variables, meta) of kind "sif"."""
    tensors = _ordered_tensors(src)
    config = infer_inn_config(tensors, src)
    variables = _take_in_order(tensors, inn_slots(config, src), src)
    # Checks every shape against the flow and that each w_perm_inv inverts its w_perm.
    params = flow.from_variables(variables, config, src)
    variables = flow.to_variables(params)
    return common.finish(variables, flow.expected_variables(config), src=src, kind="sif",
                         config=config.to_dict(), freia=config.freia)


# ----------------------------------------------------------------------------------------------
# LatentMapper M and FusionMapper10 C


def _convert_mlp(src: str, module_cls, n_layers: int, kind: str, official: str):
    tensors = _ordered_tensors(src)
    layers, end = _linear_layers(tensors, 0, src)
    if end != len(tensors) or len(layers) != n_layers:
        found = (f"{len(layers)} Linear layers" if end == len(tensors)
                 else f"{_describe(tensors, end)}, which is not part of a Linear layer")
        raise WeightsError(f"{src}: not an official {official} ({n_layers} Linear layers "
                           f"with LeakyReLU between them): found {found}")
    in_features = layers[0][0]
    module = module_cls(features=tuple(o for _, o in layers))
    config = mappers.config_of(module, in_features)
    common.check_config(config, src)
    slots = []
    for j, (n_in, n_out) in enumerate(layers):
        slots += [(f"params/fc{j}/kernel", (n_out, n_in), common.linear),
                  (f"params/fc{j}/bias", (n_out,), common.same)]
    variables = _take_in_order(tensors, slots, src)
    return common.finish(variables, common.expected_variables(module, (1, in_features)), src=src,
                         kind=kind, config=config)


def convert_mapper(src: str) -> tuple[dict, weights.Meta]:
    """LatentMapper M from `mlp_best.pth` -> (variables, meta) of kind "latent_mapper"."""
    return _convert_mlp(src, mappers.LatentMapper, 2, "latent_mapper", "LatentMapper (mlp_best.pth)")


def convert_icl(src: str) -> tuple[dict, weights.Meta]:
    """FusionMapper10 C from `fuse_mlp_*.pth` -> (variables, meta) of kind "icl"."""
    variables, meta = _convert_mlp(src, mappers.ICL, 4, "icl", "FusionMapper10 (fuse_mlp_*.pth)")
    cfg = meta.config
    if cfg["in_features"] != cfg["features"][-1]:
        raise WeightsError(f"{src}: maps {cfg['in_features']} -> {cfg['features'][-1]}; the ICL maps "
                           "identity vectors to identity vectors of the same size")
    return variables, meta
