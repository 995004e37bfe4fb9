"""Waiting on what a real process writes: a line on its output pipe, not a file polled with sleeps."""

from __future__ import annotations

import signal
import subprocess
import threading
from typing import IO

import pytest

HANG_S = 600  # only a hung process waits this long; it is then killed, so the test fails instead of hanging


def lines_until(proc: subprocess.Popen, *needles: str, stream: IO[str] | None = None, hang_s: float = HANG_S) -> list[str]:
    """Lines of ``stream`` (``proc.stderr`` unless told) up to the one holding the last of ``needles``, in order.

    Each read blocks on the pipe until the process writes a line, however slow the machine; the only bound
    is ``hang_s``, after which the process is killed and the test fails naming the marker it never wrote.
    """
    stream = stream if stream is not None else proc.stderr
    watchdog = threading.Timer(hang_s, proc.kill)
    watchdog.daemon = True
    watchdog.start()
    seen, todo = [], list(needles)
    try:
        while todo:
            line = stream.readline()
            if not line:
                proc.wait(timeout=60)
                pytest.fail(f"the process ended (rc {proc.returncode}) before writing {todo[0]!r}; its output: {''.join(seen)[-2000:]}")
            seen.append(line)
            if todo[0] in line:
                todo.pop(0)
    finally:
        watchdog.cancel()
    return seen


def default_sigint() -> None:
    """``preexec_fn`` for a child that must take a real SIGINT as Ctrl-C: a parent started in the background
    (``cmd &``, nohup, some CI runners) ignores SIGINT, the child inherits that, and Python then never raises
    KeyboardInterrupt; a terminal's Ctrl-C reaches a foreground process with the default action."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
