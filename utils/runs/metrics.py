"""Retrieval metrics: Top-k accuracy, the competition score, mAP@All and P@k.

Score (max 1000) = 600 x Top-1 + 300 x Top-5 + 100 x Top-10, where Top-k is the
share of queries with at least one relevant gallery image among their first
k. mAP@All and P@k follow the caption-matching paper: average precision over
the whole ranked gallery, and the share of relevant images in the first k.
Queries without any relevant gallery image count as misses for Top-k and are
left out of mAP (its AP is undefined).
"""

from __future__ import annotations

import numpy as np

from utils.runs.topk import topk

SCORE_WEIGHTS = {1: 600.0, 5: 300.0, 10: 100.0}


def competition_score(top1: float, top5: float, top10: float) -> float:
    """600 x Top-1 + 300 x Top-5 + 100 x Top-10 (accuracies in [0, 1])."""
    return SCORE_WEIGHTS[1] * top1 + SCORE_WEIGHTS[5] * top5 + SCORE_WEIGHTS[10] * top10


def split_relevance(task, split: str) -> np.ndarray | None:
    """``split``'s (query, gallery) relevance matrix from ``task`` (a :class:`~utils.data.task.Task`),
    or None where the split has no ground truth (test outside rehearsals and benchmarks)."""
    relevant = task.relevant(split)
    if relevant is None:
        return None
    return relevance_matrix(task.names(f"{split}_query"), task.names(f"{split}_gallery"), relevant)


def relevance_matrix(
    query_names: list[str], gallery_names: list[str], relevant: dict[str, list[str]]
) -> np.ndarray:
    """Boolean (n_queries, n_gallery): True where the gallery image is a right answer."""
    col = {g: j for j, g in enumerate(gallery_names)}
    rel = np.zeros((len(query_names), len(gallery_names)), dtype=bool)
    for i, q in enumerate(query_names):
        for g in relevant.get(q, []):
            if g in col:
                rel[i, col[g]] = True
    return rel


def first_hit_rank(sim: np.ndarray, rel: np.ndarray, k: int = 10) -> np.ndarray:
    """0-based rank of the first relevant image within the top ``k``; ``k`` if none."""
    idx = topk(sim, min(k, sim.shape[1]))
    hits = np.take_along_axis(rel, idx, axis=1)
    return np.where(hits.any(axis=1), hits.argmax(axis=1), k)


def topk_scores(sim: np.ndarray, rel: np.ndarray) -> dict[str, float]:
    """Top-1/5/10 and the competition score."""
    first = first_hit_rank(sim, rel, 10)
    top = {k: float(np.mean(first < k)) for k in (1, 5, 10)}
    return {
        "top1": top[1],
        "top5": top[5],
        "top10": top[10],
        "score": competition_score(top[1], top[5], top[10]),
    }


def average_precision(sim: np.ndarray, rel: np.ndarray, chunk_rows: int = 1024) -> np.ndarray:
    """AP of each query over the whole ranking; NaN where a query has no relevant image."""
    out = np.full(sim.shape[0], np.nan)
    for start in range(0, sim.shape[0], chunk_rows):
        s, r = sim[start : start + chunk_rows], rel[start : start + chunk_rows]
        order = np.argsort(-s, axis=1, kind="stable")
        hits = np.take_along_axis(r, order, axis=1).astype(np.float64)
        n_rel = hits.sum(axis=1)
        prec = np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start : start + len(s)] = np.where(n_rel > 0, (prec * hits).sum(axis=1) / n_rel, np.nan)
    return out


def precision_at_k(sim: np.ndarray, rel: np.ndarray, k: int) -> float:
    """Mean share of relevant images among each query's first ``k``."""
    idx = topk(sim, min(k, sim.shape[1]))
    return float(np.take_along_axis(rel, idx, axis=1).mean())


def evaluate(sim: np.ndarray, rel: np.ndarray) -> dict[str, float]:
    """Every metric the kit reports, for one similarity matrix."""
    out = topk_scores(sim, rel)
    ap = average_precision(sim, rel)
    out["map_all"] = float(np.nanmean(ap)) if np.isfinite(ap).any() else 0.0
    for k in (1, 5, 10):
        out[f"p@{k}"] = precision_at_k(sim, rel, k)
    return out


def mean_cosine_by_relevance(sim: np.ndarray, rel: np.ndarray) -> dict[str, float]:
    """Mean similarity of correct (relevant) and of incorrect query-gallery pairs, and their gap.

    Tudo Bein's quickest check of a domain gap: a small gap means the model barely tells a right
    match from a wrong one across the domains. NaN for a side with no pair.
    """
    correct = float(sim[rel].mean()) if rel.any() else float("nan")
    incorrect = float(sim[~rel].mean()) if (~rel).any() else float("nan")
    return {"correct": correct, "incorrect": incorrect, "gap": correct - incorrect}
