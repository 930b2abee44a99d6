"""One exception type for bad input, and the CLI wrapper that turns it into a one-line message."""

from __future__ import annotations

import sys
from collections.abc import Callable


class InputError(Exception):
    """Bad input a user can fix (missing file, malformed CSV, wrong flag); the message names the file."""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a stage's main(): InputError becomes `error: <message>` and exit status 2, not a traceback."""
    try:
        status = main(argv)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)
