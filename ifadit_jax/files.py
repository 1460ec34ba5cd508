"""Atomic file writes: an output appears whole or not at all, and never replaces an input."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator

from ifadit_jax.errors import InputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, force: bool = True) -> Iterator[str]:
    """Yields a temporary path beside `path`; renames it onto `path` only if the block succeeds.

    Raises InputError if the parent directory does not exist, or if `path` exists and not `force`.
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InputError(f"output directory does not exist: {parent}")
    if os.path.exists(path) and not force:
        raise InputError(f"output exists, not overwriting (use --force): {path}")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
