"""Write a model's run folder: score its matrices, record provenance, print the table.

:func:`write_model_run` takes a model's ``val``/``test`` similarity matrices,
scores validation (and test where the data has a ground truth), prints the
table and writes ``runs/<model>/`` through :func:`utils.runs.similarity_io.save_run`.
"""

from __future__ import annotations

import atexit
import logging
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from utils import __version__
from utils.data.task import Task, prepare_task
from utils.device import pick_device, precision_record
from utils.distributed import DistInfo, barrier, cleanup, init_distributed, writes_runs
from utils.errors import KitError
from utils.logs import console
from utils.runs.cosine import similarities
from utils.runs.data_fingerprint import task_fingerprint
from utils.runs.gap import META_KEY, save_run_embeddings
from utils.runs.metrics import competition_score, evaluate, relevance_matrix
from utils.runs.run_lock import release_run_lock
from utils.runs.similarity_io import SimMatrix, invalidate_run, save_run
from utils.runs.topk_run import DEFAULT_K, MAX_MATRIX_CELLS, TopkSplit, make_topk_split, save_topk_run, use_topk_form
from utils.seed import seed_everything

log = logging.getLogger(__name__)


def git_commit(path: Path, ignore: tuple[str, ...] = ()) -> str:
    """The project's commit (``unknown`` outside a git checkout), ``+dirty`` if a tracked file outside the
    folders ``ignore`` (relative to the checkout's root) has changed."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        spec = [":/", *(f":(top,exclude){p}" for p in ignore)] if ignore else []
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", *spec], cwd=path, capture_output=True, text=True, timeout=5
        )
        dirty = status.stdout.strip() or status.returncode != 0  # a status git could not give is not a clean tree
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

    Under torchrun only rank 0 writes (and scores); the other ranks return ``{}``.

    Returns:
        metrics per split that has a ground truth.
    """
    if not writes_runs():
        return {}
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
    save_run(run_dir, matrices, run_meta(model, config, task, timings, metrics, extra))
    release_run_lock(run_dir)  # the run is written: the folder is free for the next writer
    console.print(metrics_table(f"{model} -> {run_dir}", metrics))
    return metrics


def run_meta(model: str, config: dict[str, Any], task: Task, timings: dict[str, float], metrics: dict, extra: dict | None) -> dict[str, Any]:
    """What every model run records: model, config, provenance, split, timings, metrics, and the script's extras."""
    return {
        "model": model,
        "config": config,
        "commit": git_commit(Path(__file__).resolve().parents[2]),
        "kit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "full_train": task.full_train,
        "split": {"seed": task.split.params.seed, "val_fraction": task.split.params.val_fraction},
        "data_fingerprint": task_fingerprint(task),  # the images it was made from (utils/runs/data_fingerprint.py)
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        **run_precision(config),
        "metrics": metrics,
        **(extra or {}),
    }


def run_precision(config: dict[str, Any]) -> dict[str, Any]:
    """``precision`` (bf16, fp16 or fp32) and ``device`` (type, card name, compute capability) of a run,
    chosen from its ``--device`` and ``--amp`` flags by the same function the script used
    (:func:`utils.device.choose_precision`); a script without ``--amp`` runs in fp32."""
    try:
        device = pick_device(str(config.get("device", "auto")))
    except KitError:  # a config written elsewhere (e.g. fused from runs made on a GPU box): no card to read here
        return {}
    return precision_record(device, bool(config.get("amp", False)))


@dataclass
class RunForm:
    """When a run holds full matrices and when the top-k form (see utils/runs/topk_run.py)."""

    max_cells: int = MAX_MATRIX_CELLS  # query x gallery cells up to which the matrices are written
    k: int = DEFAULT_K  # candidates per query in the top-k form
    backend: str = "exact"  # search backend of the top-k form: exact (chunked) or faiss


def topk_metrics(split: TopkSplit, relevant: dict[str, list[str]]) -> dict[str, float]:
    """Top-1/5/10 and the score from a top-k split; the full-ranking metrics (mAP@All, P@k) are NaN."""
    g = np.asarray(split.gallery_names)
    first = np.full(len(split.query_names), 10)
    for i, q in enumerate(split.query_names):
        right = set(relevant.get(q, ()))
        hits = [r for r, j in enumerate(split.indices[i, :10]) if j >= 0 and g[j] in right]
        first[i] = hits[0] if hits else 10
    top = {k: float((first < k).mean()) for k in (1, 5, 10)}
    nan = float("nan")
    return {"score": competition_score(top[1], top[5], top[10]), "top1": top[1], "top5": top[5], "top10": top[10],
            "map_all": nan, "p@1": nan, "p@5": nan, "p@10": nan}


def write_embedding_run(
    run_dir: str | Path, model: str, config: dict[str, Any], task: Task, emb: dict[str, np.ndarray],
    timings: dict[str, float], extra: dict[str, Any] | None = None, form: RunForm | None = None,
) -> dict[str, dict[str, float]]:
    """A run from the four embedding sets: the two cosine matrices, or past ``form.max_cells`` the top-k form.

    Under torchrun only rank 0 writes (and scores); the other ranks return ``{}``.

    Returns:
        metrics per split that has a ground truth.
    """
    if not writes_runs():
        return {}
    form = form or RunForm()
    if not use_topk_form(len(emb["test_query"]), len(emb["test_gallery"]), form.max_cells):
        kept = {META_KEY: save_run_embeddings(run_dir, emb)}  # for visualize.py --gap (utils/runs/gap.py)
        return write_model_run(run_dir, model, config, task, similarities(emb), timings, {**(extra or {}), **kept})
    run_dir = Path(run_dir)
    log.info("%d x %d test cells exceed --matrix-limit %d: writing the top-k form (K=%d, %s search)",
             len(emb["test_query"]), len(emb["test_gallery"]), form.max_cells, form.k, form.backend)
    splits, metrics = {}, {}
    for split in ("val", "test"):
        q, g = f"{split}_query", f"{split}_gallery"
        k = min(form.k, len(emb[g]))
        splits[split] = make_topk_split(emb[q], emb[g], task.names(q), task.names(g), k=k, backend=form.backend, progress=True)
        relevant = task.relevant(split)
        if relevant is not None:
            metrics[split] = topk_metrics(splits[split], relevant)
    save_topk_run(run_dir, splits, {**run_meta(model, config, task, timings, metrics, extra), "search_backend": form.backend})
    release_run_lock(run_dir)
    console.print(metrics_table(f"{model} (top-k form) -> {run_dir}", metrics))
    return metrics


@dataclass
class RunStart:
    """What an inference script has once its run has begun: folder, device, task, timings, its place under torchrun."""

    run_dir: Path
    device: Any
    task: Task
    t0: float
    timings: dict[str, float]
    dist_info: DistInfo = field(default_factory=DistInfo)


def begin_inference_run(cfg: Any, run_name: str | None = None) -> RunStart:
    """The opening of every script that does not train: lock the run folder and invalidate the old run
    (:func:`utils.runs.similarity_io.invalidate_run`), pick the device, seed, read the data and the
    shared validation split (only its val queries/gallery are used).

    Under ``torchrun`` every rank joins the process group (gloo on the CPU, NCCL on GPUs, one GPU per
    rank); rank 0 alone invalidates the run and writes ``runs/split.json``, the others read it after it.

    Raises:
        KitError: another live process is writing the run folder (the message names it).
    """
    t0 = time.time()
    run_dir = cfg.runs / (run_name or cfg.run_name)
    dist_info, device = init_distributed(cfg.device, cfg.dist_timeout_min)
    if dist_info.ddp:
        atexit.register(cleanup, dist_info)
        if not dist_info.master:
            logging.getLogger().setLevel(logging.WARNING)  # rank 0 speaks for the run
    if dist_info.master:
        invalidate_run(run_dir)  # a killed or failed re-run must not leave the old run looking complete
    seed_everything(cfg.seed, cfg.deterministic, device)
    task = prepare_task(cfg.data, cfg.runs, cfg.split_params()) if dist_info.master else None
    barrier(dist_info)
    task = task or prepare_task(cfg.data, cfg.runs, cfg.split_params())
    return RunStart(run_dir, device, task, t0, {"prepare": time.time() - t0}, dist_info)
