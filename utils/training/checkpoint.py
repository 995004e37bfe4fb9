"""Checkpoints of training: written atomically, loaded through one function with weights_only=True.

Pretrained weights (``--weights``) are read and loaded by :mod:`utils.weights`;
this module keeps the training state (model, optimiser, epoch, config).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from utils import __version__
from utils.atomic import atomic_torch_save
from utils.errors import KitError
from utils.file_hash import file_sha256
from utils.weights.state import load_torch_file

log = logging.getLogger(__name__)


def save_checkpoint(path: str | Path, **state: Any) -> Path:
    """Save ``state`` (model, optimiser, epoch, config, ...) plus the kit version."""
    state["kit_version"] = __version__
    return atomic_torch_save(path, state)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint or a plain state dict written by torch.save.

    Raises:
        KitError: the file is missing or not a torch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise KitError(f"{path}: checkpoint not found; check the path or drop the flag")
    return load_torch_file(path, map_location)


def file_sha(path: str | Path) -> str:
    """First 16 hex digits of a file's SHA-256, read in chunks (checkpoints can be GBs)."""
    return file_sha256(path)[:16]
