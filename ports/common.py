"""What every converter shares: layout hooks, the renaming table, and the command-line shell.

A converter reads an official checkpoint with `ports.reader`, infers the network config from the
tensor shapes, renames every tensor through one table (official key -> our path, plus a layout
hook), checks the result against `jax.eval_shape` of the Flax module, and writes one safetensors
file with `ifadit_jax.weights.save`. Any missing, extra or misshapen parameter is an error that
names it; nothing is loaded partially.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ifadit_jax import cli, weights
from ifadit_jax.errors import InputError, WeightsError
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


def meta_for(src: str, kind: str, config: dict, **extra) -> weights.Meta:
    return weights.Meta(kind=kind, config=config, source_file=os.path.basename(src),
                        source_sha256=weights.sha256_file(src), converter_version=CONVERTER_VERSION,
                        extra=extra)


def convert_and_save(args: argparse.Namespace,
                     convert: Callable[[argparse.Namespace], tuple[dict, weights.Meta]]) -> int:
    """Checks `args.out` before the work, converts `args.src`, writes atomically, reports."""
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise InputError(f"output directory does not exist: {out_dir}")
    if os.path.abspath(args.out) == os.path.abspath(args.src):
        raise InputError("output would overwrite the input checkpoint")
    variables, meta = convert(args)
    weights.save(args.out, variables, meta)
    n = sum(int(np.prod(np.shape(v))) for v in weights.flatten(variables).values())
    print(f"wrote {args.out}: {meta.kind}, {n:,} values, config {meta.config}")
    return 0


def converter_main(description: str,
                   convert: Callable[[argparse.Namespace], tuple[dict, weights.Meta]],
                   add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                   argv: Sequence[str] | None = None) -> None:
    """The shell shared by `ports/convert_*.py`: SRC OUT.safetensors, one line on error."""
    parser = argparse.ArgumentParser(description=description)
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument("src", help="official checkpoint file")
    parser.add_argument("out", help="output .safetensors file")

    def main(args_list):
        return convert_and_save(parser.parse_args(args_list), convert)

    cli.run(main, argv)
