"""Pick the torch device and the mixed-precision dtype for it."""

from __future__ import annotations

import os

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


def cpu_count() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_workers() -> int:
    """DataLoader workers for decoding and resizing: half the usable cores (the model needs the rest), 1 to 8."""
    return max(1, min(8, cpu_count() // 2))


def resolve_workers(n: int) -> int:
    """``--workers``: -1 means :func:`default_workers`; 0 decodes in the main process.

    Raises:
        KitError: below -1.
    """
    if n < -1:
        raise KitError(f"--workers {n}: use -1 (chosen for this machine), 0 (main process) or a count")
    return default_workers() if n == -1 else n


def is_cnn(model: torch.nn.Module) -> bool:
    """Whether most of the model's work is 2-D convolution (channels-last then pays off on CPU and GPU)."""
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    return convs > 4
