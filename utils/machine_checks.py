"""Preflight checks of the machine: the accelerator and its memory; the folders the kit writes
(writable, with room for the matrices the data will give)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from utils.checklist import Checklist
from utils.errors import filesystem_error

GIB = 1 << 30
MIN_FREE_DISK = 2 * GIB  # below: a blocker (matrices, checkpoints and caches need room)
LOW_FREE_DISK = 10 * GIB  # below: a warning
RUNS_EXPECTED = 8  # model scripts (7) and the ensemble, each writing its matrices


def check_accelerator(cl: Checklist) -> None:
    """Which CUDA GPUs torch sees, with total and free memory; none is a warning (CPU works, slowly)."""
    import torch

    if not torch.cuda.is_available():
        cl.warn("machine", "accelerator", f"no CUDA GPU visible to torch {torch.__version__}: training runs on the CPU (slow)")
        return
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        cl.ok("machine", f"cuda:{i}", f"{torch.cuda.get_device_name(i)}, {total / GIB:.1f} GB, {free / GIB:.1f} GB free")


def matrix_bytes(shapes: list[tuple[int, int]], runs: int = RUNS_EXPECTED) -> int:
    """Bytes of the float32 similarity matrices of ``runs`` runs, one matrix per (queries, gallery) split shape."""
    return runs * sum(4 * q * g for q, g in shapes)


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent."""
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    return where


def check_writable(cl: Checklist, path: Path, what: str) -> bool:
    """Whether a file can be made in ``path`` (or, when it does not exist yet, in its nearest existing parent):
    a real temporary file, removed at once. Read-only, full or not permitted is a blocker naming the fix."""
    where = _existing(path)
    if not where.is_dir():
        cl.block("machine", f"{what} writable", f"{where}: a file stands where a folder is expected; move it away or choose another path")
        return False
    try:
        fd, tmp = tempfile.mkstemp(dir=where, prefix=".preflight.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        mapped = filesystem_error(err, where)
        cl.block("machine", f"{what} writable", str(mapped) if mapped else f"{where}: cannot write ({err})")
        return False
    cl.ok("machine", f"{what} writable", f"{path}" + ("" if where == Path(path).absolute() else f" (will be made in {where})"))
    return True


def check_disk(cl: Checklist, path: Path, need_bytes: int = 0, need_detail: str = "") -> None:
    """Free disk space on the file system that holds ``path`` (or its nearest existing parent).

    Args:
        need_bytes: what the day's outputs will take (e.g. :func:`matrix_bytes`); the blocker
            threshold is that plus :data:`MIN_FREE_DISK` for checkpoints and caches.
        need_detail: how ``need_bytes`` was estimated, for the line.
    """
    where = _existing(path)
    free = shutil.disk_usage(where).free
    need = need_bytes + MIN_FREE_DISK
    detail = f"{free / GIB:.1f} GB free on {where}"
    if need_bytes:
        detail += f"; the matrices need ~{need_bytes / GIB:.2f} GB ({need_detail})"
    if free < need:
        cl.block("machine", "disk", f"{detail}; need at least {need / GIB:.1f} GB with checkpoints and caches: free space or use another --runs")
    elif free < need + LOW_FREE_DISK - MIN_FREE_DISK:
        cl.warn("machine", "disk", f"{detail}; checkpoints and caches may not fit")
    else:
        cl.ok("machine", "disk", detail)


def check_output_folders(cl: Checklist, runs: Path, submissions: Path, shapes: list[tuple[int, int]]) -> None:
    """``runs`` and ``submissions`` writable, and room under ``runs`` for the matrices of ``shapes`` (queries, gallery)."""
    check_writable(cl, runs, "runs")
    check_writable(cl, submissions, "submissions")
    detail = f"{RUNS_EXPECTED} runs x ({' + '.join(f'{q}x{g}' for q, g in shapes)}) x 4 bytes" if shapes else ""
    check_disk(cl, runs, matrix_bytes(shapes), detail)
