"""Write files so that a reader never sees half of one: temp file, then os.replace.

The file gets the mode a plain ``open(path, "w")`` would give it (0o666 less the
umask, e.g. 0644), not mkstemp's private 0600: teammates on a shared box must
be able to read runs, splits and submissions.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from utils.errors import filesystem_error


def current_umask() -> int:
    """The process's umask, read without changing it where /proc allows (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but brief)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder.

    Raises:
        KitError: the file system refuses (read-only, full, quota, file too
            large, permission denied, a file where a folder is expected): one
            line naming the path and what to do; no temporary file is left.
    """
    path = Path(path)
    try:
        return _write_via_temp(path, data)
    except OSError as err:
        mapped = filesystem_error(err, path)
        if mapped is None:
            raise
        raise mapped from err


def _write_via_temp(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
        view = memoryview(data)
        while view:  # os.write may write less than asked
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    return atomic_write_bytes(path, text.encode())


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """``np.save`` through a temporary file."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return atomic_write_bytes(path, buf.getvalue())


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` through a temporary file."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def remove_stale_temps(folder: str | os.PathLike, min_age_s: float = 60.0) -> list[Path]:
    """Delete the temp files (``.NAME.*.tmp``) that a killed writer left in ``folder``.

    Only files older than ``min_age_s`` go, so a writer still at work in another
    process keeps its file. Returns what was removed.
    """
    import time

    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    now = time.time()
    for p in folder.glob(".*.tmp"):
        try:
            if p.is_file() and now - p.stat().st_mtime >= min_age_s:
                p.unlink()
                removed.append(p)
        except OSError:
            continue
    return removed
