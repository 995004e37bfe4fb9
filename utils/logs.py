"""Logging and the rich console shared by every script."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler

console = Console(stderr=False, highlight=False)


def setup_logging(verbose: bool = False) -> None:
    """Route the ``utils`` loggers through rich; ``verbose`` shows debug lines."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_kit", False)]:
        root.removeHandler(h)  # replace our own handler only; others (pytest's) stay
    handler = RichHandler(console=Console(stderr=True), show_path=False, markup=False, log_time_format="[%X]")
    handler._kit = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("PIL", "matplotlib", "urllib3", "timm", "open_clip", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
