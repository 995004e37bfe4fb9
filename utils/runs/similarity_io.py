"""Save and load the similarity matrices that model scripts hand to the ensemble.

A run folder ``runs/<model>/`` holds ``val_sim.npy``, ``test_sim.npy`` (float32,
(n_queries, n_gallery), higher = more similar, finite) and ``meta.json`` with
the query and gallery names of each split in row/column order. Loading checks
all of it; :func:`align_runs` joins several runs by name, never by row order.

``meta.json`` is the completion marker. :func:`save_run` checks every matrix
before writing any, removes the old marker, writes each matrix through a
temporary file, and writes ``meta.json`` last with each matrix's sha256, shape
and dtype. :func:`load_run` streams each matrix through sha256 and refuses a
file that does not match, so a folder is either complete and consistent or
refused. A model script calls :func:`invalidate_run` before a re-run starts: it
takes the folder's lock (one writer at a time, :mod:`utils.runs.run_lock`) and
removes the marker, so a re-run that is killed or fails leaves a folder that
loaders refuse. A fused run (ensemble output) is checked against its members'
hashes on load (:mod:`utils.runs.provenance`). :func:`scan_runs` finds the usable runs under a runs folder and says why it
leaves each other one out.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from utils.atomic import atomic_write_bytes, atomic_write_json, remove_stale_temps
from utils.errors import KitError
from utils.runs.provenance import check_members, is_fused, parse_json_file, read_json
from utils.runs.run_lock import acquire_run_lock, lock_holder, run_lock
from utils.runs.topk import topk

log = logging.getLogger(__name__)

SPLITS = ("val", "test")
MARKER = "meta.json"  # written last; a folder without it is an unfinished run
RUN_FILES = (MARKER, "val_sim.npy", "test_sim.npy", "last.pt", "best.pt")  # any of them: a run folder
_CHUNK = 1 << 20


class IncompleteRun(KitError):
    """A run folder without its completion marker or a matrix: killed, failed or still running."""


@dataclass
class SimMatrix:
    """One split's matrix with the names of its rows and columns.

    It shares the loaded-split interface of :class:`utils.runs.topk_run.TopkSplit`:
    ``query_names``, ``gallery_names`` and :meth:`top_lists` (see :func:`utils.runs.topk_run.load_split`).
    """

    sim: np.ndarray
    query_names: list[str]
    gallery_names: list[str]

    def top_lists(self, k: int = 10) -> dict[str, list[str]]:
        """Each query's ``k`` best gallery names, best first (ties: the lower column first).

        Raises:
            KitError: the gallery has fewer than ``k`` images.
        """
        if len(self.gallery_names) < k:
            raise KitError(f"the gallery has {len(self.gallery_names)} images; a top-{k} needs at least {k}")
        return {q: [self.gallery_names[j] for j in row] for q, row in zip(self.query_names, topk(self.sim, k).tolist())}


@dataclass
class Run:
    """A model's run folder, loaded and checked."""

    name: str
    path: Path
    meta: dict[str, Any]
    splits: dict[str, SimMatrix] = field(default_factory=dict)


def _check_names(names: list[str], what: str, where: Path) -> None:
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:3]
        raise KitError(f"{where}: {what} names repeat, e.g. {dup}")


def check_matrix(sim: np.ndarray, n_rows: int, n_cols: int, where: Path | str) -> None:
    """Raise a KitError unless ``sim`` is a finite 2-D matrix of the given shape."""
    if sim.ndim != 2:
        raise KitError(f"{where}: expected a 2-D matrix, got shape {sim.shape}")
    if sim.shape != (n_rows, n_cols):
        raise KitError(
            f"{where}: shape {sim.shape} does not match its names ({n_rows} queries x {n_cols} gallery)"
        )
    if not np.isfinite(sim).all():
        bad = int((~np.isfinite(sim)).sum())
        raise KitError(f"{where}: {bad} NaN or infinite value(s); the model run is broken, re-run it")


def invalidate_run(run_dir: str | Path, clean_parent: bool = True) -> bool:
    """Claim ``run_dir`` for this process's re-run: take its lock, clear stale temp files, remove the old marker.

    The lock (:mod:`utils.runs.run_lock`) stops a second writer with one line
    until this process writes the run or exits. Temp files (``.*.tmp``) that a
    killed writer left in the folder, its ``cache/`` and the runs folder above
    are removed (the folder above only with ``clean_parent``: a model's run sits
    in the runs folder, an ensemble's --out may not). Until the re-run writes a new ``meta.json``, loaders refuse
    the folder, so a re-run that is killed or fails never leaves the old
    matrices looking current.

    Returns:
        whether there was a marker to remove.

    Raises:
        KitError: another live process is writing ``run_dir``.
    """
    run_dir = Path(run_dir)
    acquire_run_lock(run_dir)
    remove_run_temps(run_dir, run_dir.parent if clean_parent else None)
    return _remove_marker(run_dir)


def remove_run_temps(run_dir: str | Path, runs_dir: str | Path | None = None) -> list[Path]:
    """Remove the stale temp files in ``run_dir``, ``run_dir/cache`` and ``runs_dir`` (the runs folder)."""
    run_dir = Path(run_dir)
    folders = (run_dir, run_dir / "cache") + ((Path(runs_dir),) if runs_dir is not None else ())
    removed = [p for d in folders for p in remove_stale_temps(d)]
    for p in removed:
        log.info("removed %s, left by a killed writer", p)
    return removed


def _remove_marker(run_dir: Path) -> bool:
    marker = run_dir / MARKER
    try:
        marker.unlink()
    except FileNotFoundError:
        return False
    log.info("cleared the completion marker of the earlier run in %s", marker.parent)
    return True


def _npy_bytes(sim: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, sim, allow_pickle=False)
    return buf.getvalue()


def save_run(run_dir: str | Path, splits: dict[str, SimMatrix], meta: dict[str, Any]) -> Path:
    """Check every split's matrix, then write them and, last, ``meta.json`` with their hashes.

    Nothing is written when any matrix or name list is bad, and a failure while
    writing leaves no ``meta.json``: the folder is complete or refused.

    Raises:
        KitError: a matrix is not finite, its shape does not match its names,
            or names repeat.
    """
    run_dir = Path(run_dir)
    meta = dict(meta)
    meta["splits"], meta["files"] = {}, {}
    checked = []
    for split, m in splits.items():
        sim = np.ascontiguousarray(m.sim, dtype=np.float32)
        where = run_dir / f"{split}_sim.npy"
        check_matrix(sim, len(m.query_names), len(m.gallery_names), where)
        _check_names(m.query_names, "query", where)
        _check_names(m.gallery_names, "gallery", where)
        checked.append((split, m, sim, where))
    with run_lock(run_dir):
        _remove_marker(run_dir)
        for split, m, sim, where in checked:
            data = _npy_bytes(sim)
            atomic_write_bytes(where, data)
            meta["files"][where.name] = {"sha256": hashlib.sha256(data).hexdigest(), "shape": list(sim.shape), "dtype": str(sim.dtype)}
            meta["splits"][split] = {"query_names": list(m.query_names), "gallery_names": list(m.gallery_names)}
        atomic_write_json(run_dir / MARKER, meta)
    return run_dir


def _load_checked(where: Path, record: dict[str, Any] | None) -> np.ndarray:
    """Stream ``where`` through sha256, compare with ``record`` from meta.json, then load it."""
    if not isinstance(record, dict) or "sha256" not in record:
        raise KitError(f"{where}: meta.json holds no sha256 for it (an older kit wrote this run, or it was edited); re-run the model")
    try:
        with open(where, "rb") as f:
            digest = hashlib.sha256()
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
            if digest.hexdigest() != record["sha256"]:
                raise KitError(f"{where}: does not match the sha256 in meta.json (written by another run); re-run the model")
            f.seek(0)
            return np.load(f, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise KitError(f"{where}: cannot read ({err})") from None


def load_run(run_dir: str | Path, splits: tuple[str, ...] = SPLITS) -> Run:
    """Load and check a run folder.

    Raises:
        KitError: no ``meta.json`` (the run is unfinished), missing files, a
            matrix whose sha256 differs from meta.json's, unreadable matrices,
            shapes that do not match the names, NaN or infinite values,
            repeated names; a fused run whose members changed since
            (:class:`utils.runs.provenance.StaleEnsemble`); a run in the top-k form.
    """
    run_dir = Path(run_dir)
    meta_path = run_dir / MARKER
    if not meta_path.is_file():
        if any((run_dir / f).exists() for f in RUN_FILES):
            raise IncompleteRun(f"{meta_path}: not found; the run is incomplete (killed, failed or still running); re-run the model")
        raise IncompleteRun(f"{meta_path}: not found; run the model script first")
    meta = parse_json_file(meta_path)
    if not isinstance(meta, dict):
        raise KitError(f"{meta_path}: expected a JSON object; re-run the model")
    if meta.get("form") == "topk":  # utils.runs.topk_run.FORM (that module imports this one)
        raise KitError(f"{run_dir}: a run in the top-k form (each query's best candidates, no <split>_sim.npy); this "
                       "step reads runs in the matrix form: re-run the model with a --matrix-limit above its "
                       "queries x gallery")
    check_members(run_dir, meta)
    run = Run(name=meta.get("model", run_dir.name), path=run_dir, meta=meta)
    for split in splits:
        where = run_dir / f"{split}_sim.npy"
        names = meta.get("splits", {}).get(split)
        if names is None:
            raise KitError(f"{meta_path}: no names for split {split!r}")
        if not where.is_file():
            raise IncompleteRun(f"{where}: not found; the model run did not finish")
        sim = _load_checked(where, meta.get("files", {}).get(where.name))
        q, g = names["query_names"], names["gallery_names"]
        check_matrix(sim, len(q), len(g), where)
        _check_names(q, "query", where)
        _check_names(g, "gallery", where)
        run.splits[split] = SimMatrix(sim.astype(np.float32, copy=False), q, g)
    return run


def _same_names(ref: list[str], other: list[str], what: str, ref_run: Run, run: Run, split: str) -> None:
    if set(ref) != set(other):
        missing = sorted(set(ref) - set(other))[:3]
        extra = sorted(set(other) - set(ref))[:3]
        raise KitError(
            f"{run.path}: {split} {what} names differ from {ref_run.path} "
            f"(missing {missing}, extra {extra}); re-run both models on the same data and split"
        )


def align_runs(runs: list[Run], split: str) -> list[SimMatrix]:
    """The runs' matrices for ``split``, rows and columns in the first run's order.

    Raises:
        KitError: the runs do not hold the same query and gallery names.
    """
    ref = runs[0].splits[split]
    out = [ref]
    for run in runs[1:]:
        m = run.splits[split]
        _same_names(ref.query_names, m.query_names, "query", runs[0], run, split)
        _same_names(ref.gallery_names, m.gallery_names, "gallery", runs[0], run, split)
        rows = {n: i for i, n in enumerate(m.query_names)}
        cols = {n: j for j, n in enumerate(m.gallery_names)}
        r = np.array([rows[n] for n in ref.query_names])
        c = np.array([cols[n] for n in ref.gallery_names])
        out.append(SimMatrix(m.sim[np.ix_(r, c)], ref.query_names, ref.gallery_names))
    return out


def _names_differ(ref: Run, run: Run) -> str:
    """Why ``run``'s names differ from ``ref``'s ('' when they agree on every split)."""
    for split in SPLITS:
        for what in ("query", "gallery"):
            a = set(getattr(ref.splits[split], f"{what}_names"))
            b = set(getattr(run.splits[split], f"{what}_names"))
            if a != b:
                return (f"its {split} {what} names differ from {ref.path} (missing {sorted(a - b)[:3]}, "
                        f"extra {sorted(b - a)[:3]}); re-run it on the same data and split")
    return ""


def run_folders(runs_dir: str | Path, exclude: tuple[Path, ...] = ()) -> list[Path]:
    """Subfolders of ``runs_dir`` that hold any of :data:`RUN_FILES` (caches and the like are not runs)."""
    skip = {Path(p).resolve() for p in exclude}
    return sorted(
        d for d in Path(runs_dir).iterdir()
        if d.is_dir() and d.resolve() not in skip and any((d / f).exists() for f in RUN_FILES)
    )


def scan_runs(runs_dir: str | Path, exclude: tuple[Path, ...] = ()) -> tuple[list[Run], list[tuple[Path, str]]]:
    """The complete runs under ``runs_dir`` that agree on names, and each folder left out with why.

    A subfolder counts as a run when it holds any of :data:`RUN_FILES`; fused
    runs (ensemble outputs) are skipped: they are never members. Left
    out: incomplete runs (no ``meta.json``, a missing matrix), matrices that do
    not match their hashes, and runs whose names differ from the largest group
    of runs that agree.

    Raises:
        KitError: two equally large groups of runs disagree on names (which
            one is current cannot be told).
    """
    runs, left_out = [], []
    for d in run_folders(runs_dir, exclude):
        if is_fused(read_json(d / MARKER) or {}):
            log.info("not a member: %s is a fused run (ensemble.py output); fused runs are never fused again", d)
            continue
        try:
            runs.append(load_run(d))
        except IncompleteRun as err:
            holder = lock_holder(d)
            left_out.append((d, f"still being written by {holder}" if holder else str(err)))
        except KitError as err:
            left_out.append((d, str(err)))
    groups: list[list[Run]] = []
    for run in runs:
        group = next((g for g in groups if not _names_differ(g[0], run)), None)
        if group is None:
            groups.append([run])
        else:
            group.append(run)
    if not groups:
        return [], left_out
    keep = max(groups, key=len)
    tied = [g for g in groups if len(g) == len(keep) and g is not keep]
    if tied:
        raise KitError(f"{tied[0][0].path}: {_names_differ(keep[0], tied[0][0])}; or choose the runs with --models")
    for group in groups:
        if group is not keep:
            left_out += [(r.path, _names_differ(keep[0], r)) for r in group]
    return keep, sorted(left_out)
