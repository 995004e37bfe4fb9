"""Score, Top-k, mAP and P@k against hand-computed cases; top-k against a full sort."""

from __future__ import annotations

import numpy as np
import pytest

from utils.runs.metrics import average_precision, competition_score, evaluate, precision_at_k, relevance_matrix, topk_scores
from utils.runs.topk import topk


def test_competition_score_weights():
    assert competition_score(1, 1, 1) == 1000
    assert competition_score(0.5, 0.8, 0.9) == pytest.approx(300 + 240 + 90)


def test_topk_scores_hand_case():
    # 4 queries, 12 gallery; relevant = column q; place it at rank 0, 3, 7 and nowhere.
    n_g = 12
    sim = np.tile(-np.arange(n_g, dtype=np.float32), (4, 1))  # column j has rank j
    rel = np.zeros((4, n_g), bool)
    rel[0, 0], rel[1, 3], rel[2, 7], rel[3, 11] = True, True, True, True
    out = topk_scores(sim, rel)
    assert out["top1"] == 0.25 and out["top5"] == 0.5 and out["top10"] == 0.75
    assert out["score"] == pytest.approx(600 * 0.25 + 300 * 0.5 + 100 * 0.75)


def test_average_precision_hand_case():
    sim = np.array([[0.9, 0.8, 0.7, 0.6]])
    rel = np.array([[True, False, True, False]])
    # hits at ranks 1 and 3: (1/1 + 2/3) / 2
    assert average_precision(sim, rel)[0] == pytest.approx((1 + 2 / 3) / 2)
    assert np.isnan(average_precision(sim, np.zeros_like(rel))[0])
    assert precision_at_k(sim, rel, 2) == 0.5


def test_evaluate_ignores_queries_without_answers_in_map_only():
    sim = np.eye(12, dtype=np.float32)[:2]
    rel = np.zeros((2, 12), bool)
    rel[0, 0] = True
    out = evaluate(sim, rel)
    assert out["map_all"] == 1.0 and out["top1"] == 0.5


def test_relevance_matrix_by_name():
    rel = relevance_matrix(["q1", "q2"], ["a", "b", "c"], {"q1": ["c", "zz"], "q2": []})
    assert rel.tolist() == [[False, False, True], [False, False, False]]


@pytest.mark.parametrize("k", [1, 5, 10, 40])
def test_topk_matches_full_sort(k):
    rng = np.random.default_rng(k)
    sim = rng.normal(size=(50, 40)).astype(np.float32)
    ref = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    assert np.array_equal(topk(sim, k, chunk_rows=7), ref)


def test_topk_ties_prefer_lower_index():
    sim = np.zeros((3, 20), np.float32)
    sim[:, 15] = 1.0
    assert topk(sim, 4).tolist() == [[15, 0, 1, 2]] * 3


def test_topk_rejects_k_beyond_gallery():
    with pytest.raises(ValueError, match="gallery size"):
        topk(np.zeros((2, 5)), 10)
