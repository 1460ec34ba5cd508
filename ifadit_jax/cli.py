"""What every command-line entry point shares: one clear line and a non-zero exit on bad input."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from ifadit_jax.errors import IfaditError


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
