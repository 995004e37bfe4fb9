"""dlib's face model on several CPU cores: a pool of worker processes, each holding the model.

dlib's ``compute_face_descriptor`` runs on one core and holds the GIL (two threads take as long as one),
so :class:`~utils.faces.embedder.DlibEmbedder` splits a batch of chips into contiguous parts and hands them
to worker processes (forked: each loads the model file once). A chip's descriptor does not depend on the
batch it is in, so the result equals the one-process result exactly (tests/test_dlib_pool.py).

The workers ignore Ctrl-C (the parent handles it and shuts the pool down) and, on Linux, are killed
when the parent dies, even by SIGKILL, so no process is left behind. A worker that dies (out of memory,
killed) breaks the pool: the next batch raises a :class:`~utils.errors.KitError` instead of hanging.

    pool = DlibPool(path, processes=2)
    desc = pool.describe(chips)        # (n, 128) float32, chips: (n, 150, 150, 3) uint8
    pool.close()
"""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
import sys
import weakref
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from utils.errors import KitError

_MODEL = None  # the worker's model, loaded by _init


def describe(model, chips: np.ndarray) -> np.ndarray:
    """``model``'s 128-d descriptors of ``chips`` ((n, 150, 150, 3) uint8), as (n, 128) float32."""
    desc = model.compute_face_descriptor([np.ascontiguousarray(c) for c in chips], 0)
    return np.array([np.asarray(d) for d in desc], dtype=np.float32).reshape(len(chips), 128)


def _die_with_parent() -> None:
    """Linux: the kernel sends this process SIGKILL when its parent exits (PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except OSError:
            pass


def _init(path: str) -> None:
    global _MODEL
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    import dlib

    _MODEL = dlib.face_recognition_model_v1(path)


def _work(chips: np.ndarray) -> np.ndarray:
    return describe(_MODEL, chips)


class DlibPool:
    """``processes`` worker processes with the dlib model at ``path``, started on the first batch."""

    def __init__(self, path: Path, processes: int):
        if processes < 2:
            raise ValueError(f"a pool needs 2 or more processes, not {processes}")
        self.path, self.processes = Path(path), processes
        self._executor: ProcessPoolExecutor | None = None

    def describe(self, chips: np.ndarray) -> np.ndarray:
        """Descriptors of ``chips``, the batch split into contiguous parts across the workers.

        Raises:
            KitError: a worker died (out of memory or killed): the pool is closed and the run stops.
        """
        if len(chips) == 0:
            return np.zeros((0, 128), np.float32)
        if self._executor is None:
            self._executor = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("fork"),
                                                 initializer=_init, initargs=(str(self.path),))
            # shut down as soon as the pool is dropped, in this thread: left to interpreter exit, the executor's own
            # exit hook races its manager thread (Python 3.11: "Bad file descriptor" printed after a finished run)
            self._finalizer = weakref.finalize(self, self._executor.shutdown, True, cancel_futures=True)
        parts = np.array_split(chips, min(self.processes, len(chips)))
        try:
            return np.concatenate(list(self._executor.map(_work, parts)))
        except BrokenProcessPool:
            self.close()
            raise KitError(f"a dlib embedding process died (out of memory or killed); rerun, or pass --dlib-processes 1 "
                           f"to run dlib in the main process ({self.processes} processes were used)") from None

    @property
    def pids(self) -> list[int]:
        """The workers' process ids (empty before the first batch)."""
        return sorted(self._executor._processes) if self._executor is not None else []

    def close(self) -> None:
        """Stops the workers (idempotent)."""
        if self._executor is not None:
            self._finalizer()
            self._executor = None
