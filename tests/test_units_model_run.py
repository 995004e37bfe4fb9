"""utils/runs/model_run.py on the generated dataset: a run begun, written in both forms and scored
as the metrics module scores it, the provenance it records, and the top-k form's metrics by hand."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.paths import ROOT
from utils.data.split import SplitParams
from utils.errors import KitError
from utils.runs.metrics import competition_score, relevance_matrix, topk_scores
from utils.runs.model_run import RunForm, begin_inference_run, git_commit, topk_metrics, write_embedding_run, write_model_run
from utils.runs.run_lock import LOCK_NAME
from utils.runs.similarity_io import load_run
from utils.runs.topk_run import PAD, TopkSplit, is_topk_run, load_topk_split


@dataclass
class Cfg:
    """The fields begin_inference_run reads from a script's config."""

    data: Path
    runs: Path
    run_name: str = "model"
    device: str = "cpu"
    seed: int = 0
    deterministic: bool = False
    dist_timeout_min: float = 60.0

    def split_params(self) -> SplitParams:
        return SplitParams(seed=0, val_fraction=0.25)


def embeddings(task, seed: int = 0) -> dict[str, np.ndarray]:
    """Unit embeddings: validation ones near their identity's centre (so validation scores well), test ones at random."""
    rng = np.random.default_rng(seed)
    emb = {}
    for which in ("val_query", "val_gallery"):
        idents = [name.split("/")[1] for name in task.names(which)]
        centres = {i: np.random.default_rng(n).standard_normal(16) for n, i in enumerate(sorted(set(idents)))}
        emb[which] = np.stack([centres[i] + 0.1 * rng.standard_normal(16) for i in idents]).astype(np.float32)
    for which in ("test_query", "test_gallery"):
        emb[which] = rng.standard_normal((len(task.names(which)), 16)).astype(np.float32)
    return {k: v / np.linalg.norm(v, axis=1, keepdims=True) for k, v in emb.items()}  # unit rows, as the embed step gives


def test_git_commit_names_the_checkout_or_says_unknown(tmp_path):
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert git_commit(ROOT).removesuffix("+dirty") == head
    assert git_commit(tmp_path) == "unknown"  # not a git checkout


def test_git_commit_is_dirty_only_outside_the_ignored_folders(tmp_path):
    repo = tmp_path / "repo"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    (repo / "code.py").write_text("x = 1\n")
    (repo / "benchmarks" / "results" / "bench.md").write_text("- Commit: abc\n")
    git = lambda *a: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=repo, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "one")
    head = git("rev-parse", "--short", "HEAD").stdout.decode().strip()
    ignore = ("benchmarks/results",)
    assert git_commit(repo) == git_commit(repo, ignore) == head
    (repo / "benchmarks" / "results" / "bench.md").write_text("- Commit: def\n")  # a benchmark rewrote its results file
    assert git_commit(repo) == f"{head}+dirty" and git_commit(repo, ignore) == head
    assert git_commit(repo / "benchmarks", ignore) == head  # the folders are the checkout's, wherever it is asked from
    (repo / "code.py").write_text("x = 2\n")  # the code measured changed
    assert git_commit(repo, ignore) == f"{head}+dirty"


def test_begin_inference_run_claims_the_folder_and_reads_the_task(rehearsal_data_session, tmp_path):
    cfg = Cfg(rehearsal_data_session, tmp_path / "runs")
    start = begin_inference_run(cfg)
    task = start.task
    assert start.run_dir == tmp_path / "runs" / "model" and start.device.type == "cpu" and set(start.timings) == {"prepare"}
    assert (start.run_dir / LOCK_NAME).is_file()  # the folder is this process's until the run is written
    assert len(task.names("test_query")) == 16 and all(n.startswith("train/") for n in task.names("val_query"))
    assert json.loads((tmp_path / "runs" / "split.json").read_text())  # the shared split, written once
    assert begin_inference_run(cfg, run_name="other").run_dir == tmp_path / "runs" / "other"


def test_write_model_run_scores_saves_and_releases_the_folder(rehearsal_data_session, tmp_path):
    start = begin_inference_run(Cfg(rehearsal_data_session, tmp_path / "runs"))
    task = start.task
    sims, rels = {}, {}
    rng = np.random.default_rng(0)
    for split in ("val", "test"):
        rel = relevance_matrix(task.names(f"{split}_query"), task.names(f"{split}_gallery"), task.relevant(split))
        sims[split], rels[split] = (rel + 0.1 * rng.random(rel.shape)).astype(np.float32), rel
    sims["test"][0] = rng.random(sims["test"].shape[1])  # one test query ranked at random
    metrics = write_model_run(start.run_dir, "model", {"lr": 0.1}, task, sims, {"prepare": 1.234}, extra={"note": "x"})
    assert metrics["val"]["score"] == 1000.0
    want = topk_scores(sims["test"], rels["test"])
    assert {k: metrics["test"][k] for k in want} == pytest.approx(want) and metrics["test"]["score"] < 1000.0
    run = load_run(start.run_dir)
    assert np.array_equal(run.splits["test"].sim, sims["test"]) and run.splits["val"].query_names == task.names("val_query")
    meta = run.meta
    assert meta["model"] == "model" and meta["config"] == {"lr": 0.1} and meta["note"] == "x" and meta["timings_s"] == {"prepare": 1.23}
    assert meta["commit"] == git_commit(ROOT) and meta["split"] == {"seed": 0, "val_fraction": 0.25} and meta["full_train"] is False
    assert meta["metrics"]["test"]["score"] == pytest.approx(metrics["test"]["score"])
    assert not (start.run_dir / LOCK_NAME).exists()  # released: the next writer may begin


def test_both_forms_of_an_embedding_run_score_the_same(rehearsal_data_session, tmp_path):
    start = begin_inference_run(Cfg(rehearsal_data_session, tmp_path / "runs"))
    emb = embeddings(start.task)
    full = write_embedding_run(start.run_dir, "emb", {}, start.task, emb, {})
    assert not is_topk_run(start.run_dir) and full["val"]["score"] > 900  # identity signal in validation
    other = begin_inference_run(Cfg(rehearsal_data_session, tmp_path / "runs"), run_name="emb_topk")
    topk = write_embedding_run(other.run_dir, "emb", {}, other.task, emb, {}, form=RunForm(max_cells=1, k=12))
    assert is_topk_run(other.run_dir) and load_topk_split(other.run_dir, "test").k == 12
    for split in ("val", "test"):
        for key in ("score", "top1", "top5", "top10"):
            assert topk[split][key] == pytest.approx(full[split][key]), (split, key)
        assert math.isnan(topk[split]["map_all"]) and not math.isnan(full[split]["map_all"])
    assert not (other.run_dir / LOCK_NAME).exists()


def test_topk_metrics_count_the_first_right_answer_in_the_first_ten():
    gallery = [f"g{j}" for j in range(12)]
    idx = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],  # right answer g0 at rank 1
                    [1, 2, 3, 0, 4, 5, 6, 7, 8, 9, 10, 11],  # g0 at rank 4: top-5
                    [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 10, 11],  # g0 at rank 10: top-10
                    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 11],  # g0 at rank 11: a miss
                    [PAD, PAD, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])  # empty slots are skipped but keep their rank
    split = TopkSplit(idx, np.zeros(idx.shape, np.float32), [f"q{i}" for i in range(5)], gallery)
    m = topk_metrics(split, {f"q{i}": ["g0"] for i in range(5)})
    assert (m["top1"], m["top5"], m["top10"]) == (0.2, 0.6, 0.8)
    assert m["score"] == pytest.approx(competition_score(0.2, 0.6, 0.8))
    assert all(math.isnan(m[k]) for k in ("map_all", "p@1", "p@5", "p@10"))


def test_a_run_folder_another_process_holds_is_refused(rehearsal_data_session, tmp_path):
    cfg = Cfg(rehearsal_data_session, tmp_path / "runs")
    held = subprocess.Popen([sys.executable, "-c", "import sys, pathlib\nfrom utils.runs.similarity_io import invalidate_run\n"
                             "invalidate_run(pathlib.Path(sys.argv[1]))\nprint('held', flush=True)\nsys.stdin.readline()",
                             str(cfg.runs / "model")], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout.readline().strip() == "held"
        with pytest.raises(KitError, match=f"in use by pid {held.pid}"):
            begin_inference_run(cfg)
    finally:
        held.communicate("go\n", timeout=120)
