"""Checkpoints of the whole training state with orbax, plus the data iterator's position.

One checkpoint = WORKDIR/checkpoints/<step>/ with two items:
  state  the `TrainState` (params: {role: {collection: ...}} of the roles that train, BatchNorm
         statistics included; optimizer state, step, rng, nonfinite_step) as numpy arrays (one
         host copy; the replicas are identical);
  data   the grain iterator state (`grain.checkpoint.CheckpointSave`, one JSON per process),
         taken after the step's batch was drawn, so a restored iterator yields the next batch.
Saving is asynchronous (orbax writes in the background while training goes on) and atomic (a
step directory appears only when complete; a run killed mid-save leaves the previous checkpoint
as the latest). The newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from ifadit_jax.errors import InputError

SUBDIR = "checkpoints"


class Checkpoints:
    def __init__(self, workdir: str, keep: int):
        if keep < 1:
            raise InputError(f"keep_checkpoints must be at least 1, got {keep}")
        self.directory = os.path.join(os.path.abspath(workdir), SUBDIR)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, iterator) -> None:
        """state: a host (numpy) pytree; iterator: the grain iterator of the training data."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)),
            force=True)

    def restore(self, step: int, target, iterator):
        """Restores into the structure of `target` (a host pytree) and moves `iterator` to the
        saved position; returns the state."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=grain.checkpoint.CheckpointRestore(iterator)))
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _manager(directory: str) -> ocp.CheckpointManager:
    """A manager for reading `directory`, which must exist. Not `read_only`: orbax logs a
    warning for every read-only manager, and reading writes nothing anyway."""
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))


def read_trained(workdir: str) -> tuple[int, dict]:
    """(step, {role: {collection: ...}}) of the roles trained in the latest checkpoint of another
    run's workdir (phase II's `init_from`)."""
    directory = os.path.join(os.path.abspath(workdir), SUBDIR)
    if not os.path.isdir(directory):
        raise InputError(f"init_from: {workdir} has no checkpoints (expected {directory})")
    manager = _manager(directory)
    try:
        step = manager.latest_step()
        if step is None:
            raise InputError(f"init_from: no finished checkpoint in {directory}")
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    finally:
        manager.close()
    return step, jax.tree.map(np.asarray, state["params"])
