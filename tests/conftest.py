"""Shared fixtures: a generated competition dataset, offline hubs, the shared data path."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.helpers.paths import ROOT, SHARED_DATA, shared_data  # noqa: F401 - re-exported for tests not yet moved

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TIMM_OFFLINE", "1")
os.environ.setdefault("TORCH_HOME", "/nonexistent-torch-home")
os.environ.setdefault("KIT_WEIGHTS_DIR", "/nonexistent-kit-weights")  # a fetched weights/ folder must not change what tests load


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



@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny models: two threads thrash on a shared 2-core box."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
