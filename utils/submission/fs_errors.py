"""Filesystem errors of the submission outputs as one line: the path, what happened, what to do.

Local to the submission group for now; a kit-wide OSError -> one-line mapping
belongs in utils/errors.py and can replace this.
"""

from __future__ import annotations

import errno
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from utils.errors import KitError

_REASONS = {
    errno.ENOSPC: "no space left on the device: free some space or pass another --out",
    errno.EDQUOT: "the disk quota is used up: free some space or pass another --out",
    errno.EROFS: "the file system is read-only: pass a writable --out",
    errno.EFBIG: "file too large (a file-size limit, see ulimit -f): raise the limit or pass another --out",
    errno.EACCES: "permission denied: pass a folder you may write as --out",
    errno.EPERM: "operation not permitted: pass a folder you may write as --out",
    errno.ENOTDIR: "a part of the path is a file, not a folder: pass another --out",
    errno.EEXIST: "a file of that name is in the way: pass another --out",
}


def describe(err: OSError) -> str:
    """What went wrong and the fix, in a few words."""
    return _REASONS.get(err.errno or 0, f"{err.strerror or type(err).__name__}")


def write_error(path: str | Path, err: OSError, what: str) -> KitError:
    """A KitError ``<path>: cannot write <what> (<reason and fix>)``."""
    where = err.filename if err.filename else path
    return KitError(f"{where}: cannot write {what} ({describe(err)})")


@contextmanager
def writing(path: str | Path, what: str) -> Iterator[None]:
    """Turn an OSError raised inside the block into :func:`write_error`'s one line."""
    try:
        yield
    except OSError as err:
        raise write_error(path, err, what) from None
