"""Freezing as data: a label tree over the network pytree, read from the role registry.

The network pytree is `nets.weights_tree()` (`pipeline.Nets`), {role: {collection: tree}}. `labels` marks
every leaf TRAIN (the "params" collection of a role the phase trains: `config.trainable`, roles
of `roles.TRAINABLE_ROLES`) or FROZEN (everything else: frozen roles, BatchNorm statistics,
constants). The optimizer is `optax.multi_transform` over these labels with
`optax.set_to_zero()` for FROZEN, so a frozen leaf never moves whatever its gradient.

Only the roles with a TRAIN leaf travel in the train state and are differentiated (`carried`):
differentiating the frozen generator, encoders and parser as well would double the compiled
step and its memory for gradients that are thrown away. The frozen roles are an argument of the
step (`nets.without(carried)`), one copy per device.
"""

from __future__ import annotations

import jax
import optax

from ifadit_jax import roles
from ifadit_jax.errors import InputError

TRAIN = "train"
FROZEN = "frozen"
TRAINED_COLLECTION = "params"  # batch_stats are state updated by the forward pass


def check_trainable(names) -> tuple[str, ...]:
    """`config.trainable` as distinct roles of the registry, in registry order."""
    names = tuple(names)
    unknown = sorted(set(names) - set(roles.TRAINABLE_ROLES))
    if unknown or not names or len(set(names)) != len(names):
        raise InputError(f"trainable must be distinct roles among {roles.TRAINABLE_ROLES}, "
                         f"got {names}")
    return tuple(r for r in roles.TRAINABLE_ROLES if r in names)


def labels(tree: dict, trainable) -> dict:
    """TRAIN / FROZEN for every leaf of the network pytree `tree` ({role: {collection: ...}})."""
    trainable = set(trainable)

    def label(path, _):
        role, collection = path[0].key, path[1].key
        return TRAIN if role in trainable and collection == TRAINED_COLLECTION else FROZEN

    return jax.tree_util.tree_map_with_path(label, tree)


def carried(tree: dict, label_tree: dict) -> tuple[str, ...]:
    """The roles of `tree` with at least one TRAIN leaf (those the train state carries)."""
    return tuple(role for role in tree if TRAIN in jax.tree.leaves(label_tree[role]))


def select(tree: dict, label_tree: dict, label: str = TRAIN) -> dict:
    """{role: {collection: ...}} of the leaves labelled `label` (collections without one left
    out): e.g. the trained parameters for their norms."""
    out = {}
    for role, variables in tree.items():
        kept = {c: sub for c, sub in variables.items()
                if label in jax.tree.leaves(label_tree[role][c])}
        if kept:
            out[role] = kept
    return out


def optimizer(inner: optax.GradientTransformation, label_tree: dict) -> optax.GradientTransformation:
    """`inner` on the TRAIN leaves; FROZEN leaves get zero updates."""
    return optax.multi_transform({TRAIN: inner, FROZEN: optax.set_to_zero()}, label_tree)
