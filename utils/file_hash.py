"""The sha256 of a file's bytes, streamed (matrices, weights and images can be large).

    file_sha256("runs/resnet/val_sim.npy")  # 64 hex digits, as hashlib.sha256(data).hexdigest()
"""

from __future__ import annotations

import hashlib
import os


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of the file at ``path``, read in chunks (never whole into memory).

    Raises:
        OSError: the file cannot be opened or read (FileNotFoundError when it is missing).
    """
    with open(path, "rb") as f:
        if hasattr(hashlib, "file_digest"):  # Python 3.11+
            return hashlib.file_digest(f, "sha256").hexdigest()
        h = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        return h.hexdigest()
