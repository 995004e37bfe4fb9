"""User-facing errors: one clear line, no traceback.

Every script's ``__main__`` guard goes through :func:`run_cli`, which turns a
:class:`KitError` into ``error: <message>`` on stderr and exit code 2. Anything
else is a bug in the kit and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence


class KitError(Exception):
    """A problem with the user's input, files or flags; the message says the fix."""


def run_cli(main: Callable[[Sequence[str] | None], int | None]) -> None:
    """Run ``main(None)`` and exit with its code; a KitError becomes one line on stderr."""
    try:
        code = main(None)
    except KitError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code or 0)
