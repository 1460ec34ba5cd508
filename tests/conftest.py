"""Test session setup: float32 parity, a persistent compilation cache, and the fixtures that several
test modules share (built once per xdist worker)."""

import os
import tempfile

import jax
import pytest

from tests.helpers import small_weights_folder

# Compiled XLA programs are reused across test workers and runs.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("JAX_COMPILATION_CACHE_DIR",
                                 os.path.join(tempfile.gettempdir(), "ifadit-jax-jit-cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
# Parity is checked in float32; on GPU the default matmul precision would be TF32.
jax.config.update("jax_default_matmul_precision", "float32")


@pytest.fixture(scope="session")
def release_weights(tmp_path_factory):
    """The official-format release fixtures converted by the real release converter, plus the
    MTCNN detector: the weights folder that the pipeline, command-line and video tests read
    (never write). One per worker."""
    return small_weights_folder(tmp_path_factory.mktemp("release"))
