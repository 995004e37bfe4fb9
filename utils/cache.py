"""The on-disk array cache: key -> load, or compute and save atomically.

Embeddings and face crops are cached under a key made of every input file's
path, size and mtime plus a tag for the settings (:func:`files_key`), so a
changed file or flag recomputes. :func:`cached` is the one way to use it:

    emb = cached(cache_dir / f"emb_{files_key(paths, tag)}.npy", lambda: embed(paths), "gallery")

An entry that does not load (truncated, not an array) or holds NaN/inf is
discarded with one warning and recomputed; a computed result that is not
finite is never cached (the caller gets a KitError naming the set instead).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import weakref
import zipfile
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar, Union

import numpy as np
import torch

from utils.atomic import atomic_write_bytes
from utils.errors import KitError

log = logging.getLogger(__name__)

Arrays = Union[np.ndarray, dict[str, np.ndarray]]
A = TypeVar("A", np.ndarray, dict)


def files_key(paths: Sequence[Path], extra: str) -> str:
    """A key that changes when any file (name, size, mtime) or ``extra`` changes."""
    h = hashlib.sha256(extra.encode())
    for p in paths:
        st = Path(p).stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def model_of(forward: Callable[..., Any]) -> torch.nn.Module | None:
    """The module behind a forward: the module itself, the one a bound method belongs to (``model.encode_image``),
    or a wrapper's ``model`` attribute (the face embedders); None for anything else."""
    for candidate in (forward, getattr(forward, "__self__", None), getattr(forward, "model", None)):
        if isinstance(candidate, torch.nn.Module):
            return candidate
    return None


def weights_version(model: torch.nn.Module) -> tuple | None:
    """Changes whenever a parameter or buffer of ``model`` is replaced or changed in place (an optimiser step,
    ``load_state_dict``, BatchNorm statistics); None when it cannot be read (tensors made under inference mode)."""
    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    try:
        return tuple(id(t) for t in tensors), sum(t._version for t in tensors), model.training
    except RuntimeError:
        return None


_FINGERPRINTS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, str]]" = weakref.WeakKeyDictionary()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A sha256 (16 hex digits) of every tensor of ``model``'s state_dict: names, dtypes, shapes and bytes.

    Computed once per model and weights version (:func:`weights_version`), so the four image sets of a run
    hash the weights once. Correct for random-init models too (their bytes are hashed, not a tag).
    """
    version = weights_version(model)
    memo = _FINGERPRINTS.get(model)
    if memo is not None and version is not None and memo[0] == version:
        return memo[1]
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest = h.hexdigest()[:16]
    if version is not None:
        _FINGERPRINTS[model] = (version, digest)
    return digest


def numbers_tag(forward: Callable[..., Any], amp: torch.dtype | None, device: torch.device) -> str:
    """What changes an embedding's numbers beyond the files and the settings: the autocast dtype (or fp32), the
    device class (cpu/cuda) and the weights' fingerprint (``weights=?`` when ``forward`` is no module's)."""
    model = model_of(forward)
    weights = weights_fingerprint(model) if model is not None else "?"
    return f"amp={str(amp).removeprefix('torch.') if amp is not None else 'fp32'}|dev={device.type}|weights={weights}"


def _finite(value: Arrays, keys: Sequence[str] | None = None) -> bool:
    """Float arrays (of a dict: those named in ``keys``, None = all) hold no NaN or inf."""
    if isinstance(value, dict):
        arrays = [a for k, a in value.items() if keys is None or k in keys]
    else:
        arrays = [value]
    return all(not np.issubdtype(a.dtype, np.floating) or bool(np.isfinite(a).all()) for a in arrays)


def _load(path: Path) -> Arrays:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    return np.load(path, allow_pickle=False)


def _dump(value: Arrays) -> bytes:
    buf = io.BytesIO()
    if isinstance(value, dict):
        np.savez(buf, **value)
    else:
        np.save(buf, value, allow_pickle=False)
    return buf.getvalue()


def load_cached(path: Path, finite_keys: Sequence[str] | None = None) -> Arrays | None:
    """The entry at ``path``, or None when it is missing, unreadable or not finite (then it is removed)."""
    if not path.is_file():
        return None
    try:
        value = _load(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        log.warning("%s: corrupt cache entry (%s); recomputing", path, str(err).splitlines()[0] if str(err) else type(err).__name__)
        path.unlink(missing_ok=True)
        return None
    if not _finite(value, finite_keys):
        log.warning("%s: cache entry holds NaN or inf; recomputing", path)
        path.unlink(missing_ok=True)
        return None
    return value


def cached(path: Path | None, compute: Callable[[], A], what: str, finite_keys: Sequence[str] | None = None) -> A:
    """``compute()``'s result, from ``path`` when a valid entry is there, else computed and saved.

    Args:
        path: the entry (``.npy`` for one array, ``.npz`` for a dict of arrays);
            None disables caching.
        compute: makes the value.
        what: the image set, for messages.
        finite_keys: for a dict, the arrays that must be finite (None: every
            float array; NaN can be a legitimate "missing" marker elsewhere).

    Raises:
        KitError: the computed value holds NaN or inf (it is not cached).
    """
    if path is not None:
        value = load_cached(Path(path), finite_keys)
        if value is not None:
            log.info("%s: from cache %s", what, Path(path).name)
            return value  # type: ignore[return-value]
    value = compute()
    if not _finite(value, finite_keys):
        raise KitError(f"{what}: the model gave NaN or infinite embeddings; check the weights (or try --no-amp); nothing was cached")
    if path is not None:
        atomic_write_bytes(path, _dump(value))
    return value
