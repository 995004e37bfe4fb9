"""What every model script does before and after its own model.

:func:`prepare_task` reads the data folder, makes or reuses the validation
split, and checks the images (a broken training image is skipped with a line;
a broken query or gallery image stops the run). :func:`write_model_run`
takes the model's similarity matrices, scores validation (and test where the
data has a ground truth), prints the table and writes ``runs/<model>/``.
"""

from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from utils import __version__
from utils.dataset_layout import DataLayout, load_layout
from utils.images import check_images
from utils.logs import console
from utils.metrics import evaluate, relevance_matrix
from utils.similarity_io import SimMatrix, save_run
from utils.split import Split, SplitParams, load_or_create_split

log = logging.getLogger(__name__)


@dataclass
class Task:
    """Image lists of one run; names are what the matrices are indexed by."""

    layout: DataLayout
    split: Split
    full_train: bool
    train_paths: list[Path]
    train_labels: list[int]
    classes: list[str]  # identity of each label
    val_query: list[Path]
    val_gallery: list[Path]
    test_query: list[Path]
    test_gallery: list[Path]

    def names(self, which: str) -> list[str]:
        """Row/column names: data-relative paths for val, basenames for test."""
        paths = getattr(self, which)
        if which.startswith("val"):
            return [self.layout.rel(p) for p in paths]
        return [p.name for p in paths]

    def relevant(self, split: str) -> dict[str, list[str]] | None:
        """Ground truth of a split: val from the split, test from ground_truth.json if any."""
        if split == "val":
            return self.split.val_relevant()
        return self.layout.ground_truth


def prepare_task(data: str | Path, runs: str | Path, params: SplitParams, full_train: bool = False) -> Task:
    """Read the data, make or reuse the split, check every image once."""
    layout = load_layout(data)
    split = load_or_create_split(layout, params, runs)
    root = layout.root
    identities = split.training_identities(full_train)
    classes = sorted(identities)
    pairs = [(root / n, c) for c, ident in enumerate(classes) for n in identities[ident]]
    cache = Path(runs) / "image_check.json"  # verdicts shared by every model script on this data
    train_ok = set(check_images([p for p, _ in pairs], strict=False, what="training", cache=cache))
    pairs = [(p, c) for p, c in pairs if p in train_ok]
    val_q = check_images([root / n for n in split.val_query], strict=False, what="validation query", cache=cache)
    val_g = check_images([root / n for n in split.val_gallery], strict=False, what="validation gallery", cache=cache)
    test_q = check_images(layout.query, strict=True, what="query", cache=cache)
    test_g = check_images(layout.gallery, strict=True, what="gallery", cache=cache)
    log.info(
        "data %s: %d training images of %d identities%s; val %d queries x %d gallery; test %d x %d",
        root, len(pairs), len(classes), " (full train)" if full_train else "",
        len(val_q), len(val_g), len(test_q), len(test_g),
    )
    return Task(
        layout, split, full_train,
        [p for p, _ in pairs], [c for _, c in pairs], classes,
        val_q, val_g, test_q, test_g,
    )


def cosine_similarity(query_emb: np.ndarray, gallery_emb: np.ndarray) -> np.ndarray:
    """Dot products of L2-normalised embeddings, float32."""
    return (query_emb @ gallery_emb.T).astype(np.float32)


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
        "commit": git_commit(Path(__file__).resolve().parent.parent),
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
