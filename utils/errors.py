"""User-facing errors: one clear line, no traceback.

Every script's ``__main__`` guard goes through :func:`run_cli`, which turns a
:class:`KitError` into ``error: <message>`` on stderr and exit code 2. A file
system refusal the user can fix (read-only, no space, quota, file too large,
permission denied, a file where a folder is expected) becomes the same kind of
line, ``error: <path>: <problem>; <what to do>`` (:func:`filesystem_error`).
Anything else is a bug in the kit and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Callable, Sequence


class KitError(Exception):
    """A problem with the user's input, files or flags; the message says the fix."""


# errno -> (problem, what to do): the file system refusals a user can fix
FILESYSTEM_ERRORS = {
    errno.EROFS: ("read-only file system", "write somewhere writable (e.g. another --runs/--out) or remount it read-write"),
    errno.ENOSPC: ("no space left on the device", "free space there (df -h shows how much) or write somewhere else"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota (quota -s) or write somewhere else"),
    errno.EFBIG: ("file too large (the file system's or this shell's limit, see ulimit -f)",
                  "raise the limit (ulimit -f unlimited) or write to another file system"),
    errno.EACCES: ("permission denied", "make it writable for this user (ls -ld shows who owns it) or write somewhere else"),
    errno.EPERM: ("operation not permitted", "check its owner and permissions (ls -ld) or write somewhere else"),
    errno.ENOTDIR: ("a file stands where a folder is expected", "move that file away or choose another path"),
    errno.EEXIST: ("already exists and is not a folder", "move it away or choose another path"),
}


def _blocking_file(path: str) -> str:
    """For ENOTDIR: the nearest part of ``path`` that exists and is a file (the one in the way)."""
    p = Path(path)
    for parent in (p, *p.parents):
        if parent.is_file():
            return str(parent)
    return path


def filesystem_error(err: OSError, path: str | os.PathLike | None = None) -> KitError | None:
    """``err`` as one line naming the path and what to do; ``None`` when it is not a refusal the user can fix.

    Args:
        err: the error the operating system raised.
        path: the file being written, when ``err`` does not name it (``os.write`` errors name no file).
    """
    if err.errno not in FILESYSTEM_ERRORS:
        return None
    problem, fix = FILESYSTEM_ERRORS[err.errno]
    where = os.fsdecode(err.filename) if err.filename is not None else (os.fspath(path) if path is not None else "")
    if err.errno == errno.ENOTDIR and where:
        where = _blocking_file(where)
    return KitError(f"{where or '(file system)'}: {problem}; {fix}")


def run_cli(main: Callable[[Sequence[str] | None], int | None]) -> None:
    """Run ``main(None)`` and exit with its code; a KitError or a fixable OSError becomes one line on stderr."""
    try:
        code = main(None)
    except KitError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except OSError as err:
        mapped = filesystem_error(err)
        if mapped is None:
            raise
        print(f"error: {mapped}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code or 0)
