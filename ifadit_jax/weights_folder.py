"""Weights folders: one converted file per role plus `manifest.json`, written and read in one place.

The release converter (`ports/release.py`) and the trainer's export both write through `write`;
`pipeline.load` reads the manifest through `read_manifest`. One weights-id rule for both: the
sha256 of every tensor's name and bytes, role by role (so the id names the numbers, not where
they came from).

Replacing a folder (`force=True`) touches only a folder this tool wrote (a valid manifest and
exactly the files it names), never one that overlaps a source, and is crash-safe: the new folder
is built under a hidden name beside OUT (`.tmp-ifadit-<OUT name>-<8 chars>`, holding a marker
file while incomplete) and swapped in with one atomic exchange, so a SIGKILL at any moment
leaves OUT holding the old or the new folder, complete. The next write to the same OUT removes
the leftovers it can prove are its own (its name pattern plus the marker, or a complete folder
this tool wrote, or an empty one).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np

from ifadit_jax import weights
from ifadit_jax.errors import InputError, WeightsError

MANIFEST = "manifest.json"
FORMAT = "ifadit-jax-weights/1"
CONVENTIONS = ("paper", "official")
MAX_MANIFEST_BYTES = 1 << 20
MAX_ROLES = 64
_MARKER = ".ifadit-jax-incomplete"
_MAX_MARKER_BYTES = 4096
# mkdtemp appends 8 characters from this alphabet; matching it exactly keeps OUT "a" from
# claiming the leftovers of OUT "a-b".
_TMP_SUFFIX = r"[a-z0-9_]{8}"
_SAFE_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\.safetensors")
_ROLE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_HEX = re.compile(r"[0-9a-f]+")
_REQUIRED_FILE_KEYS = {"file": str, "kind": str, "sha256": str}
_OPTIONAL_FILE_KEYS = {"source_file": str, "source_sha256": str, "config": dict}

Networks = Mapping[str, tuple[str, Mapping[str, Any], weights.Meta]]


def _step(name: str) -> None:
    """Called between the writer's steps; tests replace it to kill the process there."""


def weights_id(networks: Networks) -> str:
    """16 hex digits of the sha256 over each role's tensors (sorted names and raw bytes)."""
    digest = hashlib.sha256()
    for role, (_, variables, _) in sorted(networks.items()):
        digest.update(role.encode())
        for key, arr in sorted(weights.flatten(variables).items()):
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()[:16]


def write(out_dir: str | os.PathLike, networks: Networks, conventions: str, *,
          force: bool = False, sources: Sequence[str | os.PathLike] = ()) -> dict:
    """Writes `networks` {role: (file name, variables, meta)} and the manifest as one folder.

    `force` replaces an existing OUT only if this tool wrote it; OUT may never be, contain or lie
    inside any of `sources` (compared after resolving symlinks). Returns the manifest.
    """
    out = os.path.abspath(os.fspath(out_dir))
    check_target(out, force=force, sources=sources)
    parent, name = os.path.split(out)
    clean_leftovers(parent, name)
    tmp, manifest = _build(parent, name, networks, conventions)
    try:
        _install(tmp, out)
    except OSError as e:
        if os.path.isdir(tmp):
            _discard(tmp)
        raise InputError(f"cannot move the new weights folder into place at {out}: "
                         f"{e.strerror or e}") from None
    return manifest


# ---------------------------------------------------------------------------------- checks


def _inside(path: str, folder: str) -> bool:
    return path != folder and os.path.commonpath([path, folder]) == folder


def check_target(out: str, *, force: bool, sources: Sequence[str | os.PathLike] = ()) -> None:
    """Refuses an OUT that overlaps a source, or exists and is not replaceable (see `write`)."""
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise InputError(f"output directory does not exist: {parent}")
    real = os.path.realpath(out)
    for src in sources:
        src_real = os.path.realpath(os.fspath(src))
        how = ("is" if real == src_real else "contains" if _inside(src_real, real)
               else "is inside" if _inside(real, src_real) else None)
        if how:
            raise InputError(f"output folder {out} {how} the source {os.fspath(src)}; choose "
                             "another output folder")
    if not os.path.lexists(out):
        return
    if not force:
        raise InputError(f"output exists, not overwriting (use --force): {out}")
    if os.path.islink(out) or not os.path.isdir(out):
        raise InputError(f"{out} is not a weights folder this tool wrote (not a folder); "
                         "not replacing it")
    if not os.path.lexists(os.path.join(out, MANIFEST)):
        raise InputError(f"{out} is not a weights folder this tool wrote (no {MANIFEST}); not "
                         "replacing it")
    try:
        _check_own(out)
    except WeightsError as e:
        raise InputError(f"{out} is not a weights folder this tool wrote, not replacing it: "
                         f"{e}") from None


def _check_own(path: str) -> dict:
    """The manifest of `path` if it holds exactly a valid manifest and the regular files it names;
    WeightsError naming what else is there otherwise."""
    manifest = read_manifest(path)
    named = {MANIFEST} | {entry["file"] for entry in manifest["files"].values()}
    entries = sorted(os.listdir(path))
    others = [e for e in entries if e not in named
              or not stat.S_ISREG(os.lstat(os.path.join(path, e)).st_mode)]
    missing = sorted(named - set(entries))
    if others or missing:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise WeightsError(f"it holds {shown or 'nothing else'} besides the manifest's files"
                           + (f" and lacks {', '.join(missing[:5])}" if missing else ""))
    return manifest


def is_own_folder(path: str) -> bool:
    try:
        _check_own(path)
        return True
    except (WeightsError, OSError):
        return False


# ---------------------------------------------------------------------------------- writing


def _build(parent: str, name: str, networks: Networks, conventions: str) -> tuple[str, dict]:
    """Writes the new folder under a hidden name beside OUT; -> (its path, the manifest)."""
    if conventions not in CONVENTIONS:
        raise WeightsError(f"unknown conventions {conventions!r}")
    tmp = tempfile.mkdtemp(prefix=f".tmp-ifadit-{name}-", dir=parent)
    try:
        _step("created")
        _write_json(os.path.join(tmp, _MARKER), {"pid": os.getpid()})
        _step("marked")
        files = {}
        for role, (file_name, variables, meta) in sorted(networks.items()):
            _check_entry_names(role, file_name, "network to write")
            path = os.path.join(tmp, file_name)
            weights.save(path, variables, meta)
            files[role] = {"file": file_name, "kind": meta.kind, "source_file": meta.source_file,
                           "source_sha256": meta.source_sha256, "config": meta.config,
                           "sha256": weights.sha256_file(path)}
            _step("file")
        manifest = {"format": FORMAT, "conventions": conventions,
                    "weights_id": weights_id(networks), "files": files}
        _write_json(os.path.join(tmp, MANIFEST), manifest)
        _step("manifest")
        os.unlink(os.path.join(tmp, _MARKER))
        _step("complete")
        return tmp, manifest
    except BaseException:
        _discard(tmp)
        raise


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps two paths (Linux renameat2); False where the system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (38, 22, 95):  # ENOSYS, EINVAL, EOPNOTSUPP: no exchange here, use the fallback
        return False
    raise OSError(errno, os.strerror(errno), b)


def _install(tmp: str, out: str) -> None:
    """Moves the complete folder `tmp` to `out`, replacing an existing (checked) `out`."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        _step("renamed")
        return
    if _exchange(tmp, out):
        _step("exchanged")
        _discard(tmp)  # now the old folder
        return
    # Without an atomic exchange OUT is briefly missing; the old folder waits under `.old-`
    # and the next run moves it back if this one dies before the new folder is in place.
    parent, name = os.path.split(out)
    aside = tempfile.mkdtemp(prefix=f".old-ifadit-{name}-", dir=parent)
    os.rename(out, aside)
    _step("set-aside")
    os.rename(tmp, out)
    _step("renamed")
    _discard(aside)


# ---------------------------------------------------------------------------------- leftovers


def _marker_pid(path: str) -> int | None:
    """The pid recorded in a leftover's marker, or None if there is no readable marker."""
    marker = os.path.join(path, _MARKER)
    try:
        st = os.lstat(marker)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_MARKER_BYTES:
            return None
        with open(marker) as f:
            pid = json.loads(f.read(_MAX_MARKER_BYTES)).get("pid")
    except (OSError, ValueError, AttributeError):
        return None
    return pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _provably_own_leftover(path: str) -> bool:
    """Empty, or marked by a writer that is no longer running, or a complete folder we wrote."""
    entries = os.listdir(path)
    if not entries:
        return True
    if _MARKER in entries:
        pid = _marker_pid(path)
        return pid is not None and not _alive(pid)
    return is_own_folder(path)


def clean_leftovers(parent: str, name: str) -> list[str]:
    """Removes what killed writes to `parent/name` left behind; restores a set-aside old folder
    if OUT itself is missing. Returns the paths removed or restored."""
    out = os.path.join(parent, name)
    pattern = re.compile(rf"\.(tmp|old)-ifadit-{re.escape(name)}-{_TMP_SUFFIX}")
    done = []
    for entry in sorted(os.listdir(parent)):
        match = pattern.fullmatch(entry)
        path = os.path.join(parent, entry)
        if not match or os.path.islink(path) or not os.path.isdir(path):
            continue
        try:
            if match.group(1) == "old" and not os.path.lexists(out) and is_own_folder(path):
                os.rename(path, out)
            elif _provably_own_leftover(path):
                _discard(path)
            else:
                continue
        except OSError:
            continue  # another process got there first; nothing of the user's is touched
        done.append(path)
    return done


def _discard(path: str) -> None:
    """Removes a folder of ours; the marker goes last, so a kill midway leaves it provable."""
    marker = os.path.join(path, _MARKER)
    if not os.path.lexists(marker):
        _write_json(marker, {"pid": os.getpid()})
    for entry in os.listdir(path):
        if entry == _MARKER:
            continue
        full = os.path.join(path, entry)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        else:
            os.unlink(full)
        _step("discarding")
    os.unlink(marker)
    _step("unmarked")
    os.rmdir(path)


# ---------------------------------------------------------------------------------- reading


def _read_bounded(path: str) -> bytes:
    """The bytes of a regular file of at most MAX_MANIFEST_BYTES; never blocks on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise WeightsError(f"{path}: not a regular file")
        if st.st_size > MAX_MANIFEST_BYTES:
            raise WeightsError(f"{path}: {st.st_size} bytes, more than a manifest may have "
                               f"({MAX_MANIFEST_BYTES})")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_MANIFEST_BYTES:
        raise WeightsError(f"{path}: more than {MAX_MANIFEST_BYTES} bytes")
    return data


def read_manifest(weights_dir: str | os.PathLike) -> dict:
    """Reads and validates `weights_dir/manifest.json`; WeightsError (one line) if it is not one."""
    weights_dir = os.fspath(weights_dir)
    path = os.path.join(weights_dir, MANIFEST)
    if not os.path.lexists(path):
        raise WeightsError(f"{weights_dir}: not an ifadit-jax weights folder (no {MANIFEST}; make "
                           "one with: python ports/convert_ifadit.py release SRC_DIR OUT_DIR)")
    data = _read_bounded(path)
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WeightsError(f"{path}: not valid JSON ({type(e).__name__})") from None
    validate_manifest(manifest, path)
    return manifest


def validate_manifest(manifest: Any, what: str) -> None:
    """The manifest schema: format, conventions, weights_id and a files map with safe names."""
    if not isinstance(manifest, dict):
        raise WeightsError(f"{what}: not a JSON object")
    unknown = sorted(set(manifest) - {"format", "conventions", "weights_id", "files"})
    if unknown:
        raise WeightsError(f"{what}: unknown field(s) {', '.join(map(repr, unknown[:5]))}")
    if manifest.get("format") != FORMAT:
        raise WeightsError(f"{what}: 'format' is not {FORMAT!r} (not an ifadit-jax weights folder, "
                           "or written by another version)")
    if manifest.get("conventions") not in CONVENTIONS:
        raise WeightsError(f"{what}: 'conventions' must be one of {', '.join(CONVENTIONS)}")
    if not _is_hex(manifest.get("weights_id"), 16):
        raise WeightsError(f"{what}: 'weights_id' must be 16 lowercase hex digits")
    files = manifest.get("files")
    if not isinstance(files, dict) or not 0 < len(files) <= MAX_ROLES:
        raise WeightsError(f"{what}: 'files' must map 1 to {MAX_ROLES} roles to their files")
    seen = set()
    for role, entry in files.items():
        _validate_file_entry(role, entry, what)
        if entry["file"] in seen:
            raise WeightsError(f"{what}: {entry['file']!r} is named by two roles")
        seen.add(entry["file"])


def _is_hex(value: Any, n: int) -> bool:
    return isinstance(value, str) and len(value) == n and _HEX.fullmatch(value) is not None


def _check_entry_names(role: Any, file_name: Any, what: str) -> None:
    if not isinstance(role, str) or not _ROLE.fullmatch(role):
        raise WeightsError(f"{what}: role {str(role)[:40]!r} is not a role name")
    if (not isinstance(file_name, str) or not _SAFE_FILE.fullmatch(file_name)
            or ".." in file_name):
        raise WeightsError(f"{what}: the {role} file name {str(file_name)[:80]!r} is not a plain "
                           "'NAME.safetensors' inside the folder")


def _validate_file_entry(role: Any, entry: Any, what: str) -> None:
    if not isinstance(entry, dict):
        raise WeightsError(f"{what}: files[{str(role)[:40]!r}] is not an object")
    _check_entry_names(role, entry.get("file"), what)
    for key, typ in _REQUIRED_FILE_KEYS.items():
        if not isinstance(entry.get(key), typ):
            raise WeightsError(f"{what}: files.{role}.{key} is missing or not a {typ.__name__}")
    for key, typ in _OPTIONAL_FILE_KEYS.items():
        if key in entry and not isinstance(entry[key], typ):
            raise WeightsError(f"{what}: files.{role}.{key} is not a {typ.__name__}")
    unknown = sorted(set(entry) - set(_REQUIRED_FILE_KEYS) - set(_OPTIONAL_FILE_KEYS))
    if unknown:
        raise WeightsError(f"{what}: files.{role} has unknown field(s) "
                           f"{', '.join(repr(u[:40]) for u in unknown[:5])}")
    if not _is_hex(entry["sha256"], 64):
        raise WeightsError(f"{what}: files.{role}.sha256 must be 64 lowercase hex digits")
    if not _ROLE.fullmatch(entry["kind"]):  # weights.read checks it names the role's network
        raise WeightsError(f"{what}: files.{role}.kind {entry['kind'][:40]!r} is not a kind name")
