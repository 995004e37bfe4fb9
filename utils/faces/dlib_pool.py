"""dlib's models on several CPU cores: a pool of worker processes, each holding the model.

dlib's face model (``compute_face_descriptor``) and its CNN face detector (mmod) run on one core and
hold the GIL (two threads take as long as one), so :class:`~utils.faces.embedder.DlibEmbedder` splits a
batch of chips into contiguous parts, and the cascade's ``mmod`` stage its images one by one, among
worker processes (forked: each loads the model file once). A chip's descriptor and an image's detections
do not depend on the batch they are in, so the results equal the one-process results exactly
(tests/test_dlib_pool.py).

A process forked after its parent has run the CNN detector hangs in that detector (dlib's thread pool
does not survive fork); the face model and the HOG detector do not have this. So the detector runs
in-process through :func:`mmod_in_process`, which notes it, and :func:`mmod_fork_safe` says whether an
mmod pool may still fork; where not, the cascade runs mmod in-process.

The workers ignore Ctrl-C (the parent handles it and shuts the pool down) and, on Linux, are killed
when the parent dies, even by SIGKILL, so no process is left behind. A worker that dies (out of memory,
killed) breaks the pool: the next batch raises a :class:`~utils.errors.KitError` instead of hanging.

    pool = DlibPool(path, processes=2)                 # the face model
    desc = pool.describe(chips)        # (n, 128) float32, chips: (n, 150, 150, 3) uint8
    pool.close()
    pool = DlibPool(mmod_path, processes=2, kind="mmod")
    found = pool.mmod(images)          # per image: (k, 4) boxes (left, top, right + 1, bottom + 1), (k,) confidences
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import weakref
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from utils.errors import KitError

_MODEL = None  # the worker's model, loaded by _init
_KIND = ""
KINDS = ("face", "mmod")
_MMOD_RAN_HERE = [False]  # this process ran the CNN detector itself: an mmod worker forked now would hang


def describe(model, chips: np.ndarray) -> np.ndarray:
    """``model``'s 128-d descriptors of ``chips`` ((n, 150, 150, 3) uint8), as (n, 128) float32."""
    desc = model.compute_face_descriptor([np.ascontiguousarray(c) for c in chips], 0)
    return np.array([np.asarray(d) for d in desc], dtype=np.float32).reshape(len(chips), 128)


def rect_boxes(rects) -> np.ndarray:
    """dlib rectangles as (k, 4) float32 boxes: left, top, right + 1, bottom + 1 (dlib's right and bottom are inclusive)."""
    return np.array([[r.left(), r.top(), r.right() + 1, r.bottom() + 1] for r in rects], np.float32).reshape(-1, 4)


def mmod_detect(model, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dlib's CNN face detector on ``image`` (RGB uint8, upsampled once): boxes (k, 4) (:func:`rect_boxes`) and
    confidences (k,) (float64, as dlib gives them)."""
    dets = model(image, 1)
    return rect_boxes([d.rect for d in dets]), np.array([d.confidence for d in dets], np.float64)


def mmod_in_process(model, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`mmod_detect` in this process, noted: no mmod pool forks from it afterwards."""
    _MMOD_RAN_HERE[0] = True
    return mmod_detect(model, image)


def mmod_fork_safe() -> bool:
    """Whether an mmod pool may fork from this process (it has not run the CNN detector itself)."""
    return not _MMOD_RAN_HERE[0]


def _die_with_parent() -> None:
    """Linux: the kernel sends this process SIGKILL when its parent exits (PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except OSError:
            pass


def _init(path: str, kind: str, parent: int) -> None:
    global _MODEL, _KIND
    # Ctrl-C reaches the whole process group: the parent alone turns it into its one line and shuts the pool down.
    # SIGTERM ends a worker quietly (the default action): the parent's handler, inherited by fork, printed a
    # traceback of its own, and the executor itself stops the workers of a broken pool with SIGTERM
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the death signal was set: nobody will send it
        os._exit(1)
    import dlib

    _MODEL, _KIND = (dlib.face_recognition_model_v1 if kind == "face" else dlib.cnn_face_detection_model_v1)(path), kind


def _work(part):
    return describe(_MODEL, part) if _KIND == "face" else [mmod_detect(_MODEL, im) for im in part]


class DlibPool:
    """``processes`` worker processes with the dlib model at ``path`` (``kind`` face: the face model; mmod: the CNN
    face detector), started on the first call."""

    def __init__(self, path: Path, processes: int, kind: str = "face"):
        if processes < 2:
            raise ValueError(f"a pool needs 2 or more processes, not {processes}")
        if kind not in KINDS:
            raise ValueError(f"dlib pool kind {kind!r}: one of {KINDS}")
        self.path, self.processes, self.kind = Path(path), processes, kind
        self._executor: ProcessPoolExecutor | None = None

    def describe(self, chips: np.ndarray) -> np.ndarray:
        """Descriptors of ``chips``, the batch split into contiguous parts across the workers.

        Raises:
            KitError: a worker died (out of memory or killed): the pool is closed and the run stops.
        """
        if len(chips) == 0:
            return np.zeros((0, 128), np.float32)
        return np.concatenate(self._map(np.array_split(chips, min(self.processes, len(chips)))))

    def mmod(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """:func:`mmod_detect` on each image, one image per task (sizes differ, so do the seconds).

        Raises:
            KitError: a worker died: the pool is closed and the run stops.
        """
        return [found for part in self._map([[im] for im in images]) for found in part]

    def _map(self, parts: list) -> list:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("fork"),
                                                 initializer=_init, initargs=(str(self.path), self.kind, os.getpid()))
            # shut down as soon as the pool is dropped, in this thread: left to interpreter exit, the executor's own
            # exit hook races its manager thread (Python 3.11: "Bad file descriptor" printed after a finished run)
            self._finalizer = weakref.finalize(self, self._executor.shutdown, True, cancel_futures=True)
        try:
            return list(self._executor.map(_work, parts))
        except BrokenProcessPool:
            self.close()
            what = "embedding" if self.kind == "face" else "face detection (mmod)"
            raise KitError(f"a dlib {what} process died (out of memory or killed; {self.processes} processes were used); rerun, "
                           f"or run infer_facenet.py with --dlib-processes 1 to keep dlib in the main process") from None

    @property
    def pids(self) -> list[int]:
        """The workers' process ids (empty before the first batch)."""
        return sorted(self._executor._processes) if self._executor is not None else []

    def close(self) -> None:
        """Stops the workers (idempotent)."""
        if self._executor is not None:
            self._finalizer()
            self._executor = None
