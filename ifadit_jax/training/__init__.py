"""Training internals (paper §3.5, DESIGN §3); the entry point is `ifadit_jax.train`.

- `networks`: builds the pipeline's `Nets` and the loss networks from a config (converted files,
  fresh initializations, or random small networks for smoke runs); exports a weights folder.
- `freezing`: which leaves train, as an optax label tree over the network pytree.
- `objective`: the phase I / phase II objectives (pipeline passes + `ifadit_jax.losses`).
- `step`: the train state, the optimizer and the data-parallel train step.
- `checkpoints`: orbax checkpoints of the whole state with the data iterator.
- `writers`: JSON lines, TensorBoard event files (tensorboardX, no TensorFlow) and labelled PNG
  sample grids.
"""
