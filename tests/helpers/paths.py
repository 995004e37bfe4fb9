"""Where the repository and the machine's shared real data are."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_data(name: str) -> Path:
    """``../shared/data/<name>``, or skip the test when this machine lacks it."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} not present (real data is only on development machines)")
    return path
