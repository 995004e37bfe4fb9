"""The top-k run form: files and hashes on disk, lists equal to the matrix form's, fusion over the candidate
union equal to the matrix-form fusion when the candidates are the whole gallery, and submit.py on such a run."""

from __future__ import annotations

import json

import numpy as np
import pytest

import submit
from utils.ensemble.fusion import FUSIONS, fuse, weighted_sum
from utils.ensemble.weight_search import CandidateScorer, points_from_rank
from utils.errors import KitError
from utils.runs.metrics import first_hit_rank
from utils.runs.similarity_io import SimMatrix, save_run
from utils.runs.topk import topk
from utils.runs.topk_run import (
    candidate_matrices,
    ensemble_topk,
    fuse_topk,
    is_topk_run,
    load_topk_split,
    make_topk_split,
    save_topk_run,
    topk_lists,
    use_topk_form,
    write_topk_run,
)
from utils.submission.lists import top_lists


def embeddings(seed: int, n: int, d: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32) * 3  # not unit: the form normalises


def names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:04d}.jpg" for i in range(n)]


def model_split(seed: int, n_q: int = 40, n_g: int = 120, k: int = 30, shared: np.ndarray | None = None) -> object:
    q, g = embeddings(seed, n_q), embeddings(seed + 100, n_g)
    if shared is not None:  # a second model that agrees in part with the first
        q, g = q + shared[0], g + shared[1]
    return make_topk_split(q, g, names("q", n_q), names("g", n_g), k=k)


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_use_topk_form_threshold():
    assert not use_topk_form(20_000, 20_000) and not use_topk_form(1_500, 1_500)
    assert use_topk_form(20_001, 20_000) and use_topk_form(200_000, 200_000)


def test_run_round_trip_and_lists_equal_the_matrix_form(tmp_path):
    q, g = embeddings(0, 30), embeddings(1, 80)
    run = write_topk_run(tmp_path / "big", {"test": (q, g, names("q", 30), names("g", 80))}, {"model": "m"}, k=25)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["form"] == "topk" and meta["topk"] == 25 and is_topk_run(run)
    assert sorted(meta["splits"]["test"]["files"]) == ["test_gallery_emb.npy", "test_query_emb.npy", "test_topk_idx.npy", "test_topk_scores.npy"]
    loaded = load_topk_split(run, "test")
    assert loaded.indices.shape == (30, 25) and loaded.indices.dtype == np.int64 and loaded.scores.dtype == np.float32
    assert np.allclose(np.linalg.norm(loaded.query_emb, axis=1), 1, atol=1e-6)
    # the same embeddings in the matrix form give the same top-10 lists
    sim = loaded.query_emb @ loaded.gallery_emb.T
    save_run(tmp_path / "small", {"test": SimMatrix(sim, names("q", 30), names("g", 80))}, {"model": "m"})
    assert not is_topk_run(tmp_path / "small")
    assert topk_lists(run) == top_lists(SimMatrix(sim, names("q", 30), names("g", 80)))
    assert np.allclose(loaded.scores, np.take_along_axis(sim, loaded.indices, axis=1), atol=1e-6)


def test_a_changed_file_or_a_matrix_run_is_refused(tmp_path):
    run = write_topk_run(tmp_path / "r", {"test": (embeddings(0, 12), embeddings(1, 20), names("q", 12), names("g", 20))}, {}, k=10)
    np.save(run / "test_topk_idx.npy", np.zeros((12, 10), np.int64))
    with pytest.raises(KitError, match="test_topk_idx.npy: does not match the hash in meta.json"):
        load_topk_split(run, "test")
    m = SimMatrix(np.zeros((2, 3), np.float32), ["a", "b"], ["x", "y", "z"])
    save_run(tmp_path / "matrix", {"test": m}, {})
    with pytest.raises(KitError, match="not a top-k run"):
        load_topk_split(tmp_path / "matrix", "test")
    with pytest.raises(KitError, match="kept 10 candidates per query; a top-11"):
        topk_lists(write_topk_run(tmp_path / "r2", {"test": (embeddings(0, 3), embeddings(1, 20), names("q", 3), names("g", 20))}, {}, k=10), k=11)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_fusion_over_the_whole_gallery_equals_the_matrix_fusion(fusion):
    """With K = gallery size the candidate union is every image: the kit's matrix-form fusion must come out."""
    a = model_split(0, k=120)
    b = model_split(1, k=120, shared=(embeddings(0, 40), embeddings(100, 120)))
    w = [0.7, 0.3]
    scores, idx = fuse_topk([a, b], w, fusion, k=10)
    full = fuse([a.query_emb @ a.gallery_emb.T, b.query_emb @ b.gallery_emb.T], np.array(w), fusion)
    ref = topk(full, 10)
    assert np.allclose(scores, np.take_along_axis(full, ref, axis=1), atol=1e-4)
    assert (idx == ref).mean() > 0.99  # float32 sums in another order may swap near-ties only


def brute_force_fusion(runs, w, k):
    """Per query, in float64: union of the top-K lists, z-score over it per model, weighted sum, best k."""
    out = []
    for i in range(len(runs[0].query_names)):
        cand = sorted(set().union(*[r.indices[i].tolist() for r in runs]))
        total = np.zeros(len(cand))
        for wm, r in zip(w, runs):
            s = r.gallery_emb[cand].astype(np.float64) @ r.query_emb[i].astype(np.float64)
            total += wm * (s - s.mean()) / s.std()
        out.append([cand[j] for j in np.argsort(-total, kind="stable")[:k]])
    return np.array(out)


def test_fusion_scores_the_union_of_candidates_exactly_and_in_bounded_chunks():
    a = model_split(0, k=15)
    b = model_split(1, k=15, shared=(embeddings(0, 40), embeddings(100, 120)))
    _, idx = fuse_topk([a, b], [0.6, 0.4], "zscore", k=10)
    ref = brute_force_fusion([a, b], [0.6, 0.4], 10)
    assert (idx == ref).mean() > 0.99
    outside_a = ~np.isin(idx, a.indices).all(axis=1)  # some results come only from b's candidates
    assert outside_a.any()
    _, small = fuse_topk([a, b], [0.6, 0.4], "zscore", k=10, memory_budget_bytes=20_000)  # a few queries per chunk
    assert np.array_equal(small, idx)
    _, alone = fuse_topk([a], [1.0], "zscore", k=10)
    assert np.array_equal(alone, a.indices[:, :10])  # one model: its own order


def test_fusion_joins_runs_by_name_not_by_row_order():
    a = model_split(0, k=20)
    b = model_split(1, k=20)
    qp, gp = np.random.default_rng(5).permutation(40), np.random.default_rng(6).permutation(120)
    shuffled = make_topk_split(b.query_emb[qp], b.gallery_emb[gp], [b.query_names[i] for i in qp],
                               [b.gallery_names[j] for j in gp], k=20)
    s1, i1 = fuse_topk([a, b], [0.5, 0.5], "zscore", k=10)
    s2, i2 = fuse_topk([a, shuffled], [0.5, 0.5], "zscore", k=10)
    assert np.array_equal(i1, i2) and np.allclose(s1, s2, atol=1e-5)
    other = make_topk_split(b.query_emb, b.gallery_emb, names("x", 40), b.gallery_names, k=20)
    with pytest.raises(KitError, match="names differ"):
        fuse_topk([a, other], [0.5, 0.5])
    with pytest.raises(KitError, match="need 2 non-negative numbers"):
        fuse_topk([a, b], [1.0, -1.0])
    with pytest.raises(KitError, match="--fusion 'mean': unknown"):
        fuse_topk([a, b], [0.5, 0.5], "mean")


def test_candidate_matrices_give_the_weight_search_the_same_first_hits():
    """The lead's ensemble.py can search weights on candidate_matrices with the kit's CandidateScorer."""
    a = model_split(0, k=15)
    b = model_split(1, k=15, shared=(embeddings(0, 40), embeddings(100, 120)))
    # one right answer per query (CandidateScorer's kept width is cut short when rows hold different numbers
    # of right answers: reported to the lead); some right answers are outside every top-K: misses for both
    q_ids = np.arange(40) * 3
    g_ids = np.arange(120)
    cm = candidate_matrices([a, b], "zscore")
    rel = cm.relevance(q_ids, g_ids)
    weights = np.array([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]], np.float32)
    fast = CandidateScorer(cm.mats, rel, top_m=10).points(weights)
    for w, pts in zip(weights, fast):
        _, idx = fuse_topk([a, b], w, "zscore", k=10)
        hits = g_ids[idx] == q_ids[:, None]
        first = np.where(hits.any(axis=1), hits.argmax(axis=1), 10)
        assert np.array_equal(points_from_rank(first), pts)
        assert np.array_equal(first_hit_rank(weighted_sum(cm.mats, w), rel, 10), first)


def test_ensemble_topk_run_goes_through_submit(tmp_path):
    n_q, n_g = 30, 60
    runs = []
    for i, seed in enumerate((0, 1)):
        q, g = embeddings(seed, n_q), embeddings(seed + 10, n_g)
        parts = {s: (q, g, names("q", n_q), names("g", n_g)) for s in ("val", "test")}
        runs.append(write_topk_run(tmp_path / f"m{i}", parts, {"model": f"m{i}"}, k=20))
    out = ensemble_topk(runs, [0.5, 0.5], "zscore", tmp_path / "ensemble")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["fused"] and meta["form"] == "topk" and "test_query_emb.npy" not in meta["splits"]["test"]["files"]
    fused = load_topk_split(out, "test")
    _, ref = fuse_topk([load_topk_split(r, "test") for r in runs], [0.5, 0.5], "zscore", k=20)
    assert np.array_equal(fused.indices, ref)
    with pytest.raises(KitError, match="no embeddings"):
        fuse_topk([fused, fused], [0.5, 0.5])
    # submit.py takes the top-k form: the body's lists are the run's first 10 candidates
    code = submit.main(["--run", str(out), "--group", "team", "--out", str(tmp_path / "subs"), "--dry-run"])
    assert code == 0
    body = json.loads(next((tmp_path / "subs").glob("*Z.json")).read_text())
    assert body["images"] == topk_lists(fused) and len(body["images"]) == n_q
    assert body["images"]["q0000.jpg"] == [f"g{j:04d}.jpg" for j in ref[0, :10]]


def test_save_topk_run_writes_meta_last(tmp_path, monkeypatch):
    """A crash while writing the arrays leaves no meta.json: the folder is not mistaken for a run."""
    split = model_split(0, k=10)
    import utils.runs.topk_run as tr

    calls = []

    def failing(path, data):
        calls.append(path.name)
        if len(calls) == 3:
            raise OSError("disk full")
        return original(path, data)

    original = tr.atomic_write_bytes
    monkeypatch.setattr(tr, "atomic_write_bytes", failing)
    with pytest.raises(OSError):
        save_topk_run(tmp_path / "r", {"test": split}, {})
    assert not (tmp_path / "r" / "meta.json").exists() and not is_topk_run(tmp_path / "r")
