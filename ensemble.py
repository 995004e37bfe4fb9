"""Fuse the model runs' similarity matrices with weights searched on validation, optionally
re-rank, and write runs/ensemble/ (the test matrix is what submit.py submits).

    # every run under runs/ (each runs/<model>/ with meta.json + val_sim.npy + test_sim.npy):
    python ensemble.py --runs runs
    # recommended on competition day: try every fusion and re-ranking, keep what wins on validation
    python ensemble.py --runs runs --auto
    # chosen runs, one fusion, one re-ranking; print test scores too (rehearsal data only)
    python ensemble.py --runs runs --models facenet clip --fusion rank --dual-softmax --temperature 1 --data DATA
    # fixed weights, no search
    python ensemble.py --runs runs --models facenet clip --fusion-weights 0.7 0.3
    # replace runs/ensemble although a run it used is now missing or incomplete
    python ensemble.py --runs runs --allow-missing

Stages: load and check the runs, join them by query/gallery name -> per fusion,
search the weights on the validation matrices (simplex grid up to 4 models,
Dirichlet search with refinement beyond; every candidate scored on bootstrap
resamples of the validation queries; the best mean, smoothed over
neighbouring weights, wins) -> re-rank
(flags, or chosen on validation with --auto) -> apply the plan to val and test
-> runs/ensemble/{val,test}_sim.npy + meta.json (same contract as a model run),
weights.json (the plan and every scored option), simplex.png (2-3 models).
One model and no re-ranking: its matrices are copied unchanged.
Memory: each member's matrices once (as aligned), the fused results, and row chunks; the
search and the fusion never hold a transformed copy per model (benchmarks/ensemble/bench_ensemble.py --memory).
Members: every complete run under --runs (or --models), never a fused run (an
ensemble output: "fused": true in its meta.json), all of one form (full matrices
or top-k; a mix is refused in one line). --out may not be a member or any
model's run folder. While it writes, the output folder is locked (.run.lock: a
second writer stops with one line naming the holder). meta.json records each
member's folder and the sha256 of its matrix files; loading the ensemble
(submit.py, preflight, visualize) refuses it once a member changed. When a run
that the current ensemble used is now missing or incomplete, the ensemble is not
replaced (one line naming the run; --allow-missing replaces it). A re-run clears
the folder's earlier artefacts (simplex.png, visual/, ...); the last line names
the runs left out ("left out: none" when none were).
Validation ground truth comes from the names (train/<identity>/<image>); the
test ground truth (DATA/test/ground_truth.json, rehearsal data only) is only
reported, never used to choose.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from utils import __version__
from utils.atomic import atomic_write_bytes, atomic_write_json
from utils.config import add_config_args, config_from_args, config_to_dict
from utils.data.layout import read_ground_truth
from utils.ensemble.fusion import FUSIONS
from utils.ensemble.members import (
    Members,
    check_not_shrinking,
    check_out,
    clear_artefacts,
    left_out_line,
    recorded_data,
    select_members,
)
from utils.ensemble.plan import Plan, Scorer, choose_plan, val_identities, val_relevance
from utils.ensemble.report import options_markdown, options_table, plot_simplex
from utils.ensemble.rerank import RerankParams, check_steps
from utils.ensemble.topk_plan import fuse_topk_runs
from utils.ensemble.weight_search import GRID_MAX_MODELS, grid_size
from utils.errors import KitError, run_cli
from utils.logs import console, setup_logging
from utils.runs.data_fingerprint import agreeing, fused_fingerprint
from utils.runs.metrics import evaluate, relevance_matrix
from utils.runs.model_run import git_commit, metrics_table
from utils.runs.provenance import member_record, read_json
from utils.runs.run_lock import run_lock
from utils.runs.similarity_io import Run, SimMatrix, align_runs, invalidate_run, load_run, remove_run_temps, save_run, scan_runs

log = logging.getLogger("ensemble")


# ----------------------------------------------------------------------------
# defaults: every field is a --flag (kebab-case); the resolved config goes to meta.json
@dataclass
class Config:
    runs: Path = field(default=Path("runs"), metadata={"help": "folder of model runs (runs/<model>/)", "metavar": "DIR"})
    models: list[str] = field(default_factory=list, metadata={"help": "run folders to fuse (default: every complete run under --runs)", "metavar": "NAME"})
    out: Path | None = field(default=None, metadata={"help": "output folder (default: <runs>/ensemble)", "metavar": "DIR"})
    data: Path | None = field(default=None, metadata={"help": "data folder; with test/ground_truth.json, test scores are printed too (default: the folder the runs' meta.json records)", "metavar": "DIR"})
    # fusion: zscore suits cosine-like scores; rank/rrf ignore score scales entirely
    fusion: str = field(default="zscore", metadata={"help": "per-query normalisation before the weighted sum", "choices": FUSIONS})
    fusion_weights: list[float] = field(default_factory=list, metadata={"help": "fixed fusion weights, one per --models entry (default: searched)", "metavar": "W"})
    # weight search
    grid_step: float = field(default=0.05, metadata={"help": "simplex grid step (up to 4 models)"})
    n_random: int = field(default=2000, metadata={"help": "Dirichlet candidates for 5+ models (a quarter more per refinement round)"})
    top_m: int = field(default=50, metadata={"help": "columns per model and query the fast scorer keeps (exact either way)"})
    smooth_radius: float = field(default=0.2, metadata={"help": "average each candidate's val score over weights within this L1 distance (0: off)"})
    bootstrap: int = field(default=200, metadata={"help": "bootstrap resamples of the validation queries"})
    bootstrap_by: str = field(default="query", metadata={
        "help": "resample whole identities (honest when a few identities decide the score) or single queries",
        "choices": ["identity", "query"]})
    search_seed: int = field(default=0, metadata={"help": "seed of the weight search: bootstrap resamples and random candidates"})
    # re-ranking (in this order when several are on); --auto chooses among them on validation
    auto: bool = field(default=False, metadata={"help": "try every fusion and re-ranking, keep the best on validation"})
    min_win: float = field(default=0.75, metadata={"help": "--auto keeps a re-ranking only if it wins this share of bootstrap resamples"})
    dba: bool = field(default=False, metadata={"help": "database-side augmentation"})
    dba_k: int = field(default=2, metadata={"help": "gallery neighbours per gallery image for --dba"})
    dba_alpha: float = field(default=3.0, metadata={"help": "neighbour weight exponent for --dba"})
    qe: bool = field(default=False, metadata={"help": "alpha query expansion"})
    qe_k: int = field(default=2, metadata={"help": "best gallery images per query for --qe"})
    qe_alpha: float = field(default=3.0, metadata={"help": "weight exponent for --qe"})
    k_reciprocal: bool = field(default=False, metadata={"help": "k-reciprocal re-ranking (Zhong et al. 2017)"})
    kr_k1: int = field(default=20, metadata={"help": "k-reciprocal neighbourhood size"})
    kr_k2: int = field(default=6, metadata={"help": "k-reciprocal local expansion size"})
    kr_lambda: float = field(default=0.3, metadata={"help": "weight of the original distance in k-reciprocal"})
    dual_softmax: bool = field(default=False, metadata={"help": "dual-softmax normalisation (over gallery and over queries)"})
    sinkhorn: bool = field(default=False, metadata={"help": "Sinkhorn normalisation (rows and columns)"})
    temperature: float = field(default=1.0, metadata={"help": "temperature of --dual-softmax/--sinkhorn on row z-scores"})
    sinkhorn_iters: int = field(default=20, metadata={"help": "Sinkhorn iterations"})
    plot: bool = field(default=True, metadata={"help": "write simplex.png (2 or 3 models)"})
    allow_missing: bool = field(default=False, metadata={
        "help": "replace the ensemble in --out even though a run it used is now missing or incomplete"})
    verbose: bool = field(default=False, metadata={"help": "debug logging"})
# ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, Config)
    return parser


def find_runs(runs_dir: Path, models: list[str], out_dir: Path) -> tuple[list[Run], list[tuple[Path, str]]]:
    """The named runs (each must be complete), or every complete run under ``runs_dir`` except the output.

    Without ``models``, a run folder that is incomplete, does not match its
    hashes, or whose names differ from the others is left out with a warning
    line; fused runs (ensemble outputs) are never members. Returns the runs and
    the folders left out with why.
    """
    if len(set(models)) != len(models):
        raise KitError(f"--models {models}: a run is named twice")
    runs, left_out = [], []
    for m in models:
        try:
            runs.append(load_run(runs_dir / m))
        except KitError as err:
            raise KitError(f"--models {m}: {err}") from None
    if not models:
        runs, left_out = scan_runs(runs_dir, exclude=(out_dir, runs_dir / "ensemble"))
        for d, why in left_out:
            log.warning("leaving out %s: %s", d, why)
        if not runs:
            raise KitError(f"{runs_dir}: no run folder holds a complete run (meta.json, val_sim.npy, test_sim.npy); run a model script first")
    for r in runs:
        if r.meta.get("full_train"):
            log.warning("%s was trained with --full-train: its validation matrix is optimistic and skews the weights", r.path)
    return runs, left_out


def rerank_params(cfg: Config) -> RerankParams:
    flags = {"dba": cfg.dba, "qe": cfg.qe, "kr": cfg.k_reciprocal, "dual_softmax": cfg.dual_softmax, "sinkhorn": cfg.sinkhorn}
    return RerankParams(
        steps=check_steps(tuple(k for k, on in flags.items() if on)), dba_k=cfg.dba_k, dba_alpha=cfg.dba_alpha,
        qe_k=cfg.qe_k, qe_alpha=cfg.qe_alpha, kr_k1=cfg.kr_k1, kr_k2=cfg.kr_k2, kr_lambda=cfg.kr_lambda,
        temperature=cfg.temperature, sinkhorn_iters=cfg.sinkhorn_iters,
    )


MAX_GRID_POINTS = 25_000  # weight vectors one search may score (--grid-step 0.02 with 4 models: 23,426; 0.01: 176,851)


def check_config(cfg: Config, n_models: int) -> None:
    """The flags that depend on how many runs are fused (the flags alone: :func:`check_flags`, first)."""
    check_flags(cfg)
    w = cfg.fusion_weights
    if w and len(w) != n_models:
        raise KitError(f"--fusion-weights: {len(w)} values for {n_models} models; give one per --models entry")
    n_grid = grid_size(min(n_models, GRID_MAX_MODELS), cfg.grid_step)
    if n_grid > MAX_GRID_POINTS:
        raise KitError(f"--grid-step {cfg.grid_step:g}: {n_grid:.3g} weight vectors for {min(n_models, GRID_MAX_MODELS)} "
                       f"models, over the {MAX_GRID_POINTS} the search can score; use --grid-step 0.02 or more")


def check_flags(cfg: Config) -> None:
    """Every flag value that is wrong whatever the runs: checked before any folder is touched."""
    w = cfg.fusion_weights
    if w and not (np.isfinite(w).all() and min(w) >= 0 and sum(w) > 0):
        raise KitError(f"--fusion-weights {w}: must be finite, non-negative, with a positive sum")
    if not 0 < cfg.grid_step <= 0.5:
        raise KitError(f"--grid-step {cfg.grid_step}: must be in (0, 0.5]")
    if cfg.bootstrap < 1 or cfg.top_m < 10 or not cfg.temperature > 0 or not np.isfinite(cfg.temperature):
        raise KitError("--bootstrap must be >= 1, --top-m >= 10 and --temperature a finite number > 0")
    check_ranges(cfg)
    rerank_params(cfg)


def check_ranges(cfg: Config) -> None:
    """Counts at least 1 and shares, radii and exponents finite and in range: NaN passed every '< 0' test."""
    counts = {"--n-random": cfg.n_random, "--dba-k": cfg.dba_k, "--qe-k": cfg.qe_k, "--kr-k1": cfg.kr_k1,
              "--kr-k2": cfg.kr_k2, "--sinkhorn-iters": cfg.sinkhorn_iters}
    for flag, value in counts.items():
        if value < 1:
            raise KitError(f"{flag} {value}: at least 1")
    ranges = {"--min-win": (cfg.min_win, 0.0, 1.0), "--kr-lambda": (cfg.kr_lambda, 0.0, 1.0),
              "--smooth-radius": (cfg.smooth_radius, 0.0, 2.0), "--dba-alpha": (cfg.dba_alpha, 0.0, math.inf),
              "--qe-alpha": (cfg.qe_alpha, 0.0, math.inf)}
    for flag, (value, low, high) in ranges.items():
        if not (math.isfinite(value) and low <= value <= high):
            span = f">= {low:g}" if high == math.inf else f"from {low:g} to {high:g}"
            raise KitError(f"{flag} {value}: must be a finite number {span}")


def load_test_relevance(data: Path | None, test: SimMatrix) -> np.ndarray | None:
    if data is None:
        return None
    path = data / "test" / "ground_truth.json"
    if not path.is_file():
        log.info("%s not found: test scores are not printed", path)
        return None
    return relevance_matrix(test.query_names, test.gallery_names, read_ground_truth(path))


def main(argv: Sequence[str] | None = None) -> int:
    cfg = config_from_args(Config, build_parser().parse_args(argv))
    setup_logging(cfg.verbose)
    t0 = time.time()
    check_flags(cfg)  # before the output folder and its lock exist
    out_dir = cfg.out or cfg.runs / "ensemble"
    members = select_members(cfg.runs, cfg.models, out_dir)
    check_out(out_dir, cfg.runs)
    try:
        left_out = fuse_into(cfg, out_dir, members, t0)
    except KitError:  # already one line naming the file (utils.atomic's FileSystemError is also an OSError)
        raise
    except OSError as err:  # read-only folder, no space, file too large: one line naming the path
        path = err.filename or out_dir
        raise KitError(f"{path}: {err.strerror or err}; the ensemble was not written (make the folder writable, free space "
                       f"or raise the file-size limit, or choose another --out)") from None
    console.print(left_out_line(left_out), soft_wrap=True, markup=False, highlight=False)  # one line, never wrapped
    return 0


def fuse_into(cfg: Config, out_dir: Path, members: Members, t0: float) -> list[tuple[Path, str]]:
    """Fuse the members into ``out_dir`` under its lock; returns the run folders left out with why."""
    with run_lock(out_dir):  # one writer of the output folder at a time
        if members.form == "topk":
            kept, odd = agreeing([(d, read_json(d / "meta.json") or {}) for d in members.dirs], bool(cfg.models))
            members.dirs, left_out = [d for d in members.dirs if d in kept], sorted(members.left_out + odd)
            if rerank_params(cfg).steps:
                raise KitError("re-ranking needs full matrices; the runs are in the top-k form (drop the re-ranking flags)")
            check_config(cfg, len(members.dirs))
            begin_output(cfg, out_dir, [d.name for d in members.dirs], left_out)
            ensemble_topk_form(cfg, out_dir, members.dirs, t0)
        elif members.form == "matrix":
            runs, left_out = find_runs(cfg.runs, cfg.models, out_dir)
            kept, odd = agreeing([(r.path, r.meta) for r in runs], bool(cfg.models))  # same images, not only names
            runs, left_out = [r for r in runs if r.path in kept], sorted(left_out + odd)
            check_config(cfg, len(runs))
            begin_output(cfg, out_dir, [r.path.name for r in runs], left_out)
            ensemble_matrix_form(cfg, out_dir, runs, t0)
        else:
            raise KitError(f"{cfg.runs}: unknown run form {members.form!r}")
    return left_out


def begin_output(cfg: Config, out_dir: Path, names: list[str], left_out: list[tuple[Path, str]]) -> None:
    """Refuse to shrink the current ensemble (unless --allow-missing), then clear the output folder for this run."""
    if not cfg.models and not cfg.allow_missing:
        check_not_shrinking(out_dir, names, left_out, cfg.runs)
    invalidate_run(out_dir, clean_parent=False)  # a failed re-run must not leave the old ensemble looking current
    remove_run_temps(out_dir, cfg.runs)  # temp files of killed writers in the output folder and the runs folder
    clear_artefacts(out_dir)


def ensemble_matrix_form(cfg: Config, out_dir: Path, runs: list[Run], t0: float) -> None:
    """Members with full matrices: search, re-rank, write the fused run."""
    names = [r.path.name for r in runs]
    params = rerank_params(cfg)
    val, test = align_runs(runs, "val"), align_runs(runs, "test")
    for r in runs:  # align_runs copied the other members' matrices: let the loaded ones go
        r.splits.clear()
    val_rel = val_relevance(val[0].query_names, val[0].gallery_names)
    test_rel = load_test_relevance(cfg.data or recorded_data([r.meta for r in runs]), test[0])
    if cfg.bootstrap_by == "identity":
        groups = val_identities(val[0].query_names)
    elif cfg.bootstrap_by == "query":
        groups = None
    else:
        raise KitError(f"--bootstrap-by {cfg.bootstrap_by!r}: choose identity or query")
    scorer = Scorer(val_rel, test_rel, n_boot=cfg.bootstrap, seed=cfg.search_seed, groups=groups)
    log.info("fusing %d run(s): %s; val %d x %d, test %d x %d", len(runs), ", ".join(names), *val[0].sim.shape, *test[0].sim.shape)

    passthrough = len(runs) == 1 and not params.steps and not cfg.auto
    plan, rows, searches = choose_plan(
        names, [m.sim for m in val], [m.sim for m in test], scorer,
        fusions=FUSIONS if cfg.auto else (cfg.fusion,), weights=cfg.fusion_weights or None, rerank_params=params,
        auto=cfg.auto, min_win=cfg.min_win,
        search={"grid_step": cfg.grid_step, "n_random": cfg.n_random, "top_m": cfg.top_m, "smooth_radius": cfg.smooth_radius},
    )
    if passthrough:
        sims = {"val": val[0].sim, "test": test[0].sim}
    else:
        sims = {"val": plan.apply([m.sim for m in val]), "test": plan.apply([m.sim for m in test])}
    write_outputs(cfg, out_dir, runs, names, plan, rows, searches, sims, val[0], test[0], val_rel, test_rel, passthrough, time.time() - t0)


def ensemble_topk_form(cfg: Config, out_dir: Path, dirs: list[Path], t0: float) -> None:
    """Members in the top-k run form (large galleries): weights searched on the candidate unions, no re-ranking."""
    search = {"grid_step": cfg.grid_step, "n_random": cfg.n_random, "top_m": cfg.top_m, "smooth_radius": cfg.smooth_radius,
              "bootstrap": cfg.bootstrap, "seed": cfg.search_seed}
    meta = {"model": "ensemble", "config": config_to_dict(cfg), "commit": git_commit(Path(__file__).resolve().parent), "kit_version": __version__,
            **fused_fingerprint([read_json(d / "meta.json") or {} for d in dirs])}
    choice = fuse_topk_runs(dirs, out_dir, FUSIONS if cfg.auto else (cfg.fusion,), cfg.fusion_weights or None, search, meta)
    atomic_write_json(out_dir / "weights.json", choice)
    console.print(f"ensemble (top-k form, {choice['fusion']}): {dict(zip(choice['members'], choice['weights']))} -> {out_dir} "
                  f"in {time.time() - t0:.1f} s")


def write_outputs(cfg, out_dir, runs, names, plan: Plan, rows, searches, sims, val, test, val_rel, test_rel, passthrough, seconds) -> None:
    """The run folder (save_run contract), weights.json, simplex.png; tables on the console."""
    metrics = {"val": evaluate(sims["val"], val_rel)}
    if test_rel is not None:
        metrics["test"] = evaluate(sims["test"], test_rel)
    chosen = next(r for r in rows if r.chosen)
    record = {
        "models": names, "weights": plan.weights, "fusion": plan.fusion, "rerank": plan.to_dict()["rerank"],
        "rerank_label": plan.rerank.label(), "passthrough": passthrough, "auto": cfg.auto,
        "val_bootstrap_mean": chosen.val_mean, "val_bootstrap_std": chosen.val_std, "options": [r.to_dict() for r in rows],
    }
    meta = {
        "model": "ensemble", "config": config_to_dict(cfg), "commit": git_commit(Path(__file__).resolve().parent),
        "kit_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "fused": True, "members": [member_record(out_dir, r.path, r.meta) for r in runs], **fused_fingerprint([r.meta for r in runs]),
        "plan": plan.to_dict(), "choice": record, "timings_s": {"total": round(seconds, 2)}, "metrics": metrics,
    }
    save_run(out_dir, {"val": SimMatrix(sims["val"], val.query_names, val.gallery_names),
                       "test": SimMatrix(sims["test"], test.query_names, test.gallery_names)}, meta)
    atomic_write_json(out_dir / "weights.json", record)
    atomic_write_bytes(out_dir / "report.md", options_markdown(rows, names).encode())
    console.print(options_table(f"ensemble options (validation: bootstrap mean ± std over {cfg.bootstrap} resamples of {'queries' if cfg.bootstrap_by == 'query' else 'identities'})", rows, names))
    if cfg.plot and plan.fusion in searches:
        png = plot_simplex(searches[plan.fusion], names, out_dir / "simplex.png", f"{plan.fusion}: validation score over the weights")
        if png:
            log.info("wrote %s", png)
    console.print(metrics_table(f"ensemble ({plan.fusion}, {plan.rerank.label()}) -> {out_dir}", metrics))


if __name__ == "__main__":
    run_cli(main)
