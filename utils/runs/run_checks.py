"""Preflight checks of a runs folder: each run complete (hashes), on the current data's
query and gallery names, and the weight files its config names present and loadable.

Blockers: a matrix that does not match its hash, a fused run (ensemble output)
whose members changed since it was fused, a run whose test names differ
from the data folder, a run made from other images of the same names (its
recorded data fingerprint differs; one written by an older kit without one
is a warning), a weight file that is missing or does not load. An
incomplete run (killed, failed, still running) is a warning: ``ensemble.py``
leaves it out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from utils.checklist import Checklist
from utils.data.layout import DataLayout
from utils.errors import KitError
from utils.runs.data_fingerprint import NOT_RECORDED, data_problem, layout_fingerprint
from utils.runs.provenance import is_fused
from utils.runs.run_lock import lock_holder
from utils.runs.similarity_io import IncompleteRun, load_run, run_folders
from utils.runs.topk_run import is_topk_run, load_topk_split, read_meta

WEIGHT_KEYS = ("weights", "checkpoint", "predictor")  # config keys that may name a weights file
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".dat")


def weight_files(config: dict[str, Any]) -> list[tuple[str, str]]:
    """``(key, value)`` of config entries that name a weights file (not tags like 'hub' or 'none')."""
    out = []
    for key, val in config.items():
        if isinstance(val, str) and any(k in key for k in WEIGHT_KEYS):
            if "/" in val or "\\" in val or val.lower().endswith(WEIGHT_SUFFIXES):
                out.append((key, val))
    return out


def weights_problem(path: Path) -> str:
    """'' when ``path`` exists and loads (torch state dict or safetensors); else why not."""
    if not path.is_file():
        return "not found"
    if path.suffix.lower() == ".dat":  # dlib models: present and non-empty is all that is checked
        return "" if path.stat().st_size > 0 else "empty file"
    from utils.weights import load_weights_file

    try:
        load_weights_file(path)
    except KitError as err:
        return str(err).removeprefix(f"{path}: ")
    return ""


def _names_vs_data(query_names: list[str], gallery_names: list[str], layout: DataLayout) -> str:
    for what, names, paths in (("query", query_names, layout.query), ("gallery", gallery_names, layout.gallery)):
        on_disk = {p.name for p in paths}
        if set(names) != on_disk:
            return (f"test {what} names differ from {layout.root / 'test' / what} (not in run: {sorted(on_disk - set(names))[:3]}, "
                    f"not on disk: {sorted(set(names) - on_disk)[:3]}); re-run the model on this data")
    return ""


def _load_checked(d: Path) -> tuple[dict[str, Any], list[str], list[str], str]:
    """meta.json, the test query and gallery names and a shape line of a run of either form, every file checked.

    Raises:
        KitError: as :func:`load_run` / :func:`load_topk_split` (IncompleteRun when unfinished).
    """
    if is_topk_run(d):
        test = load_topk_split(d, "test", with_embeddings=False)
        load_topk_split(d, "val", with_embeddings=False)
        return read_meta(d), test.query_names, test.gallery_names, f"top-k form, test {len(test.query_names)} x K={test.k}"
    run = load_run(d)
    test = run.splits["test"]
    return run.meta, test.query_names, test.gallery_names, "test {} x {}".format(*test.sim.shape)


def check_run(cl: Checklist, d: Path, layout: DataLayout | None, seen_weights: dict[Path, str],
              data_fp: dict[str, Any] | None = None) -> None:
    """One run folder: complete, hashes match (a fused run's members too), on the data's lists and images
    (``data_fp``: the data folder's test fingerprint, utils/runs/data_fingerprint.py), weights load."""
    try:
        meta, query_names, gallery_names, shape = _load_checked(d)
    except IncompleteRun as err:
        holder = lock_holder(d)
        cl.warn("runs", d.name, f"being written by {holder}; ensemble.py leaves it out until it finishes" if holder
                else f"incomplete, ensemble.py leaves it out: {err}")
        return
    except KitError as err:
        cl.block("runs", d.name, str(err))
        return
    mismatch = _names_vs_data(query_names, gallery_names, layout) if layout is not None else ""
    images = data_problem(meta, data_fp, str(layout.root)) if layout is not None and data_fp is not None and not mismatch else ""
    if mismatch or images:
        cl.block("runs", d.name, mismatch or images)
    elif images is None:
        cl.warn("runs", d.name, f"complete; {shape}; {NOT_RECORDED}: re-run it to check it against the data")
    else:
        fused = ", members unchanged" if is_fused(meta) else ""
        cl.ok("runs", d.name, f"complete, hashes match{fused}; {shape}" + (" = the data's lists" if layout else ""))
    for key, value in weight_files(meta.get("config", {})):
        path = Path(value)
        if path not in seen_weights:
            seen_weights[path] = weights_problem(path)
        problem = seen_weights[path]
        if problem:
            cl.block("weights", f"{d.name} {key}", f"{value}: {problem} (paths are relative to the current folder)")
        else:
            cl.ok("weights", f"{d.name} {key}", f"{value}: loads")


def check_runs(cl: Checklist, runs_dir: Path, layout: DataLayout | None) -> None:
    """Every run folder under ``runs_dir`` (the ensemble's output included)."""
    if not runs_dir.is_dir():
        cl.warn("runs", str(runs_dir), "no runs folder yet; run a model script first")
        return
    folders = run_folders(runs_dir)
    if not folders:
        cl.warn("runs", str(runs_dir), "no run folders yet; run a model script first")
    seen: dict[Path, str] = {}
    data_fp = layout_fingerprint(layout) if layout is not None and folders else None
    for d in folders:
        check_run(cl, d, layout, seen, data_fp)
