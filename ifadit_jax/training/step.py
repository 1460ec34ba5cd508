"""Train state, optimizer and the data-parallel train step.

    state, metrics, samples = p_step(state, frozen_nets, loss_nets, images)

`make_step` returns the per-device step mapped with `jax.pmap` over axis "batch": every device
runs `train_step` on its slice of the global batch, the gradients (and metrics) are averaged with
`lax.pmean`, and every device applies the same update, so the replicas stay identical. The state
is donated. `state.params` holds the variables {role: {collection: ...}} of the roles that train
(see `freezing`): only they are differentiated, and the optimizer (`make_optimizer`, an optax
label tree) updates their "params" and leaves the rest (BatchNorm statistics) to the forward
pass; the frozen networks are an argument, not state. Both phases and every ablation use this
one step; they differ in the labels (which roles train) and in the `Objective`.

Randomness: step_rng = fold_in(state.rng, state.step); the training keys of each example come
from fold_in(step_rng, its position in the global batch) (see `objective`), so the result does
not depend on the number of devices.

Non-finite values: the first step whose loss, gradient norm or update norm is not finite
records its 1-based number in `state.nonfinite_step`. The host reads it at log, sample and
checkpoint steps (no sync every step) and stops there, before saving, so the last checkpoint is
the last good state.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ifadit_jax import losses, pipeline
from ifadit_jax.training import freezing, objective

AXIS = "batch"


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []: updates applied so far
    params: Any  # {role: {collection: ...}} of the roles that train (`freezing.carried`)
    opt_state: Any
    rng: jax.Array  # uint32 [2]: raw threefry key data (checkpoint-friendly)
    nonfinite_step: jax.Array  # int32 []: first step with a non-finite loss/grad/update, or -1

    @classmethod
    def create(cls, params, optimizer, seed: int) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params,
                   opt_state=optimizer.init(params),
                   rng=jax.random.key_data(jax.random.key(seed)),
                   nonfinite_step=jnp.full((), -1, jnp.int32))


def set_learning_rate(opt_state, lr: float):
    """`opt_state` with the learning rate of `make_optimizer`'s state set to `lr` (the config's
    value wins over a restored checkpoint's)."""
    return optax.tree_utils.tree_set(opt_state, learning_rate=np.asarray(lr, np.float32))


def make_optimizer(config, label_tree) -> optax.GradientTransformation:
    """Adam(b1, b2, eps) at `config.lr` (paper: b1 = 0, b2 = 0.999, lr 4e-4), optionally after
    global-norm clipping, on the leaves `label_tree` labels TRAIN; zero updates elsewhere. The
    learning rate is optimizer state (`inject_hyperparams`), not a compiled-in constant."""
    adam = optax.inject_hyperparams(optax.adam)(learning_rate=float(config.lr), b1=float(config.b1),
                                               b2=float(config.b2), eps=float(config.eps))
    if config.grad_clip:
        adam = optax.chain(optax.clip_by_global_norm(float(config.grad_clip)), adam)
    return freezing.optimizer(adam, label_tree)


def _norms(prefix: str, tree: dict) -> dict:
    """Global L2 norm of {role: subtree} and of each role's subtree (the TRAIN leaves)."""
    tree = freezing.select(tree, freezing.labels(tree, tuple(tree)))
    squares = {role: sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(sub))
               for role, sub in tree.items()}
    out = {prefix: jnp.sqrt(sum(squares.values()))}
    out.update({f"{prefix}/{role}": jnp.sqrt(sq) for role, sq in squares.items()})
    return out


def averaged_grads(obj: objective.Objective, state: TrainState, frozen: pipeline.Nets,
                   loss_nets: losses.LossNets, images):
    """One device's objective and gradients w.r.t. `state.params`, averaged over the devices.
    Returns (terms {name: scalar, "loss": total}, grads, the collections the forward pass
    updated {role: {collection: ...}}, samples). images: [b, 256, 256, 3] in [0, 1], this device's slice; runs under
    `pmap(axis_name=AXIS)`."""
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    first_example = jax.lax.axis_index(AXIS) * images.shape[0]

    loss_fn = functools.partial(_loss, obj, frozen, loss_nets, images, step_rng, first_example)
    (_, (terms, updated, samples)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    return jax.lax.pmean(terms, AXIS), jax.lax.pmean(grads, AXIS), updated, samples


def _loss(obj, frozen, loss_nets, images, step_rng, first_example, params):
    nets = frozen.with_variables(params)
    loss, terms, updated, samples = objective.compute(obj, nets, loss_nets, images, step_rng,
                                                      first_example)
    return loss, (terms, updated, samples)


def _with_updated(params: dict, updated: dict) -> dict:
    """`params` with the collections the forward pass updated (synchronized BatchNorm: already
    equal on every device) replacing the optimizer's (zero) update of them."""
    return {role: {**v, **updated.get(role, {})} for role, v in params.items()}


def train_step(obj: objective.Objective, optimizer, state: TrainState, frozen: pipeline.Nets,
               loss_nets: losses.LossNets, images):
    """One device's step (see `averaged_grads`) -> (state, metrics, samples)."""
    terms, grads, updated, samples = averaged_grads(obj, state, frozen, loss_nets, images)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = _with_updated(optax.apply_updates(state.params, updates), updated)

    norms = {**_norms("grad_norm", grads), **_norms("param_norm", state.params),
             **_norms("update_norm", updates)}
    # A non-finite gradient or update makes its norm non-finite. The update is applied anyway:
    # the host stops at the recorded step and never checkpoints a state from that step on.
    finite = (jnp.isfinite(terms["loss"]) & jnp.isfinite(norms["grad_norm"])
              & jnp.isfinite(norms["update_norm"]))
    step = state.step + 1
    new_state = state.replace(
        step=step, params=params, opt_state=opt_state,
        nonfinite_step=jnp.where((state.nonfinite_step < 0) & ~finite, step, state.nonfinite_step))
    metrics = {**terms, **norms, "finite": finite.astype(jnp.float32)}
    return new_state, metrics, samples


class _TracedOnce:
    """`fn` that raises when traced a second time (a silent recompilation). The count belongs to
    this object, so every `make_step` starts its own (chex's counters are process-wide, keyed by
    where the function is defined)."""

    def __init__(self, fn):
        self.fn, self.traces = fn, 0
        functools.update_wrapper(self, fn)
        self.__name__ = getattr(fn, "__name__", None) or fn.func.__name__

    def __call__(self, *args):
        self.traces += 1
        if self.traces > 1:
            raise AssertionError(f"{self.__name__} traced > 1 times: a changed shape or dtype "
                                 "recompiles the train step")
        return self.fn(*args)


def make_step(obj: objective.Objective, optimizer, devices):
    """The pmapped train step over `devices` (donates the state). Traced once: a second trace
    (a silent recompilation, e.g. from a changed shape or dtype) raises."""
    step = _TracedOnce(functools.partial(train_step, obj, optimizer))
    # Multi-host: pmap spans every process's devices (each process feeds its local ones), which
    # is what `devices=None` means there; a device list would have to name all of them.
    return jax.pmap(step, axis_name=AXIS, devices=devices if jax.process_count() == 1 else None,
                    donate_argnums=(0,))


# ----------------------------------------------------------------------------- placement

def _mesh_sharding(devices):
    mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


def replicate(tree, devices):
    """One copy of every leaf per device, laid out as `pmap` expects ([n_devices, ...])."""
    sharding, n = _mesh_sharding(devices), len(devices)
    return jax.tree.map(
        lambda a: jax.device_put(np.broadcast_to(np.asarray(a), (n, *np.shape(a))), sharding), tree)


def shard_batch(images: np.ndarray, devices):
    """Host batch [b, ...] -> [n_devices, b / n_devices, ...] placed on the devices."""
    n = len(devices)
    images = np.asarray(images)
    return jax.device_put(images.reshape(n, images.shape[0] // n, *images.shape[1:]),
                          _mesh_sharding(devices))


def unreplicate(tree):
    """The first device's copy of a replicated pytree, as numpy arrays on the host."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_shards[0].data)[0], tree)
