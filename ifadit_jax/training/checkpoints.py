"""Checkpoints of the whole training state with orbax, plus the data iterator's position.

One checkpoint = WORKDIR/checkpoints/<step>/ with two items:
  state  the `TrainState` (params, batch_stats, optimizer state, step, rng, nonfinite_step) as
         numpy arrays (one host copy; the replicas are identical);
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


def read_trained(workdir: str) -> tuple[int, dict, dict]:
    """(step, params {role: ...}, batch_stats) of the latest checkpoint of another run's workdir
    (phase II's `init_from`)."""
    directory = os.path.join(os.path.abspath(workdir), SUBDIR)
    if not os.path.isdir(directory):
        raise InputError(f"init_from: {workdir} has no checkpoints (expected {directory})")
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        step = manager.latest_step()
        if step is None:
            raise InputError(f"init_from: no finished checkpoint in {directory}")
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    finally:
        manager.close()
    as_np = lambda t: jax.tree.map(np.asarray, t)  # noqa: E731
    return step, as_np(state["params"]), as_np(state.get("batch_stats") or {})
