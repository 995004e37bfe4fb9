"""Search fusion weights on the validation matrices, fast and exactly, and robustly to noise.

Candidates live on the simplex (non-negative weights summing to 1): an
exhaustive grid for up to 4 models, a seeded Dirichlet search with local
refinement around the best beyond that. Single models (the vertices) and the
uniform mix are always among the candidates.

Scoring many candidates is vectorised (:class:`CandidateScorer`). Only columns
near the top of some model can enter a fused Top-10, so each query keeps the
union of every model's top-``top_m`` columns, and all candidates of a batch are
scored on that small set with array operations. The result is exact, not an
approximation: any column outside the set scores at most
``bound = sum_m w_m * (best value model m gives outside its top-m)``, so when
10 kept columns (or the best right answer) beat the bound, the kept set decides
the Top-10. The few (candidate, query) pairs without that certificate are
scored on their full row. Ties rank the lower column first, as in
:func:`utils.runs.topk.topk`, and sums are taken in the order of
:func:`utils.ensemble.fusion.weighted_sum`, so the scores equal a plain loop's
(:func:`loop_first_hit`) bit for bit.

Noise guard: each candidate's per-query points (600/300/100 for a hit in the
Top-1/5/10) are averaged over bootstrap resamples of the validation queries
(mean and spread). A small validation split makes that landscape jagged, and
its highest spike is mostly luck, so the mean is also averaged over the
neighbouring candidates (L1 distance <= ``smooth_radius``; 0 turns this off)
and the candidate with the best smoothed mean wins: the middle of a broad
good region rather than the edge of a spike (full ties: nearest the uniform mix).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np

from utils.ensemble.fusion import weighted_sum
from utils.progress import ProgressBar
from utils.runs.metrics import SCORE_WEIGHTS, average_precision, first_hit_rank

log = logging.getLogger(__name__)

MISS = 10  # first-hit rank that counts as no hit in the Top-10
MAX_MAP_TIES = 64  # candidates tied on score that are ranked again by validation mAP


def points_from_rank(first_hit: np.ndarray) -> np.ndarray:
    """Per-query competition points (0..1000) from 0-based first-hit ranks; mean = score."""
    out = np.zeros(first_hit.shape, dtype=np.float32)
    for k, w in SCORE_WEIGHTS.items():
        out += np.float32(w) * (first_hit < k)
    return out


def simplex_grid(n_models: int, step: float) -> np.ndarray:
    """Every weight vector with entries in multiples of ``step`` that sum to 1, (n, n_models)."""
    parts = round(1.0 / step)
    rows = [c for c in itertools.product(range(parts + 1), repeat=n_models - 1) if sum(c) <= parts]
    grid = np.array([list(c) + [parts - sum(c)] for c in rows], dtype=np.float64) / parts
    return grid.astype(np.float32)


def anchor_candidates(n_models: int) -> np.ndarray:
    """The single models (simplex vertices) and the uniform mix."""
    return np.vstack([np.eye(n_models), np.full((1, n_models), 1.0 / n_models)]).astype(np.float32)


def dirichlet_around(center: np.ndarray, count: int, concentration: float, rng: np.random.Generator) -> np.ndarray:
    """``count`` weight vectors drawn near ``center`` (tighter for a larger ``concentration``)."""
    alpha = concentration * np.asarray(center, dtype=np.float64) + 0.05
    return rng.dirichlet(alpha, size=count).astype(np.float32)


@dataclass
class _Block:
    """Queries whose kept columns are padded to one width (grouped by width to save work)."""

    rows: np.ndarray  # (n,) query indices
    cols: np.ndarray  # (n, width) right answers first, then other kept columns; n_gallery pads
    kept: np.ndarray  # (models, n, width) transformed values (below every real one at pads)
    has_rel: np.ndarray  # (n,)
    bound_parts: np.ndarray | None  # (models, n): best value each model gives outside its top-m


class CandidateScorer:
    """Scores many weight vectors on fixed transformed matrices and a relevance mask.

    Per query it keeps the right answers plus the union of every model's
    top-``top_m`` columns, less any column that can never matter: one that a
    right answer beats in every model, or that 10 kept columns beat in every
    model (it can only enter a ranking where the first hit is already past 10).

    Args:
        mats: per model, the (n_queries, n_gallery) transformed matrix (``utils.ensemble.fusion.transform``).
        rel: (n_queries, n_gallery) bool, True where the gallery image is a right answer.
        top_m: columns kept per model and query; larger means fewer full-row fallbacks.
        batch_elems: bound on the temporary (batch, queries, kept) array size.
        n_blocks: queries are grouped into this many blocks of similar kept width.
    """

    def __init__(self, mats: list[np.ndarray], rel: np.ndarray, top_m: int = 50, batch_elems: int = 4_000_000, n_blocks: int = 4):
        self.mats = [np.ascontiguousarray(m, dtype=np.float32) for m in mats]
        self.rel = np.asarray(rel, dtype=bool)
        n_q, n_g = self.rel.shape
        self.n_models, self.n_queries = len(mats), n_q
        self.batch_elems = batch_elems
        self.fallback_pairs = 0
        stack = np.stack(self.mats)  # (models, q, g)
        top_m = min(top_m, n_g)
        bound_parts = None  # nothing left out: no bound needed
        if top_m >= n_g:
            top = np.broadcast_to(np.arange(n_g), (n_q, n_g))
        else:
            parts = [np.argpartition(-m, top_m, axis=1) for m in self.mats]
            top = np.concatenate([p[:, :top_m] for p in parts], axis=1)
            bound_parts = np.stack([np.take_along_axis(m, p[:, top_m : top_m + 1], axis=1)[:, 0] for m, p in zip(self.mats, parts)])
        # right answers first (ascending column), then the other kept columns; n_g pads
        n_rel = self.rel.sum(axis=1)
        self.width_rel = max(1, int(n_rel.max()))
        rel_cols = np.sort(np.where(self.rel, np.arange(n_g), n_g), axis=1)[:, : self.width_rel]
        other = _distinct(np.where(np.take_along_axis(self.rel, top, axis=1), n_g, top), n_g)
        other = _prune(stack, rel_cols, other, n_g)
        cols = np.concatenate([rel_cols, other], axis=1)
        floor = stack.min(axis=(1, 2)) - np.maximum(1.0, np.abs(stack).max(axis=(1, 2)))  # below anything real
        # the right answers take width_rel slots in every row (padded), so a row's last real column
        # sits at width_rel + its count of other columns, not at its count of real columns
        width = self.width_rel + (other < n_g).sum(axis=1)
        order = np.argsort(width, kind="stable")
        self.blocks = []
        for rows in np.array_split(order, min(n_blocks, n_q)):
            if len(rows) == 0:
                continue
            c = cols[rows, : max(self.width_rel + 1, int(width[rows].max()))]  # never cuts a real column
            safe = np.minimum(c, n_g - 1)
            kept = np.stack([np.where(c < n_g, np.take_along_axis(m[rows], safe, axis=1), f) for m, f in zip(self.mats, floor)])
            self.blocks.append(_Block(rows, c, kept.astype(np.float32), n_rel[rows] > 0, None if bound_parts is None else bound_parts[:, rows]))
        self.kept_elems = sum(b.kept[0].size for b in self.blocks)

    def first_hit(self, weights: np.ndarray, progress: str | None = None) -> np.ndarray:
        """(n_candidates, n_queries) int16 first-hit ranks within the Top-10 (10 = miss)."""
        weights = np.asarray(weights, dtype=np.float32).reshape(-1, self.n_models)
        if (weights < 0).any():
            raise ValueError("weights must be non-negative (the exactness bound needs it)")
        out = np.empty((len(weights), self.n_queries), dtype=np.int16)
        batch = max(1, self.batch_elems // max(1, self.kept_elems))
        with ProgressBar(progress or "weights", total=len(weights)) as bar:
            for start in range(0, len(weights), batch):
                w = weights[start : start + batch]
                for block in self.blocks:
                    out[start : start + len(w), block.rows] = self._block_ranks(block, w)
                bar.advance(len(w))
        # all weights zero: every column ties at 0, so the lower column wins and the pruning's
        # "wins for every weight" margins do not hold; such candidates are ranked on whole rows
        for i in np.flatnonzero(~(weights > 0).any(axis=1)):
            out[i] = self._full_rows(np.repeat(weights[i : i + 1], self.n_queries, axis=0), np.arange(self.n_queries))
        return out

    def points(self, weights: np.ndarray, progress: str | None = None) -> np.ndarray:
        """(n_candidates, n_queries) float32 competition points; the row mean is the score."""
        return points_from_rank(self.first_hit(weights, progress))

    def _block_ranks(self, block: _Block, w: np.ndarray) -> np.ndarray:
        wb = w[:, :, None, None]  # (batch, models, 1, 1)
        fused = wb[:, 0] * block.kept[0]
        for m in range(1, self.n_models):
            fused += wb[:, m] * block.kept[m]
        pos = fused[:, :, : self.width_rel].argmax(axis=2)  # best right answer, lowest column on ties
        best = np.take_along_axis(fused, pos[:, :, None], axis=2)
        beaten = (fused > best).sum(axis=2)
        tie = (fused == best).sum(axis=2) > 1
        if tie.any():  # equal scores: the lower column ranks first
            b_idx, q_idx = np.nonzero(tie)
            c = block.cols[q_idx]
            best_col = c[np.arange(len(q_idx)), pos[b_idx, q_idx]]
            beaten[b_idx, q_idx] += ((fused[b_idx, q_idx] == best[b_idx, q_idx]) & (c < best_col[:, None])).sum(axis=1)
        rank = np.where(block.has_rel, np.minimum(beaten, MISS), MISS)
        if block.bound_parts is None:
            return rank
        bound = w[:, 0, None] * block.bound_parts[0]
        for m in range(1, self.n_models):
            bound = bound + w[:, m, None] * block.bound_parts[m]
        # a column left out scores at most `bound`: exact if the best hit beats it, or 10 kept columns beat the hit
        unsure = block.has_rel & (best[:, :, 0] <= bound) & (rank < MISS)
        if unsure.any():
            b_idx, q_idx = np.nonzero(unsure)
            rank[b_idx, q_idx] = self._full_rows(w[b_idx], block.rows[q_idx])
            self.fallback_pairs += len(b_idx)
        return rank

    def _full_rows(self, w: np.ndarray, q_idx: np.ndarray, chunk: int = 1024) -> np.ndarray:
        """First-hit ranks (capped at 10) of (weights, query) pairs on their whole rows."""
        out = np.empty(len(q_idx), dtype=np.int64)
        cols = np.arange(self.rel.shape[1])
        for s in range(0, len(q_idx), chunk):
            ws, qs = w[s : s + chunk], q_idx[s : s + chunk]
            rows = ws[:, 0, None] * self.mats[0][qs]
            for m in range(1, self.n_models):
                rows += ws[:, m, None] * self.mats[m][qs]
            rel = self.rel[qs]
            rel_vals = np.where(rel, rows, -np.inf)
            pos = rel_vals.argmax(axis=1)
            best = rows[np.arange(len(qs)), pos][:, None]
            beaten = (rows > best).sum(axis=1) + ((rows == best) & (cols < pos[:, None])).sum(axis=1)
            out[s : s + len(qs)] = np.where(rel.any(axis=1), np.minimum(beaten, MISS), MISS)
        return out


def _distinct(cols: np.ndarray, pad: int) -> np.ndarray:
    """Per row, the distinct values of ``cols`` other than ``pad``, ascending, padded to the widest row."""
    cols = np.sort(cols, axis=1)
    dup = np.zeros_like(cols, dtype=bool)
    dup[:, 1:] = cols[:, 1:] == cols[:, :-1]
    cols = np.sort(np.where(dup, pad, cols), axis=1)
    width = max(1, int((cols < pad).sum(axis=1).max()))
    return cols[:, :width]


def _dominates(a: np.ndarray, a_col: np.ndarray, b: np.ndarray, b_col: np.ndarray, margin: np.ndarray) -> np.ndarray:
    """True where a column with values ``a`` outranks one with values ``b`` for every non-negative weight.

    ``a``/``b`` are (models, ...) broadcastable; either every model gives ``a`` a
    margin wider than float rounding, or none gives it less and ``a`` has the
    lower column (which wins ties).
    """
    clear = (a >= b + margin).all(axis=0)
    tie_safe = (a >= b).all(axis=0) & (a_col < b_col)
    return clear | tie_safe


def _prune(stack: np.ndarray, rel_cols: np.ndarray, other: np.ndarray, n_g: int, chunk: int = 64) -> np.ndarray:
    """Drop kept columns that never change a first hit within the Top-10 (see CandidateScorer)."""
    margin = 1e-5 * (np.abs(stack).max() + 1.0)
    keep = other < n_g
    for s in range(0, len(other), chunk):
        rows = np.arange(s, min(s + chunk, len(other)))
        o, r = other[rows], rel_cols[rows]
        ov = np.take_along_axis(stack[:, rows], np.minimum(o, n_g - 1)[None], axis=2)  # (models, rows, kept)
        rv = np.take_along_axis(stack[:, rows], np.minimum(r, n_g - 1)[None], axis=2)
        o_ok, r_ok = o < n_g, r < n_g
        # dominated by a right answer: never beats the best hit
        by_rel = _dominates(rv[:, :, :, None], r[:, :, None], ov[:, :, None, :], o[:, None, :], margin)
        by_rel &= r_ok[:, :, None]
        # dominated by 10 or more kept columns: whenever it beats the best hit, so do 10 others
        by_other = _dominates(ov[:, :, :, None], o[:, :, None], ov[:, :, None, :], o[:, None, :], margin)
        by_other &= o_ok[:, :, None]
        keep[rows] &= ~by_rel.any(axis=1) & (by_other.sum(axis=1) < MISS)
    pruned = np.where(keep, other, n_g)
    return _distinct(pruned, n_g)


def loop_first_hit(mats: list[np.ndarray], rel: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Reference: fuse the full matrices and rank them, one candidate at a time."""
    weights = np.asarray(weights, dtype=np.float32).reshape(-1, len(mats))
    return np.stack([first_hit_rank(weighted_sum(mats, w), rel, MISS) for w in weights]).astype(np.int16)


def bootstrap_counts(n_queries: int, n_boot: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """(n_boot, n_queries) multiplicities of each query in each bootstrap resample.

    With ``groups`` (one group id per query, e.g. its identity), whole groups are
    resampled: queries of one identity rise and fall together, so the spread is
    honest when a few identities decide the score.
    """
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.multinomial(n_queries, np.full(n_queries, 1.0 / n_queries), size=n_boot).astype(np.float32)
    _, index = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(index.max()) + 1
    per_group = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot)
    return per_group[:, index].astype(np.float32)


def bootstrap_stats(points: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over resamples of each row's score, from per-query points."""
    scores = points.reshape(-1, points.shape[-1]) @ counts.T / counts.sum(axis=1)
    return scores.mean(axis=1), scores.std(axis=1)


@dataclass
class SearchResult:
    """The chosen weights and every scored candidate."""

    weights: np.ndarray  # (n_models,)
    boot_mean: float  # bootstrap mean score of the chosen weights
    boot_std: float  # bootstrap spread (standard deviation)
    score: float  # plain validation score of the chosen weights
    candidates: np.ndarray  # (n, n_models) every candidate scored
    cand_mean: np.ndarray  # (n,) bootstrap means
    cand_std: np.ndarray
    cand_score: np.ndarray  # (n,) plain scores
    cand_smooth: np.ndarray  # (n,) bootstrap means averaged over the neighbourhood (what is maximised)


def smoothed(cands: np.ndarray, mean: np.ndarray, radius: float, chunk: int = 512) -> np.ndarray:
    """Each candidate's mean averaged with every candidate within L1 distance ``radius`` (itself included)."""
    out = np.empty(len(cands), dtype=np.float64)
    for s in range(0, len(cands), chunk):
        near = np.abs(cands[s : s + chunk, None, :] - cands[None, :, :]).sum(axis=2) <= radius + 1e-6
        out[s : s + chunk] = (near * mean[None, :]).sum(axis=1) / near.sum(axis=1)
    return out


def search_weights(
    scorer: CandidateScorer,
    *,
    grid_step: float = 0.05,
    n_random: int = 2000,
    refine_rounds: int = 3,
    n_boot: int = 200,
    seed: int = 0,
    groups: np.ndarray | None = None,
    grid_max_models: int = 4,
    smooth_radius: float = 0.2,
    desc: str = "weights",
) -> SearchResult:
    """Find the weights with the best bootstrap-mean validation score (see the module doc)."""
    n = scorer.n_models
    counts = bootstrap_counts(scorer.n_queries, n_boot, seed, groups)
    rng = np.random.default_rng(seed)
    if n == 1:
        cands = np.ones((1, 1), np.float32)
    elif n <= grid_max_models:
        cands = np.unique(np.vstack([anchor_candidates(n), simplex_grid(n, grid_step)]), axis=0)
    else:
        cands = np.vstack([anchor_candidates(n), rng.dirichlet(np.ones(n), size=n_random).astype(np.float32)])
    points = scorer.points(cands, desc)
    if n > grid_max_models:
        for r in range(refine_rounds):
            mean, _ = bootstrap_stats(points, counts)
            local = dirichlet_around(cands[int(mean.argmax())], n_random // 4, 50.0 * 4**r, rng)
            cands = np.vstack([cands, local])
            points = np.vstack([points, scorer.points(local, f"{desc} refine {r + 1}")])
    mean, std = bootstrap_stats(points, counts)
    smooth = smoothed(cands, mean, smooth_radius)
    spread_out = np.abs(cands - 1.0 / n).sum(axis=1)  # last tie-break: nearer the uniform mix
    order = np.lexsort((spread_out, -mean, -smooth))  # best smoothed mean, then own mean
    i = int(order[0])
    tied = order[(smooth[order] >= smooth[i] - 1e-9) & (mean[order] >= mean[i] - 1e-9)][:MAX_MAP_TIES]
    if len(tied) > 1:  # the score saturates (small or easy validation): mAP still ranks the whole list
        maps = [np.nanmean(average_precision(weighted_sum(scorer.mats, cands[j]), scorer.rel)) for j in tied]
        i = int(tied[int(np.argmax(maps))])
    chosen, b_mean, b_std, b_score = cands[i], mean[i], std[i], points[i].mean()
    return SearchResult(
        weights=chosen.astype(np.float64), boot_mean=float(b_mean), boot_std=float(b_std), score=float(b_score),
        candidates=cands, cand_mean=mean, cand_std=std, cand_score=points.mean(axis=1), cand_smooth=smooth,
    )
