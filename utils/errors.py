"""User-facing errors: one clear line, no traceback.

Every script's ``__main__`` guard goes through :func:`run_cli`, which turns a
:class:`KitError` into ``error: <message>`` on stderr and exit code 2. A file
system refusal the user can fix (read-only, no space, quota, file too large,
permission denied, a file where a folder is expected) becomes the same kind of
line, ``error: <path>: <problem>; <what to do>`` (:func:`filesystem_error`).
Anything else is a bug in the kit and keeps its traceback.

Ctrl-C and SIGTERM end the same way: one line with the exact command that goes
on (:func:`resume_command`): the same command plus ``--resume`` for a script
that has the flag, else the same command (its caches make finished steps
cheap), or what the script's module sets in ``INTERRUPT_HINT``. The line names
the signal (``interrupted (Ctrl-C)`` or ``interrupted (SIGTERM)``). Exit code 130
(Ctrl-C) or 143 (SIGTERM; a script may document another, see :class:`Terminated`).
"""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import signal
import sys
from pathlib import Path
from typing import Callable, Sequence


class KitError(Exception):
    """A problem with the user's input, files or flags; the message says the fix."""


class FileSystemError(KitError, OSError):
    """A file system refusal the user can fix: one line for :func:`run_cli`, and still an ``OSError`` with its
    ``errno`` and ``filename`` for code that catches those (e.g. to go on without a cache)."""

    def __init__(self, code: int, message: str, filename: str | None = None):
        super().__init__(code, message, filename)

    def __str__(self) -> str:
        return str(self.strerror)


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


def filesystem_error(err: OSError, path: str | os.PathLike | None = None) -> FileSystemError | None:
    """``err`` as one line naming the path and what to do; ``None`` when it is not a refusal the user can fix.

    Args:
        err: the error the operating system raised.
        path: the file being written, when ``err`` does not name it (``os.write`` errors name no file).
    """
    if isinstance(err, FileSystemError):
        return err
    if err.errno not in FILESYSTEM_ERRORS:
        return None
    problem, fix = FILESYSTEM_ERRORS[err.errno]
    where = os.fsdecode(err.filename) if err.filename is not None else (os.fspath(path) if path is not None else "")
    if err.errno == errno.ENOTDIR and where:
        where = _blocking_file(where)
    return FileSystemError(err.errno, f"{where or '(file system)'}: {problem}; {fix}", where or None)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process was, so that it ends like Ctrl-C (files closed, temps removed).

    :func:`run_cli` names the signal and exits with ``exit_code``: 143 (128 + SIGTERM) unless the
    script documents another (day.py: 130 for either signal).
    """

    def __init__(self, exit_code: int = 143):
        super().__init__("SIGTERM")
        self.exit_code = exit_code


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def resume_command(main: Callable, argv: Sequence[str] | None = None) -> str:
    """What to type to go on after ``main`` was interrupted: its command line, plus ``--resume`` if its parser has it.

    Args:
        main: the script's ``main``; its module's ``build_parser()`` tells whether it takes ``--resume``,
            and a module-level ``INTERRUPT_HINT`` string replaces the advice.
        argv: the command line (default ``sys.argv``).
    """
    argv = list(sys.argv if argv is None else argv)
    module = sys.modules.get(getattr(main, "__module__", ""), None)
    hint = getattr(module, "INTERRUPT_HINT", None)
    if hint:
        return str(hint)
    python = "python" if shutil.which("python") == sys.executable else sys.executable
    spec = getattr(module, "__spec__", None) if getattr(main, "__module__", "") == "__main__" else None
    if spec is not None and spec.name:  # started as python -m NAME
        head = [python, "-m", spec.name.removesuffix(".__main__")]
    else:
        head = [python, argv[0]]
    args = argv[1:]
    build_parser = getattr(module, "build_parser", None)
    takes_resume = build_parser is not None and "--resume" in build_parser()._option_string_actions
    if takes_resume:
        cmd = shlex.join([*head, *args, *([] if "--resume" in args else ["--resume"])])
        return f"to go on from the last saved epoch: {cmd}  (with none saved yet, it starts from the beginning)"
    return f"to go on, run it again (finished steps are cached, so they are cheap): {shlex.join([*head, *args])}"


def _run_main(main: Callable[[Sequence[str] | None], int | None]) -> int:
    """``main(None)``'s exit code, with the user's errors and interruptions turned into one line on stderr."""
    try:
        return main(None) or 0
    except KitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        mapped = filesystem_error(err)
        if mapped is None:
            raise
        print(f"error: {mapped}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        term = isinstance(err, Terminated)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM while printing ends the process
        print(f"interrupted ({'SIGTERM' if term else 'Ctrl-C'}); {resume_command(main)}", file=sys.stderr)
        return err.exit_code if term else 130


def run_cli(main: Callable[[Sequence[str] | None], int | None]) -> None:
    """Run ``main(None)`` and exit with its code; a KitError or a fixable OSError becomes one line on stderr,
    Ctrl-C or SIGTERM one line with the command that goes on."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave SIGTERM alone
        previous = None
    try:
        code = _run_main(main)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    sys.exit(code)
