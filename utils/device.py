"""Pick the torch device and the mixed-precision dtype for it."""

from __future__ import annotations

import torch

from utils.errors import KitError


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda if present, else cpu; ``cuda``/``cpu``/``cuda:N`` as given.

    Raises:
        KitError: ``cuda`` asked for on a machine without one.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KitError(f"--device {name}: no CUDA GPU visible; use --device cpu or auto")
    if name.startswith("cuda") or name == "cpu":
        return torch.device(name)
    raise KitError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")


def amp_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """bf16 where the GPU has it, else fp16 on GPU; None (full precision) on CPU."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
