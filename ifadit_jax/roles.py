"""The network roles of the iFADIT pipeline, one row each.

Every place that handles networks by role reads these rows: `pipeline.load` and
`pipeline.nets_from_loaded` (which file, which kind, optional or not, where in `Nets`), the
release converter (file names), training (which roles a phase trains, fresh initialization of a
trainable network, export of a weights folder) and the random/demo builders
(`ifadit_jax.random_nets`: module builder and init inputs).

Adding a role: one row here, its module (with a `weights` loader for its kind), and its two
fields in `pipeline.Nets` (`<prefix>_module`, `<prefix>_vars`).

`weights_of(nets, role)` / `with_weights(nets, role, variables)` read and replace one role's
variables ({collection: tree}); `weights_tree(nets)` is the whole network pytree {role: variables}
that training labels for the optimizer (see `ifadit_jax.training.freezing`).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Role:
    """One network role.

    name: the role's key (also the key in weights trees, manifests and checkpoints).
    file: its file name in a weights folder.
    kind: its network kind (`ifadit_jax.weights.loader(kind)`).
    field: the `pipeline.Nets` field holding its weights; `module_field` its Flax module (None
      for the flow, whose parameters carry their own static config).
    builder: "module:function" turning a config dict into the Flax module (None: the role has
      its own initializer, see `ifadit_jax.random_nets`).
    init_inputs: input shapes for `module.init` (one tuple per positional input).
    trainable_in: the training phases whose default config trains it (DESIGN §3).
    optional: a weights folder may lack it (no ICL: the ablation; no parser: no refinement).
    """

    name: str
    file: str
    kind: str
    field: str
    module_field: str | None
    builder: str | None
    init_inputs: tuple[tuple[int, ...], ...] = ()
    trainable_in: tuple[int, ...] = ()
    optional: bool = False

    def build(self, config: dict):
        """The Flax module of this role for `config` (roles with a builder only)."""
        module_name, fn_name = self.builder.split(":")
        return getattr(importlib.import_module(module_name), fn_name)(config)


ROLES: dict[str, Role] = {r.name: r for r in (
    Role("id_encoder", "arcface.safetensors", "arcface", "id_vars", "id_module",
         "ifadit_jax.nets.arcface:module_from_config", ((1, 112, 112, 3),)),
    Role("attr_encoder", "psp_encoder.safetensors", "psp_encoder", "attr_vars", "attr_module",
         "ifadit_jax.nets.psp:module_from_config", ((1, 256, 256, 3),), trainable_in=(1,)),
    Role("mapper", "latent_mapper.safetensors", "latent_mapper", "mapper_vars", "mapper_module",
         "ifadit_jax.roles:latent_mapper_module", ((1, 14, 1024),), trainable_in=(1,)),
    Role("generator", "stylegan2.safetensors", "stylegan2", "generator_vars", "generator_module",
         None),
    Role("flow", "sif.safetensors", "sif", "flow", None, None, trainable_in=(2,)),
    Role("icl", "icl.safetensors", "icl", "icl_vars", "icl_module",
         "ifadit_jax.roles:icl_module", ((1, 512),), trainable_in=(2,), optional=True),
    Role("parser", "bisenet.safetensors", "bisenet", "parser_vars", "parser_module",
         "ifadit_jax.nets.bisenet:module_from_config", ((1, 512, 512, 3),), optional=True),
)}
TRAINABLE_ROLES = tuple(r.name for r in ROLES.values() if r.trainable_in)


def trainable_in(phase: int) -> tuple[str, ...]:
    """The roles a phase trains by default (configs/phaseN.py)."""
    return tuple(r.name for r in ROLES.values() if phase in r.trainable_in)


def present(nets) -> tuple[str, ...]:
    """The roles `nets` holds weights for."""
    return tuple(name for name, r in ROLES.items() if getattr(nets, r.field) is not None)


def weights_of(nets, role: str) -> dict:
    """{collection: tree} of one role; the flow as {"params": {"block_i": ...}} (its
    permutations are static, part of `nets.flow`)."""
    r = ROLES[role]
    value = getattr(nets, r.field)
    if r.module_field is None:
        return {"params": {f"block_{i}": b for i, b in enumerate(value.blocks)}}
    return dict(value)


def with_weights(nets, role: str, variables: dict):
    """`nets` with one role's variables replaced (collections absent from `variables` kept)."""
    r = ROLES[role]
    if r.module_field is None:
        blocks = variables["params"]
        flow = getattr(nets, r.field).replace(
            blocks=tuple(blocks[f"block_{i}"] for i in range(len(blocks))))
        return nets.replace(**{r.field: flow})
    return nets.replace(**{r.field: {**getattr(nets, r.field), **variables}})


def file_variables(nets, role: str) -> dict:
    """One role's variables as numpy arrays in the on-disk layout (the flow with its
    permutations, `flow.to_variables`)."""
    import jax
    import numpy as np

    from ifadit_jax import flow as flow_lib

    value = getattr(nets, ROLES[role].field)
    if ROLES[role].module_field is None:
        return flow_lib.to_variables(value)
    return jax.tree.map(np.asarray, dict(value))


def weights_tree(nets, roles=None) -> dict[str, dict]:
    """The whole network pytree {role: {collection: tree}} (of `roles`, default all present)."""
    return {role: weights_of(nets, role) for role in (present(nets) if roles is None else roles)}


def with_weights_tree(nets, tree: dict[str, dict]):
    """Inverse of `weights_tree`: every role of `tree` replaced in `nets`."""
    for role, variables in tree.items():
        nets = with_weights(nets, role, variables)
    return nets


def without(nets, roles):
    """`nets` without the weights of `roles` (a frozen bundle holds no second copy of what
    trains): the flow keeps its static config and permutations, the other roles their
    module."""
    changes = {}
    for role in roles:
        r = ROLES[role]
        changes[r.field] = (getattr(nets, r.field).replace(blocks=()) if r.module_field is None
                            else {})
    return nets.replace(**changes)


def drop(nets, role: str):
    """`nets` without `role` at all (module and weights): an optional role left out."""
    r = ROLES[role]
    if not r.optional:
        raise ValueError(f"role {role!r} is not optional")
    return nets.replace(**{r.field: None, r.module_field: None})


def from_loaded(loaded: dict[str, Any], make: Callable, **static):
    """`make(**fields)` (the `Nets` constructor) from loaded networks {role: object with
    .module/.variables; the flow with .params}; absent optional roles are None."""
    fields = dict(static)
    for name, r in ROLES.items():
        net = loaded.get(name)
        if net is None:
            if not r.optional:
                raise KeyError(f"missing network for role {name!r}")
            fields[r.field] = None
            if r.module_field:
                fields[r.module_field] = None
        elif r.module_field is None:
            fields[r.field] = net.params
        else:
            fields[r.field], fields[r.module_field] = net.variables, net.module
    return make(**fields)


def latent_mapper_module(config: dict):
    """M's module for a `latent_mapper` config ({"features", "in_features", "negative_slope"})."""
    from ifadit_jax.nets import mappers

    return mappers.LatentMapper(features=tuple(int(f) for f in config["features"]),
                                negative_slope=float(config["negative_slope"]))


def icl_module(config: dict):
    """C's module for an `icl` config ({"features", "in_features", "negative_slope"})."""
    from ifadit_jax.nets import mappers

    return mappers.ICL(features=tuple(int(f) for f in config["features"]),
                       negative_slope=float(config["negative_slope"]))
