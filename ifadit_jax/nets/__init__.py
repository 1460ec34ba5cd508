"""The networks of iFADIT and of its losses and metrics, as Flax modules with their converters'
layouts."""

import jax
import jax.numpy as jnp


def as_float(x) -> jax.Array:
    """x as a float array, never narrower than float32: integer, float16 and bfloat16 input is
    computed in float32; float64 input (under `jax_enable_x64`) stays float64, so that a float64
    computation is float64 throughout."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))
