"""Weight files: read a state dict, clean it, load it into a model and say what was loaded.

    >>> state = load_weights_file("resnet50.safetensors")     # torch (.pt/.pth/.bin) or safetensors
    >>> report = load_into(model, state, "resnet50.safetensors", strict=False)
    >>> report.missing, report.unexpected                      # key lists, also logged
    >>> fingerprint("resnet50.safetensors")                    # '102400:1733570000123456789' (size:mtime_ns)

Checkpoints of training (model, optimiser, epoch) are written and read by
:mod:`utils.training.checkpoint`, which reads through :func:`load_torch_file` here.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from utils.errors import KitError

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")  # a checkpoint that holds the weights under a key
PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


def fingerprint(path: str | os.PathLike) -> str:
    """``<size>:<mtime_ns>`` of a weight file: changes when the file is replaced (a cache-key part).

    Raises:
        KitError: the file does not exist.
    """
    try:
        st = Path(path).stat()
    except OSError as err:
        raise KitError(f"{path}: weights file not readable ({err.strerror})") from None
    return f"{st.st_size}:{st.st_mtime_ns}"


def load_torch_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with one-line errors.

    Raises:
        KitError: the file is missing or not a torch file.
    """
    path = Path(path)
    if not path.is_file():
        raise KitError(f"{path}: file not found; check the path or drop the flag")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, LookupError) as err:  # LookupError: text files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise KitError(f"{path}: not a readable torch checkpoint ({first})") from None


def clean_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights of a loaded file: unwrapped from a checkpoint key, DDP/compile prefixes removed."""
    for key in WRAPPER_KEYS:
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    out = {}
    for k, v in state.items():
        for prefix in PREFIXES:
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A clean state dict from ``.pt``/``.pth``/``.bin`` (torch) or ``.safetensors``.

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
        state = load_torch_file(path)
    if not isinstance(state, dict):
        raise KitError(f"{path}: holds no state dict of tensors")
    state = clean_state(state)
    if not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise KitError(f"{path}: holds no state dict of tensors")
    return state


@dataclass
class LoadReport:
    """What :func:`load_into` loaded: the file and the keys that did not match."""

    source: str
    n_model: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def n_loaded(self) -> int:
        return self.n_model - len(self.missing)

    def summary(self) -> str:
        return f"{self.source}: {self.n_loaded} of {self.n_model} tensors loaded, {len(self.missing)} missing, {len(self.unexpected)} unexpected"


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike,
              strict: bool = True, what: str = "the model", hint: str = "", min_share: float = 0.5) -> LoadReport:
    """``model.load_state_dict`` with a one-line error naming the file on a mismatch; logs what it loaded.

    Args:
        what: the model in error messages (``this image tower``).
        hint: appended to errors (``check --model``).
        min_share: with ``strict=False``, the share of the model's tensors that must load.

    Raises:
        KitError: shapes that do not fit, or (``strict=False``) fewer than ``min_share`` of the model's tensors matched.
    """
    state = clean_state(state)
    tail = f"; {hint}" if hint else ""
    try:
        result = model.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        raise KitError(f"{source}: weights do not fit {what} ({' '.join(lines[1:3])[:300]}){tail}") from None
    report = LoadReport(str(source), len(model.state_dict()), list(result.missing_keys), list(result.unexpected_keys))
    if not strict and report.n_loaded < min_share * report.n_model:
        raise KitError(
            f"{source}: only {report.n_loaded} of {report.n_model} tensors match {what}; "
            f"these are weights of another architecture{tail}"
        )
    log.info("%s", report.summary())
    if report.missing or report.unexpected:
        log.debug("%s: missing %s; unexpected %s", source, report.missing[:5], report.unexpected[:5])
    return report
