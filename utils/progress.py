"""Rich progress bars for long loops (training, embedding, scanning)."""

from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from utils.logs import console

T = TypeVar("T")


class ProgressBar:
    """A rich bar with a free text field, e.g. the running loss.

    Example:
        >>> with ProgressBar("train", total=10) as bar:
        ...     for step in range(10):
        ...         bar.advance(info=f"loss {0.1:.3f}")
    """

    def __init__(self, description: str, total: int | None):
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            disable=not console.is_terminal,
        )
        self._task = self._progress.add_task(description, total=total, info="")

    def __enter__(self) -> "ProgressBar":
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def advance(self, n: int = 1, info: str | None = None) -> None:
        """Move the bar on by ``n``; ``info`` replaces the text after it."""
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
