"""Atomic file writes and output-path safety: an output appears whole or not at all, respects
the umask, and never replaces an input or a file this tool did not write.

Temporary files are named `.tmp-ifadit-<pid>-*` beside their target; a run killed mid-write
leaves one behind, and the next run in that output folder removes those whose process is gone
(`remove_stale_temporaries`: a concurrent run's temporaries stay). They are never taken as
inputs.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator

from ifadit_jax.errors import InputError

TMP_PREFIX = ".tmp-ifadit-"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, force: bool = True) -> Iterator[str]:
    """Yields a temporary path beside `path`; renames it onto `path` only if the block succeeds.

    The file gets the permissions an ordinary `open` would (0o666 minus the umask), not
    mkstemp's 0600. Raises InputError if the parent directory does not exist, if `path` exists
    and not `force`, or on any write error (disk full, read-only folder); nothing partial stays.
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InputError(f"output directory does not exist: {parent}")
    if os.path.exists(path) and not force:
        raise InputError(f"output exists, not overwriting (use --force): {path}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-",
                                   suffix=os.path.splitext(path)[1], dir=parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
    except OSError as e:
        raise InputError(f"cannot write in {parent}: {e.strerror}") from None
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def is_temporary(name: str) -> bool:
    return os.path.basename(name).startswith(TMP_PREFIX)


def _writer_alive(name: str) -> bool:
    """Whether the process that named this temporary (`.tmp-ifadit-<pid>-...`) still runs."""
    pid = os.path.basename(name)[len(TMP_PREFIX):].split("-", 1)[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's live process (or unknowable): leave it
    return True


def remove_stale_temporaries(folder: str, recursive: bool = True) -> int:
    """Removes the `.tmp-ifadit-*` regular files in `folder` (and below it if `recursive`) whose
    writing process is gone; returns how many. Symlinks and other file types with that name
    are left alone."""
    removed = 0
    if not os.path.isdir(folder):
        return 0
    for root, dirs, names in os.walk(folder):
        if not recursive:
            dirs.clear()
        for name in names:
            p = os.path.join(root, name)
            if is_temporary(name) and os.path.isfile(p) and not os.path.islink(p) \
                    and not _writer_alive(name):
                with contextlib.suppress(OSError):
                    os.unlink(p)
                    removed += 1
    return removed


def nearest_existing(path: str) -> str:
    """The deepest existing folder on the way to `path` (where a new output would be created)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def real(path: str) -> str:
    """`os.path.realpath`, also for a path that does not exist yet (its existing part resolved)."""
    return os.path.realpath(path)


def inside(path: str, folder: str) -> bool:
    """Whether resolved `path` is `folder` or lies below it (both resolved by the caller)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)
