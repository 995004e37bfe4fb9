"""The colour term of zero-shot retrieval: cosine plus a bonus for images of close colours.

    sim = cosine + alpha * (1 - d / threshold)   where the colour distance d < threshold
    sim = cosine                                  elsewhere

``alpha`` and ``threshold`` are searched on the validation split (a grid of
alphas times thresholds taken as quantiles of the validation distances, since
each distance has its own scale), scored by the competition score, ties
broken by mAP@All and then by the smaller alpha (the smaller change).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from utils.errors import KitError
from utils.runs.metrics import average_precision, topk_scores


@dataclass(frozen=True)
class ColourTerm:
    """A chosen bonus and the validation score it gave."""

    alpha: float
    threshold: float
    val_score: float = float("nan")
    val_map: float = float("nan")


def apply_colour_term(cosine: np.ndarray, dist: np.ndarray, alpha: float, threshold: float) -> np.ndarray:
    """``cosine + alpha * (1 - d / threshold)`` where ``d < threshold``; float32."""
    if threshold <= 0:
        return cosine.astype(np.float32)
    bonus = np.where(dist < threshold, 1.0 - dist / threshold, 0.0)
    return (cosine + alpha * bonus).astype(np.float32)


def threshold_grid(dist: np.ndarray, quantiles: list[float]) -> list[float]:
    """Thresholds at the given quantiles of the finite distances (distinct, positive)."""
    finite = dist[np.isfinite(dist)]
    if finite.size == 0:
        raise KitError("no finite colour distance on validation; check --colour-top-m")
    for q in quantiles:
        if not 0.0 < q <= 1.0:
            raise KitError(f"--threshold-quantiles {q}: each in (0, 1]")
    values = np.quantile(finite, quantiles)
    return sorted({float(v) for v in values if v > 0})


def search_colour_term(cosine: np.ndarray, dist: np.ndarray, rel: np.ndarray, alphas: list[float], thresholds: list[float]) -> tuple[ColourTerm, list[ColourTerm]]:
    """Every (alpha, threshold) scored on validation; the best and the whole table.

    Raises:
        KitError: a negative alpha or an empty grid.
    """
    if not alphas or not thresholds:
        raise KitError("--alphas and the thresholds need at least one value each")
    if any(a < 0 for a in alphas):
        raise KitError(f"--alphas {alphas}: each 0 or more")
    table = []
    for a in sorted(set(alphas)):
        for t in thresholds:
            sim = apply_colour_term(cosine, dist, a, t)
            ap = average_precision(sim, rel)
            m = float(np.nanmean(ap)) if np.isfinite(ap).any() else 0.0
            table.append(ColourTerm(a, t, topk_scores(sim, rel)["score"], m))
            if a == 0:
                break  # alpha 0 is the same for every threshold
    best = max(table, key=lambda c: (round(c.val_score, 6), round(c.val_map, 6), -c.alpha))
    return best, table
