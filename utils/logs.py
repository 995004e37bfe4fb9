"""Logging and the rich console shared by every script."""

from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.logging import RichHandler

# Piped to a file (CI, nohup, tee), rich would wrap tables at 80 columns and cut names.
LOG_WIDTH = None if sys.stdout.isatty() else 160
console = Console(stderr=False, highlight=False, width=LOG_WIDTH)


def setup_logging(verbose: bool = False) -> None:
    """Route the ``utils`` loggers through rich; ``verbose`` shows debug lines."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_kit", False)]:
        root.removeHandler(h)  # replace our own handler only; others (pytest's) stay
    handler = RichHandler(console=Console(stderr=True, width=None if sys.stderr.isatty() else 160), show_path=False, markup=False, log_time_format="[%X]")
    handler._kit = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("PIL", "matplotlib", "urllib3", "timm", "open_clip", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
