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
import math
from dataclasses import dataclass

import numpy as np

from utils.ensemble import fusion as fusion_mod
from utils.ensemble.fusion import check_fusion, fuse, row_chunks, transform, weighted_sum
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


GRID_MAX_MODELS = 4  # up to this many models the weights are searched on a simplex grid; beyond, at random


def simplex_grid(n_models: int, step: float) -> np.ndarray:
    """Every weight vector with entries in multiples of ``step`` that sum to 1, (n, n_models)."""
    parts = round(1.0 / step)
    rows = [c for c in itertools.product(range(parts + 1), repeat=n_models - 1) if sum(c) <= parts]
    grid = np.array([list(c) + [parts - sum(c)] for c in rows], dtype=np.float64) / parts
    return grid.astype(np.float32)


def grid_size(n_models: int, step: float) -> int:
    """How many weight vectors :func:`simplex_grid` holds, without making them."""
    return math.comb(round(1.0 / step) + n_models - 1, n_models - 1) if n_models > 1 else 1


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

    Memory: the set-up reads the matrices a row chunk at a time and keeps only the
    (models, queries, kept columns) values. With ``fusion``, ``mats`` are the members'
    raw matrices and rows are transformed when read (never a transformed full matrix);
    without, ``mats`` are already transformed.

    Args:
        mats: per model, the (n_queries, n_gallery) matrix: raw with ``fusion``, else transformed
            (``utils.ensemble.fusion.transform``).
        rel: (n_queries, n_gallery) bool, True where the gallery image is a right answer.
        top_m: columns kept per model and query; larger means fewer full-row fallbacks.
        batch_elems: bound on the temporary (batch, queries, kept) array size.
        n_blocks: queries are grouped into this many blocks of similar kept width.
        fusion: transform rows with this fusion when they are read (see above).
        chunk_elems: matrix entries (over all models) read per row chunk during the set-up.
    """

    def __init__(self, mats: list[np.ndarray], rel: np.ndarray, top_m: int = 50, batch_elems: int = 4_000_000, n_blocks: int = 4,
                 fusion: str | None = None, chunk_elems: int | None = None):
        if fusion is not None:
            check_fusion(fusion)
        self.fusion = fusion
        self.mats = [np.asarray(m) if fusion is not None else np.ascontiguousarray(m, dtype=np.float32) for m in mats]
        self.rel = np.asarray(rel, dtype=bool)
        n_q, n_g = self.rel.shape
        self.n_models, self.n_queries = len(mats), n_q
        self.batch_elems = batch_elems
        self.fallback_pairs = 0
        n_rel = self.rel.sum(axis=1)
        self.width_rel = max(1, int(n_rel.max()))
        top_m = min(top_m, n_g)
        chunks = [(rows, self._kept_chunk(rows, top_m)) for rows in row_chunks(n_q, n_g * self.n_models, chunk_elems)]
        # right answers first (ascending column, padded to width_rel), then the other kept columns; n_g pads
        width_all = max(c[0].shape[1] for _, c in chunks)
        cols = np.full((n_q, width_all), n_g, dtype=np.int64)
        kept_all = np.empty((self.n_models, n_q, width_all), dtype=np.float32)
        bound_parts = None if top_m >= n_g else np.empty((self.n_models, n_q), dtype=np.float32)  # nothing left out: no bound
        for rows, (c, k, b, floor) in chunks:
            cols[rows, : c.shape[1]] = c
            kept_all[:, rows, : c.shape[1]] = k
            kept_all[:, rows, c.shape[1] :] = floor[:, :, None]
            if bound_parts is not None:
                bound_parts[:, rows] = b
        del chunks
        # the right answers take width_rel slots in every row (padded), so a row's last real column
        # sits at width_rel + its count of other columns, not at its count of real columns
        width = self.width_rel + (cols[:, self.width_rel :] < n_g).sum(axis=1)
        order = np.argsort(width, kind="stable")
        self.blocks = []
        for rows in np.array_split(order, min(n_blocks, n_q)):
            if len(rows) == 0:
                continue
            w = max(self.width_rel + 1, int(width[rows].max()))  # never cuts a real column
            self.blocks.append(_Block(rows, cols[rows, :w], np.ascontiguousarray(kept_all[:, rows, :w]), n_rel[rows] > 0,
                                      None if bound_parts is None else bound_parts[:, rows]))
        self.kept_elems = sum(b.kept[0].size for b in self.blocks)

    def rows(self, m: int, idx) -> np.ndarray:
        """Model ``m``'s transformed values of the rows ``idx`` (a slice or indices), float32."""
        if self.fusion is None:
            return self.mats[m][idx]
        return transform(self.mats[m][idx], self.fusion)

    def fused(self, weights: np.ndarray) -> np.ndarray:
        """The full fused matrix of one weight vector (as :func:`utils.ensemble.fusion.fuse`)."""
        if self.fusion is None:
            return weighted_sum(self.mats, weights)
        return fuse(self.mats, np.asarray(weights, dtype=np.float32), self.fusion)

    def _kept_chunk(self, rows: slice, top_m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        """For a chunk of queries: kept columns (r, width), their values (models, r, width) with pads
        at ``floor``, each model's best value outside its top-m (models, r), and ``floor`` (models, r):
        a value below every real value of the row."""
        vals = np.stack([self.rows(m, rows) for m in range(self.n_models)])  # (models, r, g)
        rel = self.rel[rows]
        n_g = rel.shape[1]
        bound = None
        if top_m >= n_g:
            top = np.broadcast_to(np.arange(n_g), rel.shape)
        else:
            parts = [np.argpartition(-v, top_m, axis=1)[:, : top_m + 1] for v in vals]
            top = np.concatenate([p[:, :top_m] for p in parts], axis=1)
            bound = np.stack([np.take_along_axis(v, p[:, top_m:], axis=1)[:, 0] for v, p in zip(vals, parts)])
        rel_cols = np.sort(np.where(rel, np.arange(n_g), n_g), axis=1)[:, : self.width_rel]
        other = _distinct(np.where(np.take_along_axis(rel, top, axis=1), n_g, top), n_g)
        other = _prune(vals, rel_cols, other, n_g)
        cols = np.concatenate([rel_cols, other], axis=1)
        floor = vals.min(axis=2) - np.maximum(1.0, np.abs(vals).max(axis=2))  # (models, r): below the row's real values
        kept = np.take_along_axis(vals, np.minimum(cols, n_g - 1)[None], axis=2)
        kept = np.where(cols[None] < n_g, kept, floor[:, :, None]).astype(np.float32)
        return cols, kept, bound, floor.astype(np.float32)

    def first_hit(self, weights: np.ndarray, progress: str | None = None) -> np.ndarray:
        """(n_candidates, n_queries) int16 first-hit ranks within the Top-10 (10 = miss)."""
        weights = np.asarray(weights, dtype=np.float32).reshape(-1, self.n_models)
        if (weights < 0).any():
            raise ValueError("weights must be non-negative (the exactness bound needs it)")
        out = np.empty((len(weights), self.n_queries), dtype=np.int16)
        batch = max(1, self.batch_elems // max(1, self.kept_elems))
        pending_cands, pending_queries = [], []  # pairs without a certificate: ranked on whole rows at the end
        with ProgressBar(progress or "weights", total=len(weights)) as bar:
            for start in range(0, len(weights), batch):
                w = weights[start : start + batch]
                for block in self.blocks:
                    rank, b_idx, q_idx = self._block_ranks(block, w)
                    out[start : start + len(w), block.rows] = rank
                    pending_cands.append(start + b_idx)
                    pending_queries.append(block.rows[q_idx])
                bar.advance(len(w))
        # all weights zero: every column ties at 0, so the lower column wins and the pruning's
        # "wins for every weight" margins do not hold; such candidates are ranked on whole rows
        for i in np.flatnonzero(~(weights > 0).any(axis=1)):
            pending_cands.append(np.full(self.n_queries, i))
            pending_queries.append(np.arange(self.n_queries))
        cands, queries = np.concatenate(pending_cands), np.concatenate(pending_queries)
        if len(cands):
            out[cands, queries] = self._full_rows(weights, cands, queries)
            self.fallback_pairs += len(cands)
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
        none = np.zeros(0, dtype=np.int64)
        if block.bound_parts is None:
            return rank, none, none
        bound = w[:, 0, None] * block.bound_parts[0]
        for m in range(1, self.n_models):
            bound = bound + w[:, m, None] * block.bound_parts[m]
        # a column left out scores at most `bound`: exact if the best hit beats it, or 10 kept columns beat the hit
        unsure = block.has_rel & (best[:, :, 0] <= bound) & (rank < MISS)
        b_idx, q_idx = np.nonzero(unsure)
        return rank, b_idx, q_idx

    def _full_rows(self, weights: np.ndarray, cands: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """First-hit ranks (capped at 10) of (candidate, query) pairs on their whole rows.

        Pairs are grouped by query, so each query's rows are read (and, with ``fusion``,
        transformed) once per call, a bounded chunk of queries at a time.
        """
        n_g = self.rel.shape[1]
        per_read = max(1, fusion_mod.CHUNK_ELEMS // max(1, n_g * self.n_models))  # queries whose rows are read at once
        per_sum = max(1, fusion_mod.CHUNK_ELEMS // max(1, n_g))  # pairs fused at once
        order = np.argsort(queries, kind="stable")
        cands, queries = cands[order], queries[order]
        uq, first = np.unique(queries, return_index=True)
        bounds = np.append(first, len(queries))
        cols = np.arange(n_g)
        res = np.empty(len(queries), dtype=np.int64)
        for s in range(0, len(uq), per_read):
            qs = uq[s : s + per_read]
            vals = [self.rows(m, qs) for m in range(self.n_models)]
            lo, hi = bounds[s], bounds[min(s + per_read, len(uq))]
            for p in range(lo, hi, per_sum):
                e = min(p + per_sum, hi)
                local, ws = np.searchsorted(qs, queries[p:e]), weights[cands[p:e]]
                rows = ws[:, 0, None] * vals[0][local]
                for m in range(1, self.n_models):
                    rows += ws[:, m, None] * vals[m][local]
                rel = self.rel[queries[p:e]]
                pos = np.where(rel, rows, -np.inf).argmax(axis=1)
                best = rows[np.arange(e - p), pos][:, None]
                beaten = (rows > best).sum(axis=1) + ((rows == best) & (cols < pos[:, None])).sum(axis=1)
                res[p:e] = np.where(rel.any(axis=1), np.minimum(beaten, MISS), MISS)
        out = np.empty_like(res)
        out[order] = res
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
    """Drop kept columns that never change a first hit within the Top-10 (see CandidateScorer).

    ``stack`` is (models, rows, g) for these rows only: the margin that beats float rounding
    scales with the largest value of these rows, which bounds every weighted sum they give.
    """
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
    grid_max_models: int = GRID_MAX_MODELS,
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
        maps = [np.nanmean(average_precision(scorer.fused(cands[j]), scorer.rel)) for j in tied]
        i = int(tied[int(np.argmax(maps))])
    chosen, b_mean, b_std, b_score = cands[i], mean[i], std[i], points[i].mean()
    return SearchResult(
        weights=chosen.astype(np.float64), boot_mean=float(b_mean), boot_std=float(b_std), score=float(b_score),
        candidates=cands, cand_mean=mean, cand_std=std, cand_score=points.mean(axis=1), cand_smooth=smooth,
    )
