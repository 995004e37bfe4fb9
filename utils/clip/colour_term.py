"""The colour term of zero-shot retrieval: cosine plus a bonus for images of close colours.

    sim = cosine + alpha * (1 - d / threshold)   where the colour distance d < threshold
    sim = cosine                                  elsewhere

``alpha`` and ``threshold`` are searched on the validation split (a grid of
alphas times thresholds taken as quantiles of the validation distances, since
each distance has its own scale), scored by the competition score, ties
broken by mAP@All and then by the smaller alpha (the smaller change).

:func:`search_with_checks` says when that choice is blind: when the choice
lands on the edge of its grid (the largest alpha; the smallest or largest
threshold quantile below 1) it widens the grid once (alphas x2 and x4 of the
largest; half the smallest quantile, or halfway from the largest to 1) and
searches again, and it warns when the choice is still on the edge, or when
several options share the top validation score and mAP@All (saturated or tiny
validation: the tie-break chose, not the data).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from utils.errors import KitError
from utils.runs.metrics import average_precision, topk_scores

log = logging.getLogger(__name__)


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


def _edges(best: ColourTerm, alphas: list[float], quantiles: list[float], thr_of_q: dict[float, float]) -> list[str]:
    """Which grid edges ``best`` sits on: 'alpha' (the largest of several), 'low' / 'high' (threshold quantile)."""
    out = []
    if len(set(alphas)) > 1 and best.alpha == max(alphas) and best.alpha > 0:
        out.append("alpha")
    if best.alpha > 0 and len(set(quantiles)) > 1:
        chosen = [q for q in quantiles if thr_of_q.get(q) == best.threshold]
        if chosen and min(chosen) == min(quantiles):
            out.append("low")
        if chosen and max(chosen) == max(quantiles) and max(quantiles) < 1.0:
            out.append("high")
    return out


def _widen(edges: list[str], alphas: list[float], quantiles: list[float]) -> tuple[list[float], list[float]]:
    """The grid extended once past each edge in ``edges``."""
    alphas, quantiles = list(alphas), list(quantiles)
    if "alpha" in edges:
        alphas += [2 * max(alphas), 4 * max(alphas)]
    if "low" in edges:
        quantiles.append(min(quantiles) / 2)
    if "high" in edges:
        quantiles.append((max(quantiles) + 1.0) / 2)
    return alphas, sorted(quantiles)


def search_with_checks(cosine: np.ndarray, dist: np.ndarray, rel: np.ndarray, alphas: list[float],
                       quantiles: list[float]) -> tuple[ColourTerm, list[ColourTerm], list[str]]:
    """:func:`search_colour_term` over alphas x thresholds at ``quantiles`` of ``dist``, widened once when the
    choice is on the grid's edge; returns the best, the table and the warnings (also logged).

    Raises:
        KitError: as :func:`threshold_grid` and :func:`search_colour_term`.
    """
    def search(a: list[float], q: list[float]):
        thresholds = threshold_grid(dist, q)
        finite = dist[np.isfinite(dist)]
        thr_of_q = {qq: float(np.quantile(finite, qq)) for qq in q}
        best, table = search_colour_term(cosine, dist, rel, a, thresholds)
        return best, table, _edges(best, a, q, thr_of_q)

    best, table, edges = search(alphas, quantiles)
    if edges:
        alphas, quantiles = _widen(edges, alphas, quantiles)
        log.info("colour term: the choice lies on the grid's edge (%s); searching once more with alphas %s, "
                 "threshold quantiles %s", ", ".join(edges), [f"{a:g}" for a in alphas], [f"{q:g}" for q in quantiles])
        best, table, edges = search(alphas, quantiles)
    warnings = []
    top = [c for c in table if (round(c.val_score, 6), round(c.val_map, 6)) == (round(best.val_score, 6), round(best.val_map, 6))]
    if len(top) > 1:  # neither the score nor mAP@All tells them apart: the smaller-alpha rule chose
        warnings.append(f"validation cannot separate {len(top)} of {len(table)} colour-term options (all score "
                        f"{best.val_score:.2f}, mAP@All {best.val_map:.4f}); alpha {best.alpha:g}, threshold "
                        f"{best.threshold:.4g} chosen by the tie-break (the smaller alpha), not by the data: "
                        "more validation identities (--val-fraction) let it see")
    if edges:
        warnings.append(f"the colour term's choice (alpha {best.alpha:g}, threshold {best.threshold:.4g}) is on the edge "
                        f"of its grid ({', '.join(edges)}) even after widening it once; widen --alphas / --threshold-quantiles")
    for w in warnings:
        log.warning(w)
    return best, table, warnings
