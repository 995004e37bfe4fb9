"""Write a model's run folder: score its matrices, record provenance, print the table.

:func:`write_model_run` takes a model's ``val``/``test`` similarity matrices,
scores validation (and test where the data has a ground truth), prints the
table and writes ``runs/<model>/`` through :func:`utils.runs.similarity_io.save_run`.
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from utils import __version__
from utils.data.task import Task
from utils.logs import console
from utils.runs.metrics import evaluate, relevance_matrix
from utils.runs.similarity_io import SimMatrix, save_run

log = logging.getLogger(__name__)


def git_commit(path: Path) -> str:
    """The project's commit (``unknown`` outside a git checkout), ``+dirty`` if changed."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=path, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return (rev or "unknown") + ("+dirty" if rev and dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def metrics_table(title: str, rows: dict[str, dict[str, float]]) -> Table:
    """A rich table of metrics, one row per model/split."""
    table = Table(title=title)
    for col in ("", "score", "top1", "top5", "top10", "mAP@All", "P@1", "P@5", "P@10"):
        table.add_column(col, justify="right" if col else "left")
    for name, m in rows.items():
        table.add_row(
            name, f"{m['score']:.2f}", f"{m['top1']:.3f}", f"{m['top5']:.3f}", f"{m['top10']:.3f}",
            f"{m['map_all']:.3f}", f"{m['p@1']:.3f}", f"{m['p@5']:.3f}", f"{m['p@10']:.3f}",
        )
    return table


def write_model_run(
    run_dir: str | Path,
    model: str,
    config: dict[str, Any],
    task: Task,
    sims: dict[str, np.ndarray],
    timings: dict[str, float],
    extra: dict[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Score and save a model's ``val``/``test`` matrices with their meta.json.

    Returns:
        metrics per split that has a ground truth.
    """
    run_dir = Path(run_dir)
    if (run_dir / "meta.json").exists():
        log.info("replacing the earlier run in %s", run_dir)
    matrices = {
        "val": SimMatrix(sims["val"], task.names("val_query"), task.names("val_gallery")),
        "test": SimMatrix(sims["test"], task.names("test_query"), task.names("test_gallery")),
    }
    metrics = {}
    for split, m in matrices.items():
        relevant = task.relevant(split)
        if relevant is not None:
            metrics[split] = evaluate(m.sim, relevance_matrix(m.query_names, m.gallery_names, relevant))
    meta = {
        "model": model,
        "config": config,
        "commit": git_commit(Path(__file__).resolve().parents[2]),
        "kit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "full_train": task.full_train,
        "split": {"seed": task.split.params.seed, "val_fraction": task.split.params.val_fraction},
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "metrics": metrics,
        **(extra or {}),
    }
    save_run(run_dir, matrices, meta)
    console.print(metrics_table(f"{model} -> {run_dir}", metrics))
    return metrics
