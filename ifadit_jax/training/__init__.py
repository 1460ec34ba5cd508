"""Training internals (paper §3.5, DESIGN §3); the entry point is `ifadit_jax.train`.

- `networks`: builds the pipeline's `Nets` and the loss networks from a config (converted files,
  fresh initializations, or random small networks for smoke runs); splits `Nets` into the
  trainable pytree and the frozen rest, and merges them back; exports a weights folder.
- `objective`: the phase I / phase II objectives (pipeline passes + `ifadit_jax.losses`).
- `step`: the train state, the optimizer and the data-parallel train step.
- `checkpoints`: orbax checkpoints of the whole state with the data iterator.
- `writers`: JSON lines, TensorBoard event files (no TensorFlow needed) and PNG sample grids.
"""
