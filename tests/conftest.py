"""Test session setup: float32 parity, a persistent compilation cache, and the fixtures that several
test modules share (built once per xdist worker)."""

import os
import tempfile

import jax
import pytest

from tests.helpers import small_weights_folder

# The suite compiles far more than it computes (tiny widths, hundreds of programs). LLVM at -O1
# instead of -O3 takes 15-22% off the CPU time of compiling (measured idle: the single-phase
# training step 113 -> 88 CPU s, test_flow + test_precision + test_stylegan2 250 -> 211) and runs
# the suite's programs no slower; -O0 compiled faster still but ran training steps several times
# slower. XLA's HLO passes (fusion, the arithmetic) are the same at every level and fast-math
# stays off, so parity is checked on the same HLO programs a user runs. Set before any backend
# starts; subprocesses inherit it (tests.helpers.xla_env).
os.environ["XLA_FLAGS"] = " ".join(
    f for f in (os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=1") if f)

# Compiled XLA programs are reused across test workers, the CLI subprocesses the tests start (they
# inherit the environment) and runs. Small programs too: the CLI subprocesses compile the same
# hundreds of small ones (MTCNN's stages, preprocessing) that JAX's 0.5 s default would not keep.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "ifadit-jax-jit-cache"))
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
# Parity is checked in float32; on GPU the default matmul precision would be TF32.
os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "float32"
jax.config.update("jax_default_matmul_precision", "float32")


@pytest.fixture(scope="session")
def release_weights(tmp_path_factory):
    """The official-format release fixtures converted by the real release converter, plus the
    MTCNN detector: the weights folder that the pipeline, command-line and video tests read
    (never write). One per worker."""
    return small_weights_folder(tmp_path_factory.mktemp("release"))


# xdist: every module is one group (on one worker), so that two workers never build a module's
# fixtures and compile its programs at the same time (the persistent cache only helps the
# second worker once the first has finished a program); tests/test_train.py and the README
# commands split themselves into their own groups. Groups run in this order, then the rest in file
# order: the longest first (measured in a cold run on the 2-core machine: train_runs 315 s,
# train_own_runs 215 s, test_commands 180 s), so that no worker starts a long group while the
# other is nearly done; the README's commands after the modules whose programs they reuse from
# the cache (command lines at the same shapes).
ORDER = ("train_runs", "train_own_runs", "test_commands", "test_experiments", "test_demo",
         "readme_commands", "test_stylegan2", "test_pipeline", "test_precision")


def _group(item) -> str:
    return item.get_closest_marker("xdist_group").args[0]


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks
def pytest_collection_modifyitems(config, items):
    if not getattr(config.option, "loadgroup", False):  # not an xdist worker under loadgroup
        return
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
    rank = {name: i for i, name in enumerate(ORDER)}
    items.sort(key=lambda item: rank.get(_group(item), len(rank)))  # stable: file order otherwise
