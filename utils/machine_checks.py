"""Preflight checks of the machine: the accelerator and its memory, free disk where runs go."""

from __future__ import annotations

import shutil
from pathlib import Path

from utils.checklist import Checklist

GIB = 1 << 30
MIN_FREE_DISK = 2 * GIB  # below: a blocker (matrices, checkpoints and caches need room)
LOW_FREE_DISK = 10 * GIB  # below: a warning


def check_accelerator(cl: Checklist) -> None:
    """Which CUDA GPUs torch sees, with total and free memory; none is a warning (CPU works, slowly)."""
    import torch

    if not torch.cuda.is_available():
        cl.warn("machine", "accelerator", f"no CUDA GPU visible to torch {torch.__version__}: training runs on the CPU (slow)")
        return
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        cl.ok("machine", f"cuda:{i}", f"{torch.cuda.get_device_name(i)}, {total / GIB:.1f} GB, {free / GIB:.1f} GB free")


def check_disk(cl: Checklist, path: Path) -> None:
    """Free disk space on the file system that holds ``path`` (or its nearest existing parent)."""
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    detail = f"{free / GIB:.1f} GB free on {where}"
    if free < MIN_FREE_DISK:
        cl.block("machine", "disk", f"{detail}; need at least {MIN_FREE_DISK / GIB:.0f} GB")
    elif free < LOW_FREE_DISK:
        cl.warn("machine", "disk", f"{detail}; checkpoints and caches may not fit")
    else:
        cl.ok("machine", "disk", detail)
