"""What every command-line entry point shares: one clear line and a non-zero exit on bad input,
the common flags (`--device`, `--quiet`, `--verbose`, `--version`, `--no-compile-cache`), the
persistent compilation cache, and progress reporting.

This module imports neither JAX nor NumPy, so an entry point can refuse bad arguments (a secret
on the command line) before anything heavy loads. Adopting it in another CLI:

    p = argparse.ArgumentParser(...); cli.add_common_arguments(p); args = p.parse_args(argv)
    cli.setup(args)            # before the first JAX computation
    for item in cli.progress(items, quiet=args.quiet): ...
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Iterable, Sequence, TypeVar

from ifadit_jax.errors import IfaditError, SecretError

T = TypeVar("T")
PROGRESS_EVERY_S = 10.0  # without a terminal: one plain line at most this often
UNSAFE_FLAG = "--unsafe-secret-on-command-line"


def run(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> None:
    """Calls `main(argv)` and turns an `IfaditError` into `error: ...` on stderr plus its exit code."""
    try:
        code = main(sys.argv[1:] if argv is None else argv)
    except IfaditError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def refuse_secret_on_command_line(argv: Sequence[str]) -> None:
    """Raises SecretError when argv holds `--secret` without the explicit unsafe flag.

    Called first by the entry points, so the process (whose command line other users can read)
    ends at once instead of after seconds of loading weights."""
    args = list(argv)
    if "--" in args:
        args = args[:args.index("--")]
    given = any(a == "--secret" or a.startswith("--secret=") for a in args)
    allowed = any(len(a) > 8 and UNSAFE_FLAG.startswith(a) for a in args)
    if given and not allowed:
        raise SecretError("refusing a secret given on the command line (other users can read it "
                          "from the process list and shell history); use --secret-file, "
                          f"--secret-env or the prompt, or allow it explicitly with {UNSAFE_FLAG}")


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("ifadit-jax")
    except metadata.PackageNotFoundError:
        from ifadit_jax import __version__

        return __version__


def add_common_arguments(parser) -> None:
    g = parser.add_argument_group("common options")
    g.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="where JAX computes (default auto: a GPU if there is one)")
    g.add_argument("--quiet", action="store_true", help="print only errors and warnings")
    g.add_argument("--verbose", action="store_true", help="also print what is loaded and timings")
    g.add_argument("--no-compile-cache", action="store_true",
                   help="do not read or write the persistent compilation cache "
                        "(default folder: $IFADIT_JAX_CACHE_DIR, else $XDG_CACHE_HOME/ifadit-jax/jit "
                        "or ~/.cache/ifadit-jax/jit)")
    g.add_argument("--version", action="version", version=f"%(prog)s {version()}")


# The argparse destinations of `add_common_arguments`: a CLI that forwards its other options
# (the converters pass theirs to `convert(**options)`) leaves these out.
COMMON_OPTIONS = ("device", "quiet", "verbose", "no_compile_cache")


def common_options_removed(args) -> dict:
    """vars(args) without the common options."""
    return {k: v for k, v in vars(args).items() if k not in COMMON_OPTIONS}


def cache_dir() -> str:
    """The per-user compilation cache folder (see `add_common_arguments`)."""
    if os.environ.get("IFADIT_JAX_CACHE_DIR"):
        return os.environ["IFADIT_JAX_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ifadit-jax", "jit")


def setup(args) -> None:
    """Applies --device and the compilation cache; call before the first JAX computation."""
    import jax

    if args.device == "cpu":
        jax.config.update("jax_platforms", "cpu")  # the GPU is not even initialized
    elif args.device == "gpu":
        # JAX already prefers a GPU when one works; naming "cuda,rocm" in jax_platforms instead
        # would fail on a machine that has only one of the two plugins.
        try:
            jax.devices("gpu")
        except RuntimeError:
            raise IfaditError("--device gpu: no GPU is available to JAX (install jax[cuda12], "
                              "or use --device cpu)") from None
    if args.no_compile_cache:  # also when JAX_COMPILATION_CACHE_DIR names one
        jax.config.update("jax_enable_compilation_cache", False)
    elif not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        path = cache_dir()
        try:
            os.makedirs(path, exist_ok=True)
        except OSError:
            pass  # an unwritable cache only costs time
        else:
            jax.config.update("jax_compilation_cache_dir", path)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    if args.verbose:
        print(f"devices: {', '.join(str(d) for d in jax.devices())}", file=sys.stderr)


def progress(items: Sequence[T], quiet: bool = False, unit: str = "image") -> Iterable[T]:
    """Iterates `items` with a progress bar on a terminal, a plain line every
    PROGRESS_EVERY_S seconds otherwise (no carriage returns in log files), nothing when quiet."""
    if quiet or len(items) < 2:
        yield from items
        return
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, unit=unit, file=sys.stderr)
        return
    last = time.monotonic()
    for i, item in enumerate(items):
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY_S:
            print(f"progress: {i} of {len(items)} {unit}s", file=sys.stderr)
            last = now
        yield item
