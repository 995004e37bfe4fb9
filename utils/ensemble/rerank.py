"""Re-ranking of a fused (n_queries, n_gallery) similarity matrix, each split on its own.

The ensemble only has query x gallery matrices, no embeddings, so the
gallery-gallery and query-query similarities that query expansion, database
augmentation and k-reciprocal re-ranking need are *approximated* from the
matrix itself (:func:`profile_similarity`): a gallery image is described by its
row-z-scored similarities to every query (its column), a query by its
column-z-scored similarities to every gallery image (its row), and two images
are as similar as the cosine of those profiles (``sim^T sim`` of normalised
columns/rows). Images that the models rank alike come out as neighbours;
images of one identity usually do. This uses the test queries and gallery of
the split being re-ranked (transductive, as re-ranking always is), never
another split's labels.

- ``dba``: database-side augmentation; each gallery column becomes the
  weighted mean of itself and its ``k`` profile neighbours' columns
  (weights: the neighbour's place in the row's cosine range ^ alpha). Exact for the linear part: sim(q, sum w_j g_j) =
  sum w_j sim(q, g_j); the re-normalisation of the new embedding is left out.
- ``qe``: alpha query expansion; each query row is pulled towards the profile
  similarities of its ``k`` best gallery images (weights: min-max row score ^ alpha).
- ``kr``: k-reciprocal re-ranking (Zhong et al., CVPR 2017) on the joint
  (queries + gallery) graph, whose q-q and g-g blocks are the profile cosines
  and whose q-g block is the row-z-scored matrix scaled into [-1, 1].
- ``dual_softmax``: softmax over the gallery times softmax over the queries
  (log domain); a gallery image that every query likes ("hub") is discounted.
- ``sinkhorn``: alternate row and column normalisation (log domain) towards a
  doubly stochastic matrix; suits a gallery with about one image per query identity.

Steps run in the order of :data:`STEPS`; ``dual_softmax`` and ``sinkhorn``
exclude each other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

from utils.ensemble.fusion import row_zscore
from utils.errors import KitError

log = logging.getLogger(__name__)

STEPS = ("dba", "qe", "kr", "dual_softmax", "sinkhorn")


@dataclass(frozen=True)
class RerankParams:
    """Settings of every re-ranking step (a step runs only if named in ``steps``)."""

    steps: tuple[str, ...] = ()
    dba_k: int = 2  # profile neighbours averaged into each gallery column
    dba_alpha: float = 3.0
    qe_k: int = 2  # best gallery images a query is expanded with
    qe_alpha: float = 3.0
    kr_k1: int = 20  # k-reciprocal neighbourhood size
    kr_k2: int = 6  # local query expansion size
    kr_lambda: float = 0.3  # weight of the original distance against the Jaccard distance
    temperature: float = 1.0  # dual-softmax / Sinkhorn temperature on the row-z-scored matrix
    sinkhorn_iters: int = 20

    def label(self) -> str:
        """A short human-readable name, e.g. ``dba(k=2)+dual_softmax(t=1)``."""
        parts = []
        for s in self.steps:
            if s == "dba":
                parts.append(f"dba(k={self.dba_k})")
            elif s == "qe":
                parts.append(f"qe(k={self.qe_k})")
            elif s == "kr":
                parts.append(f"kr(k1={self.kr_k1},k2={self.kr_k2},l={self.kr_lambda:g})")
            elif s == "dual_softmax":
                parts.append(f"dual_softmax(t={self.temperature:g})")
            elif s == "sinkhorn":
                parts.append(f"sinkhorn(t={self.temperature:g})")
            else:
                raise KitError(f"re-ranking step {s!r}: unknown; use any of {', '.join(STEPS)}")
        return "+".join(parts) or "none"


def check_steps(steps: tuple[str, ...]) -> tuple[str, ...]:
    """The steps in :data:`STEPS` order; unknown or conflicting ones are a KitError."""
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise KitError(f"re-ranking step(s) {unknown}: unknown; use any of {', '.join(STEPS)}")
    if "dual_softmax" in steps and "sinkhorn" in steps:
        raise KitError("--dual-softmax and --sinkhorn both normalise the matrix both ways; pick one")
    return tuple(s for s in STEPS if s in steps)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def profile_similarity(sim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Approximate (query-query, gallery-gallery) cosine similarities from a q x g matrix."""
    z = row_zscore(sim).astype(np.float64)
    g_prof = _unit_rows(z.T)  # each gallery image: its column over the queries
    q_prof = _unit_rows(row_zscore(sim.T).T.astype(np.float64))  # each query: its column-z-scored row
    return (q_prof @ q_prof.T).astype(np.float32), (g_prof @ g_prof.T).astype(np.float32)


def _top_neighbours(sim: np.ndarray, k: int, exclude_self: bool) -> np.ndarray:
    s = sim.copy()
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    k = min(k, s.shape[1] - int(exclude_self))
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def database_augmentation(sim: np.ndarray, gg: np.ndarray, k: int, alpha: float) -> np.ndarray:
    """Each gallery column -> weighted mean of itself and its ``k`` profile neighbours."""
    z = row_zscore(sim)
    nb = _top_neighbours(gg, k, exclude_self=True)  # (g, k)
    off = gg.copy()
    np.fill_diagonal(off, np.nan)
    lo, hi = np.nanmin(off, axis=1, keepdims=True), np.nanmax(off, axis=1, keepdims=True)
    # profile cosines crowd near 1: weigh by the place within the row's range, not the raw cosine
    w = ((np.take_along_axis(gg, nb, axis=1) - lo) / np.where(hi > lo, hi - lo, 1.0)) ** alpha  # (g, k)
    out = z.copy()
    for j in range(nb.shape[1]):  # k is small: one vectorised pass per neighbour slot
        out += z[:, nb[:, j]] * w[:, j]
    return (out / (1.0 + w.sum(axis=1))).astype(np.float32)


def query_expansion(sim: np.ndarray, gg: np.ndarray, k: int, alpha: float) -> np.ndarray:
    """Each query row -> itself plus the profile rows of its ``k`` best gallery images (alpha-QE)."""
    z = row_zscore(sim)
    ggz = row_zscore(gg)
    top = np.argsort(-z, axis=1, kind="stable")[:, :k]  # (q, k)
    lo, hi = z.min(axis=1, keepdims=True), z.max(axis=1, keepdims=True)
    w = ((np.take_along_axis(z, top, axis=1) - lo) / np.where(hi > lo, hi - lo, 1.0)) ** alpha  # (q, k)
    out = z.copy()
    for j in range(top.shape[1]):
        out += ggz[top[:, j]] * w[:, j : j + 1]
    return (out / (1.0 + w.sum(axis=1, keepdims=True))).astype(np.float32)


def dual_softmax(sim: np.ndarray, temperature: float) -> np.ndarray:
    """log(softmax over gallery) + log(softmax over queries) of the row-z-scored matrix."""
    x = row_zscore(sim).astype(np.float64) / temperature
    return (x - logsumexp(x, axis=1, keepdims=True) + x - logsumexp(x, axis=0, keepdims=True)).astype(np.float32)


def sinkhorn(sim: np.ndarray, temperature: float, n_iters: int) -> np.ndarray:
    """Log-domain Sinkhorn: rows sum to 1, columns to n_queries/n_gallery, after ``n_iters`` rounds."""
    x = row_zscore(sim).astype(np.float64) / temperature
    col_mass = np.log(x.shape[0] / x.shape[1])
    for _ in range(n_iters):
        x = x - logsumexp(x, axis=0, keepdims=True) + col_mass
        x = x - logsumexp(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def k_reciprocal(sim: np.ndarray, qq: np.ndarray, gg: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    """Zhong et al.'s k-reciprocal re-ranking; returns a similarity (minus the final distance).

    The joint graph's q-g block is the row-z-scored matrix divided by its
    largest magnitude (so all three blocks lie in [-1, 1]); distances are ``1 - sim``.
    """
    n_q, n_g = sim.shape
    z = row_zscore(sim)
    qg = z / max(float(np.abs(z).max()), 1e-12)
    full = np.block([[qq, qg], [qg.T, gg]]).astype(np.float32)
    dist = np.clip(1.0 - full, 0, None) ** 2
    dist = (dist / np.maximum(dist.max(axis=0, keepdims=True), 1e-12)).T  # as in the reference code
    n = n_q + n_g
    k1 = min(k1, n - 1)
    rank = np.argsort(dist, axis=1, kind="stable")[:, : k1 + 1].astype(np.int64)
    half = int(np.around(k1 / 2.0))
    v = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        recip = _reciprocal(rank, i, k1)
        expansion = [recip]
        for cand in recip:
            cand_recip = _reciprocal(rank, cand, half)
            if len(np.intersect1d(cand_recip, recip)) > 2.0 / 3.0 * len(cand_recip):
                expansion.append(cand_recip)
        idx = np.unique(np.concatenate(expansion))
        weight = np.exp(-dist[i, idx])
        v[i, idx] = weight / weight.sum()
    if k2 > 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    # Jaccard distance of the query rows against the gallery rows: sum of element-wise minima
    vq, vg = v[:n_q], v[n_q:]
    inter = np.zeros((n_q, n_g), dtype=np.float32)
    for c in np.flatnonzero((vq != 0).any(axis=0)):
        rows_g = np.flatnonzero(vg[:, c])
        if len(rows_g):
            inter[:, rows_g] += np.minimum(vq[:, c : c + 1], vg[rows_g, c][None, :])
    jaccard = 1.0 - inter / (2.0 - inter)
    final = jaccard * (1 - lam) + dist[:n_q, n_q:] * lam
    return (-final).astype(np.float32)


def _reciprocal(rank: np.ndarray, i: int, k: int) -> np.ndarray:
    forward = rank[i, : k + 1]
    backward = rank[forward, : k + 1]
    return forward[(backward == i).any(axis=1)]


def rerank(sim: np.ndarray, params: RerankParams) -> np.ndarray:
    """Apply ``params.steps`` in :data:`STEPS` order; no steps returns ``sim`` unchanged."""
    steps = check_steps(params.steps)
    if not steps:
        return sim
    qq = gg = None
    if {"dba", "qe", "kr"} & set(steps):
        qq, gg = profile_similarity(sim)
    out = sim
    for step in steps:
        if step == "dba":
            out = database_augmentation(out, gg, params.dba_k, params.dba_alpha)
        elif step == "qe":
            out = query_expansion(out, gg, params.qe_k, params.qe_alpha)
        elif step == "kr":
            out = k_reciprocal(out, qq, gg, params.kr_k1, params.kr_k2, params.kr_lambda)
        elif step == "dual_softmax":
            out = dual_softmax(out, params.temperature)
        elif step == "sinkhorn":
            out = sinkhorn(out, params.temperature, params.sinkhorn_iters)
        else:
            raise KitError(f"re-ranking step {step!r}: unknown; use any of {', '.join(STEPS)}")
    return np.ascontiguousarray(out, dtype=np.float32)
