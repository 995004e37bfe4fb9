"""Paths as the user typed them."""

from __future__ import annotations

from pathlib import Path


def user_path(text: str) -> Path:
    """A path flag's value with a leading ``~`` expanded: the shell leaves ``--data=~/x`` and a quoted
    ``'~/x'`` as they are, which would otherwise name a folder called ``~`` in the working directory."""
    return Path(text).expanduser()
