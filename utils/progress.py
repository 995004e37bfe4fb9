"""Progress for long loops (training, embedding, scanning): a bar on a terminal, log lines elsewhere.

One setting governs every bar, the kit's and the libraries' tqdm bars alike:

``KIT_PROGRESS``            ``auto`` (default: a bar on a terminal, lines otherwise), ``bar``, ``lines`` or ``off``
``KIT_PROGRESS_INTERVAL_S`` seconds between two lines (default 30)

Off a terminal (``nohup``, ``tee``, a scheduler) a loop prints one line every interval,
``<desc>: done/total (pct), rate/s, left <time>``, and a last line when it ends, so a log file
shows how far a job is. :func:`utils.logs.setup_logging` sets tqdm's environment defaults to the
same choice (tqdm reads ``TQDM_*`` variables), so transformers' and the hub's bars follow it.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Iterator, TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from utils.logs import console, progress_interval_s, progress_mode

T = TypeVar("T")
log = logging.getLogger(__name__)
def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class LineProgress:
    """Progress as log lines: one every ``interval_s`` and one at the end (for logs off a terminal).

    ``clock`` is injectable so that tests need no sleeps.
    """

    def __init__(self, description: str, total: int | None, interval_s: float, clock: Callable[[], float] = time.monotonic):
        self.description, self.total, self.interval_s, self._clock = description, total, interval_s, clock
        self.done = 0
        self.info = ""
        self._start = self._last = clock()

    def line(self) -> str:
        """The progress line as it stands now."""
        elapsed = max(self._clock() - self._start, 1e-9)
        rate = self.done / elapsed
        parts = [f"{self.description}: {self.done}"]
        if self.total:
            parts[0] += f"/{self.total} ({100.0 * self.done / self.total:.0f} %)"
        parts.append(f"{rate:.3g}/s")
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"left {_clock((self.total - self.done) / rate)}")
        parts.append(f"elapsed {_clock(elapsed)}")
        if self.info:
            parts.append(self.info)
        return ", ".join(parts)

    def advance(self, n: int = 1, info: str | None = None) -> None:
        self.done += n
        if info is not None:
            self.info = info
        now = self._clock()
        if now - self._last >= self.interval_s:
            self._last = now
            log.info(self.line())

    def finish(self) -> None:
        """The last line; only for loops that ran longer than one interval (short ones stay quiet)."""
        if self._clock() - self._start >= self.interval_s:
            log.info(self.line())


class ProgressBar:
    """A bar with a free text field (e.g. the running loss); log lines off a terminal.

    Example:
        >>> with ProgressBar("train", total=10) as bar:
        ...     for step in range(10):
        ...         bar.advance(info=f"loss {0.1:.3f}")
    """

    def __init__(self, description: str, total: int | None):
        mode = progress_mode()
        self._lines = LineProgress(description, total, progress_interval_s()) if mode == "lines" else None
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            disable=mode != "bar",
        )
        self._task = self._progress.add_task(description, total=total, info="")

    def __enter__(self) -> "ProgressBar":
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()
        if self._lines is not None and exc[0] is None:
            self._lines.finish()

    def advance(self, n: int = 1, info: str | None = None) -> None:
        """Move the bar on by ``n``; ``info`` replaces the text after it."""
        if self._lines is not None:
            self._lines.advance(n, info)
        if info is None:
            self._progress.advance(self._task, n)
        else:
            self._progress.update(self._task, advance=n, info=info)


class QuietBar:
    """What a DDP rank other than 0 draws instead of a :class:`ProgressBar`: nothing."""

    def __enter__(self) -> "QuietBar":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def advance(self, n: int = 1, info: str | None = None) -> None:
        return None


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` while drawing a bar."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with ProgressBar(description, total) as bar:
        for item in items:
            yield item
            bar.advance()
