"""Logging and the rich console shared by every script."""

from __future__ import annotations

import logging
import os
import sys

from rich.console import Console
from rich.logging import RichHandler

from utils.errors import KitError

# Piped to a file (CI, nohup, tee), rich would wrap tables at 80 columns and cut names.
LOG_WIDTH = None if sys.stdout.isatty() else 160
console = Console(stderr=False, highlight=False, width=LOG_WIDTH)
MODES = ("auto", "bar", "lines", "off")


def progress_mode() -> str:
    """``bar``, ``lines`` or ``off``: ``KIT_PROGRESS`` with ``auto`` resolved by whether stdout is a terminal."""
    mode = os.environ.get("KIT_PROGRESS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise KitError(f"KIT_PROGRESS={mode!r}: use one of {', '.join(MODES)}")
    if mode == "auto":
        return "bar" if console.is_terminal else "lines"
    return mode


def progress_interval_s() -> float:
    """Seconds between two progress lines (``KIT_PROGRESS_INTERVAL_S``, default 30)."""
    raw = os.environ.get("KIT_PROGRESS_INTERVAL_S", "30")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise KitError(f"KIT_PROGRESS_INTERVAL_S={raw!r}: give a number of seconds >= 0")
    return value


def configure_library_bars() -> None:
    """Make tqdm bars (transformers, huggingface_hub) follow the kit's setting; an explicit TQDM_* wins."""
    mode = progress_mode()
    if mode == "off":
        os.environ.setdefault("TQDM_DISABLE", "1")
    elif mode == "lines":
        os.environ.setdefault("TQDM_MININTERVAL", str(progress_interval_s()))


def setup_logging(verbose: bool = False) -> None:
    """Route the ``utils`` loggers through rich; ``verbose`` shows debug lines; library bars follow ``KIT_PROGRESS``."""
    configure_library_bars()
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
