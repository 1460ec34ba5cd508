"""What every converter shares: layout hooks, the renaming table, and the command-line shell.

Every converter is a plain function `convert(src, **options) -> (variables, meta)`: it reads an
official checkpoint with `ports.reader`, infers the network config from the tensor shapes, checks
every size in that config against `LIMITS` before anything is allocated from it, renames every
tensor through one table (official key -> our path, plus a layout hook) and ends with `finish`
(limits, `jax.eval_shape` of the Flax module, every leaf compared, provenance). Any missing,
extra or misshapen parameter is an error that names it; nothing is loaded partially. The
command-line shells (`converter_main`, `run_converter`) only parse arguments, refuse an unsafe
OUT up front, and write the file atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import stat
import struct
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ifadit_jax import cli, files, weights
from ifadit_jax.errors import IfaditError, InputError, WeightsError
from ports.reader import flatten_state_dict, read_checkpoint

CONVERTER_VERSION = "1"


def linear(w: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> Flax kernel [in, out]."""
    return np.ascontiguousarray(w.T)


def conv(w: np.ndarray) -> np.ndarray:
    """torch Conv2d weight [O, I, kh, kw] -> Flax kernel [kh, kw, I, O] (HWIO)."""
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def same(w: np.ndarray) -> np.ndarray:
    return w


def f32(w: np.ndarray) -> np.ndarray:
    """Checkpoints may store float16/bfloat16; ports compute in float32."""
    w = np.asarray(w)
    return w.astype(np.float32) if np.issubdtype(w.dtype, np.floating) or w.dtype.kind == "V" or str(
        w.dtype) == "bfloat16" else w


Rule = tuple[str, str, Callable[[np.ndarray], np.ndarray]]


def apply_table(state: Mapping[str, np.ndarray], rules: Iterable[Rule], what: str,
                ignore: Callable[[str], bool] = lambda k: False) -> dict[str, Any]:
    """Renames `state` through `rules` = [(official_key, 'collection/our/path', hook)].

    Every official key must be consumed by a rule or matched by `ignore`; every rule must find its
    key. Returns nested {collection: {...}} with float32 leaves.
    """
    rules = list(rules)
    used = set()
    flat: dict[str, np.ndarray] = {}
    missing = []
    for src, dst, hook in rules:
        if src not in state:
            missing.append(src)
            continue
        used.add(src)
        flat[dst] = hook(f32(state[src]))
    extra = [k for k in state if k not in used and not ignore(k)]
    problems = [f"missing {k}" for k in missing] + [f"unexpected {k} {tuple(np.shape(state[k]))}" for k in extra]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise WeightsError(f"{what}: checkpoint does not match the expected network: {shown}")
    return weights.unflatten(flat)


def state_dict(path: str, what: str) -> dict[str, np.ndarray]:
    """A checkpoint's flat model state dict: a bare state dict, or the one under 'state_dict'
    (training and Lightning checkpoints); a DataParallel `module.` prefix is stripped.
    `what` names the expected network in the error."""
    tree = read_checkpoint(path)
    if isinstance(tree, dict) and isinstance(tree.get("state_dict"), dict):
        tree = tree["state_dict"]
    if not isinstance(tree, dict):
        raise WeightsError(f"{path}: expected a state dict ({what}), got {type(tree).__name__}")
    return {k[len("module."):] if k.startswith("module.") else k: v
            for k, v in flatten_state_dict(tree).items()}


def batch_norm(src: str, dst: str, affine: bool = True) -> list[Rule]:
    """Rules for a torch BatchNorm: weight/bias -> params scale/bias, running stats -> batch_stats."""
    rules = [(f"{src}.weight", f"params/{dst}/scale", same),
             (f"{src}.bias", f"params/{dst}/bias", same)] if affine else []
    return rules + [(f"{src}.running_mean", f"batch_stats/{dst}/mean", same),
                    (f"{src}.running_var", f"batch_stats/{dst}/var", same)]


def require(state: Mapping[str, Any], key: str, what: str) -> np.ndarray:
    if key not in state:
        raise WeightsError(f"{what}: checkpoint has no '{key}' (is this the right network?)")
    return state[key]


# Sizes read from a checkpoint are checked against these before anything is built from them,
# so a small hostile file cannot ask for gigabytes (README "Weights": limits). The official
# networks stay far below them (StyleGAN2 256 px, widths <= 2048, 8 mapping layers).
LIMITS = {
    "resolution": 1024,  # a generator's output side, in pixels
    "width": 4096,       # any other integer in a config: channels, features, embedding sizes
    "depth": 64,         # counts of layers, blocks, styles or units (per stage)
}
# Config keys whose integers are not widths; every other integer is limited by "width".
_LIMIT_OF_KEY = {"resolution": "resolution", "n_mapping": "depth", "n_blocks": "depth",
                 "n_styles": "depth", "units": "depth", "layer_blocks": "depth"}


def check_limit(value: int, limit: str, name: str, what: str) -> int:
    """`value` if 0 < value <= LIMITS[limit], else WeightsError naming `name`."""
    if not 0 < value <= LIMITS[limit]:
        raise WeightsError(f"{what}: {name} = {value} is outside the supported range 1.."
                           f"{LIMITS[limit]} ({limit} limit; not an official network)")
    return value


def check_config(config: Any, what: str, key: str = "") -> None:
    """Every integer of an inferred config within `LIMITS`, every float finite."""
    if isinstance(config, Mapping):
        for k, v in config.items():
            check_config(v, what, str(k))
    elif isinstance(config, (list, tuple)):
        for v in config:
            check_config(v, what, key)
    elif isinstance(config, (int, np.integer)) and not isinstance(config, bool):
        check_limit(int(config), _LIMIT_OF_KEY.get(key, "width"), key or "a size", what)
    elif isinstance(config, (float, np.floating)) and not math.isfinite(config):
        raise WeightsError(f"{what}: {key} = {config} is not finite")


def expected_variables(module, *input_shapes: tuple[int, ...]) -> dict:
    """`jax.eval_shape` of `module.init` on float32 inputs of these shapes: no array is built."""
    inputs = [jax.ShapeDtypeStruct(tuple(s), jnp.float32) for s in input_shapes]
    return jax.eval_shape(module.init, jax.random.key(0), *inputs)


def meta_for(src: str, kind: str, config: dict, **extra) -> weights.Meta:
    return weights.Meta(kind=kind, config=config, source_file=os.path.basename(src),
                        source_sha256=weights.sha256_file(src), converter_version=CONVERTER_VERSION,
                        extra=extra)


def finish(variables: dict, expected: Mapping[str, Any], *, src: str, kind: str, config: dict,
           what: str | None = None, meta: weights.Meta | None = None,
           **extra) -> tuple[dict, weights.Meta]:
    """The steps every converter ends with: the config within `LIMITS`, every leaf of `variables`
    against `expected` (from `expected_variables` or the network's own eval_shape), and the
    metadata recording the source's name and sha256 (`meta` overrides it, for converters of
    several files). -> (variables, meta)."""
    what = what or src
    check_config(config, what)
    weights.check_tree(expected, variables, what)
    return variables, meta if meta is not None else meta_for(src, kind, config, **extra)


# ----------------------------------------------------------------------------- command line

_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors format's own cap


def is_converted_file(path: str) -> bool:
    """True if `path` is a regular safetensors file whose metadata carries our format key.
    Reads only the header (bounded); never blocks on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode) or size < 8:
            return False
        (n,) = struct.unpack("<Q", f.read(8))
        if not 2 <= n <= min(_SAFETENSORS_MAX_HEADER, size - 8):
            return False
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return False
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and meta.get("format") == weights.FORMAT


def check_output(out: str, inputs: Sequence[str], force: bool) -> None:
    """Refuses an OUT that is an input (after resolving symlinks), a folder, a symlink, or an
    existing file: without `force` any, with it any that is not an ifadit-jax converted file."""
    out_abs = os.path.abspath(out)
    parent = os.path.dirname(out_abs)
    if not os.path.isdir(parent):
        raise InputError(f"output directory does not exist: {parent}")
    real = os.path.realpath(out_abs)
    if any(real == os.path.realpath(p) for p in inputs):
        raise InputError(f"output {out} is an input checkpoint; choose another output file")
    if not os.path.lexists(out_abs):
        return
    if os.path.isdir(out_abs):
        raise InputError(f"output {out} is a folder; give a file name (OUT.safetensors)")
    if not force:
        raise InputError(f"output exists, not overwriting (use --force): {out}")
    if os.path.islink(out_abs) or not is_converted_file(out_abs):
        raise InputError(f"output {out} is not a file this tool converted; not replacing it "
                         "even with --force")


_GUARDED = (LookupError, TypeError, ValueError, AttributeError, RecursionError, OverflowError,
            ZeroDivisionError, struct.error)


def _printable(text: str, limit: int = 400) -> str:
    """Key names come from the file: escape control characters before they reach a terminal."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


def guarded_convert(convert: Callable[..., tuple[dict, weights.Meta]], src: str, **options):
    """`convert(src, **options)`, where any failure on a malformed file is one WeightsError line
    (a hostile file must never end in a traceback)."""
    try:
        return convert(src, **options)
    except IfaditError as e:
        raise type(e)(_printable(str(e))) from None
    except _GUARDED as e:
        raise WeightsError(_printable(f"{src}: not a convertible checkpoint of this network "
                                      f"({type(e).__name__}: {e})")) from None


def run_converter(convert: Callable[..., tuple[dict, weights.Meta]], src: str, *, out: str,
                  force: bool = False, inputs: Sequence[str] | None = None, quiet: bool = False,
                  **options) -> int:
    """Checks OUT, converts, checks OUT again (it may have appeared meanwhile), writes
    atomically and reports. `inputs` (default [src]) are the files OUT may never be."""
    inputs = [src] if inputs is None else list(inputs)
    check_output(out, inputs, force)
    # What a killed conversion left beside OUT (only ours: named with a dead process's id).
    files.remove_stale_temporaries(os.path.dirname(os.path.abspath(out)), recursive=False)
    variables, meta = guarded_convert(convert, src, **options)
    check_output(out, inputs, force)
    weights.save(out, variables, meta)
    n = sum(int(np.prod(np.shape(v))) for v in weights.flatten(variables).values())
    if not quiet:
        print(f"wrote {out}: {meta.kind}, {n:,} values, config {meta.config}")
    return 0


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output .safetensors file (must not exist unless --force)")
    parser.add_argument("--force", action="store_true",
                        help="replace OUT if it is a file this tool converted (nothing else)")


def converter_main(description: str, convert: Callable[..., tuple[dict, weights.Meta]],
                   add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                   argv: Sequence[str] | None = None, *,
                   src_help: str = "official checkpoint file",
                   inputs: Callable[[argparse.Namespace], Sequence[str]] | None = None) -> None:
    """The shell shared by `ports/convert_*.py`: [options] SRC OUT [--force]; every option the
    converter adds is passed to `convert(src, **options)` by its name."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument("src", help=src_help)
    add_output_arguments(parser)
    cli.add_common_arguments(parser)

    def main(args_list):
        args = parser.parse_args(args_list)
        cli.setup(args)
        options = {k: v for k, v in cli.common_options_removed(args).items()
                   if k not in ("src", "out", "force")}
        return run_converter(convert, args.src, out=args.out, force=args.force, quiet=args.quiet,
                             inputs=None if inputs is None else inputs(args), **options)

    cli.run(main, argv)
