"""ifadit-jax: invertible face anonymization (iFADIT) in JAX/Flax."""

from ifadit_jax.weights import load

__all__ = ["load"]
__version__ = "0.1.0"
