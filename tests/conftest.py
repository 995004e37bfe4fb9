"""Shared fixtures: a generated competition dataset, offline hubs, the shared data path."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TIMM_OFFLINE", "1")
os.environ.setdefault("TORCH_HOME", "/nonexistent-torch-home")
os.environ.setdefault("KIT_WEIGHTS_DIR", "/nonexistent-kit-weights")  # a fetched weights/ folder must not change what tests load

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def rehearsal_data_session(tmp_path_factory) -> Path:
    """A small generated dataset (built once per test session; copy before changing it)."""
    from utils.data.rehearsal_data import generate

    out = tmp_path_factory.mktemp("data") / "rehearsal"
    generate(out, train_identities=16, test_identities=8, size=48, seed=0)
    return out


@pytest.fixture
def rehearsal_data(rehearsal_data_session, tmp_path) -> Path:
    """A private copy of the generated dataset that a test may change."""
    dst = tmp_path / "data"
    shutil.copytree(rehearsal_data_session, dst)
    return dst


def shared_data(name: str) -> Path:
    """``../shared/data/<name>``, or skip the test when this machine lacks it."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} not present (real data is only on development machines)")
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny models: two threads thrash on a shared 2-core box."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
