"""Checkpoints: written atomically, loaded through one function with weights_only=True."""

from __future__ import annotations

import hashlib
import logging
import pickle
from pathlib import Path
from typing import Any

import torch

from utils import __version__
from utils.atomic import atomic_torch_save
from utils.errors import KitError

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
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, LookupError) as err:  # LookupError: text files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise KitError(f"{path}: not a readable torch checkpoint ({first})") from None


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.pt``/``.pth``/``.bin`` (torch) or ``.safetensors``.

    A checkpoint of this kit (with a ``model`` key) gives its model weights.

    Raises:
        KitError: missing file, unreadable file, or no tensors in it.
    """
    path = Path(path)
    if not path.is_file():
        raise KitError(f"{path}: weights file not found (--weights PATH)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:  # safetensors raises its own SafetensorError
            raise KitError(f"{path}: not a readable safetensors file ({err})") from None
    else:
        state = load_checkpoint(path)
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise KitError(f"{path}: holds no state dict of tensors")
    return state


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path, strict: bool = True) -> None:
    """``model.load_state_dict`` with a one-line error naming the file on mismatch."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        result = model.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        raise KitError(f"{path}: weights do not fit the model ({' '.join(lines[1:3])[:300]})") from None
    n_model = len(model.state_dict())
    if not strict and len(result.missing_keys) > n_model // 2:
        raise KitError(
            f"{path}: only {n_model - len(result.missing_keys)} of {n_model} tensors match the model; "
            "these are weights of another architecture"
        )
    if not strict and (result.missing_keys or result.unexpected_keys):
        log.info(
            "%s: loaded with %d missing and %d unexpected keys",
            path, len(result.missing_keys), len(result.unexpected_keys),
        )


def file_sha(path: str | Path) -> str:
    """First 16 hex digits of a file's SHA-256, read in chunks (checkpoints can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
