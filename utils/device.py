"""Pick the torch device and the mixed-precision dtype for it."""

from __future__ import annotations

import os
from typing import Any

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


# (major, minor) compute capability from which a card has bf16 in hardware (Ampere: A100, A10, RTX 30xx, and later);
# exactly what torch.cuda.is_bf16_supported(including_emulation=False) checks on the CUDA >= 11 builds torch 2 ships
NATIVE_BF16_CAPABILITY = (8, 0)
PRECISION_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}


def choose_precision(capability: tuple[int, int] | None, enabled: bool = True) -> torch.dtype | None:
    """The autocast dtype for a card: the one place the kit chooses precision.

    Args:
        capability: the CUDA card's compute capability, e.g. (7, 5) for a T4,
            (7, 0) V100, (8, 0) A100, (9, 0) H100; None for the CPU.
        enabled: False for ``--no-amp``.

    Returns:
        bf16 where the card has it natively, fp16 (trained with a GradScaler)
        on older cards, None (fp32) on the CPU or with ``--no-amp``. Emulated
        bf16 on a T4/V100 misses the tensor cores, so it is never chosen.
    """
    if not enabled or capability is None:
        return None
    return torch.bfloat16 if tuple(capability) >= NATIVE_BF16_CAPABILITY else torch.float16


def card_capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability of ``device``'s card; None on the CPU."""
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def amp_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """:func:`choose_precision` for ``device``'s card (None, i.e. fp32, on CPU or with ``--no-amp``)."""
    return choose_precision(card_capability(device), enabled)


def precision_record(device: torch.device, enabled: bool = True) -> dict[str, Any]:
    """What meta.json records of the precision and the card: ``{"precision": "bf16", "device": {...}}``."""
    cap = card_capability(device)
    card = {"type": device.type, "name": torch.cuda.get_device_name(device) if cap else "cpu",
            "capability": f"{cap[0]}.{cap[1]}" if cap else None}
    return {"precision": PRECISION_NAMES[choose_precision(cap, enabled)], "device": card}


def cpu_count() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def ranks_on_node() -> int:
    """How many processes torchrun started on this machine (``LOCAL_WORLD_SIZE``; 1 outside torchrun)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def default_workers() -> int:
    """DataLoader workers for decoding and resizing: half the usable cores (the model needs the rest), 1 to 8,
    shared among the processes torchrun starts on this machine (``LOCAL_WORLD_SIZE``)."""
    return max(1, min(8, cpu_count() // 2 // ranks_on_node()))


def resolve_processes(n: int) -> int:
    """``--dlib-processes`` (worker processes for dlib's models): -1 means every usable core, shared among the processes torchrun starts on this
    machine (``LOCAL_WORLD_SIZE``); 1 runs in the main process.

    Raises:
        KitError: 0, below -1, or more than 4 per usable core.
    """
    if n == 0 or n < -1:
        raise KitError(f"--dlib-processes {n}: use -1 (every usable core), 1 (the main process) or a count")
    if n > 4 * cpu_count():
        raise KitError(f"--dlib-processes {n}: more than 4 per usable core ({cpu_count()} here); use -1 or at most {4 * cpu_count()}")
    return max(1, cpu_count() // ranks_on_node()) if n == -1 else n


def resolve_workers(n: int) -> int:
    """``--workers``: -1 means :func:`default_workers`; 0 decodes in the main process.

    Raises:
        KitError: below -1, or far beyond the machine's cores (each worker is a process holding a copy of
            the dataset: thousands would exhaust the machine before the first image).
    """
    if n < -1:
        raise KitError(f"--workers {n}: use -1 (chosen for this machine), 0 (main process) or a count")
    most = max(8, 4 * cpu_count())
    if n > most:
        raise KitError(f"--workers {n}: more than 4 per usable core ({cpu_count()} here); use -1 (chosen for this machine) "
                       f"or at most {most}")
    return default_workers() if n == -1 else n


def is_cnn(model: torch.nn.Module) -> bool:
    """Whether most of the model's work is 2-D convolution (channels-last then pays off on CPU and GPU)."""
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    return convs > 4
