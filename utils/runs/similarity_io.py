"""Save and load the similarity matrices that model scripts hand to the ensemble.

A run folder ``runs/<model>/`` holds ``val_sim.npy``, ``test_sim.npy`` (float32,
(n_queries, n_gallery), higher = more similar, finite) and ``meta.json`` with
the query and gallery names of each split in row/column order. Loading checks
all of it; :func:`align_runs` joins several runs by name, never by row order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from utils.atomic import atomic_save_npy, atomic_write_json
from utils.errors import KitError

SPLITS = ("val", "test")


@dataclass
class SimMatrix:
    """One split's matrix with the names of its rows and columns."""

    sim: np.ndarray
    query_names: list[str]
    gallery_names: list[str]


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


def save_run(run_dir: str | Path, splits: dict[str, SimMatrix], meta: dict[str, Any]) -> Path:
    """Write every split's matrix and then ``meta.json`` (names included), atomically."""
    run_dir = Path(run_dir)
    meta = dict(meta)
    meta["splits"] = {}
    for split, m in splits.items():
        sim = np.ascontiguousarray(m.sim, dtype=np.float32)
        where = run_dir / f"{split}_sim.npy"
        check_matrix(sim, len(m.query_names), len(m.gallery_names), where)
        _check_names(m.query_names, "query", where)
        _check_names(m.gallery_names, "gallery", where)
        atomic_save_npy(where, sim)
        meta["splits"][split] = {"query_names": list(m.query_names), "gallery_names": list(m.gallery_names)}
    atomic_write_json(run_dir / "meta.json", meta)
    return run_dir


def load_run(run_dir: str | Path, splits: tuple[str, ...] = SPLITS) -> Run:
    """Load and check a run folder.

    Raises:
        KitError: missing files, unreadable matrices, shapes that do not match
            the names, NaN or infinite values, repeated names.
    """
    run_dir = Path(run_dir)
    meta_path = run_dir / "meta.json"
    if not meta_path.is_file():
        raise KitError(f"{meta_path}: not found; run the model script first")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise KitError(f"{meta_path}: not valid JSON ({err})") from None
    run = Run(name=meta.get("model", run_dir.name), path=run_dir, meta=meta)
    for split in splits:
        where = run_dir / f"{split}_sim.npy"
        names = meta.get("splits", {}).get(split)
        if names is None:
            raise KitError(f"{meta_path}: no names for split {split!r}")
        if not where.is_file():
            raise KitError(f"{where}: not found; the model run did not finish")
        try:
            sim = np.load(where, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise KitError(f"{where}: cannot read ({err})") from None
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
