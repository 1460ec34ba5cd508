"""Test session setup: float32 parity and a persistent compilation cache."""

import os
import tempfile

import jax

# Compiled XLA programs are reused across test workers and runs.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("JAX_COMPILATION_CACHE_DIR",
                                 os.path.join(tempfile.gettempdir(), "ifadit-jax-jit-cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
# Parity is checked in float32; on GPU the default matmul precision would be TF32.
jax.config.update("jax_default_matmul_precision", "float32")
