"""Score fusion: put each model's similarity matrix on a common scale, then add with weights.

Every fusion here is "transform each model's matrix per query, then weighted
sum", so the weight search scores all of them the same way:

- ``zscore`` (default): each query row minus its mean, over its standard deviation.
- ``minmax``: each query row mapped to [0, 1].
- ``rank``: each query row replaced by a linear rank score, 1 for the best column
  and 0 for the worst (Borda count).
- ``rrf``: reciprocal-rank fusion, each row replaced by ``1 / (rrf_k + rank)``
  (rank 1 = best); weighted RRF when the weights differ.

Ranks break ties by the lower column index, like :func:`utils.runs.topk.topk`.

Example:
    >>> t = transform(np.array([[0.1, 0.9, 0.5]], np.float32), "rank")
    >>> t.tolist()
    [[0.0, 1.0, 0.5]]
"""

from __future__ import annotations

import numpy as np

from utils.errors import KitError

FUSIONS = ("zscore", "minmax", "rank", "rrf")
RRF_K = 60.0  # the constant of Cormack et al. (2009); larger flattens the rank curve


def row_ranks(sim: np.ndarray) -> np.ndarray:
    """0-based rank of each entry within its row (0 = most similar), ties to the lower column."""
    order = np.argsort(-sim, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(sim.shape[1])[None, :], axis=1)
    return ranks


def row_zscore(sim: np.ndarray) -> np.ndarray:
    """Each row minus its mean, over its standard deviation (constant rows become 0)."""
    sim = sim.astype(np.float32, copy=False)
    mean = sim.mean(axis=1, keepdims=True)
    std = sim.std(axis=1, keepdims=True)
    return ((sim - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)


def transform(sim: np.ndarray, fusion: str, rrf_k: float = RRF_K) -> np.ndarray:
    """One model's (n_queries, n_gallery) matrix on the scale that ``fusion`` adds up.

    Raises:
        KitError: unknown ``fusion``.
    """
    sim = np.asarray(sim, dtype=np.float32)
    if fusion == "zscore":
        return row_zscore(sim)
    elif fusion == "minmax":
        lo = sim.min(axis=1, keepdims=True)
        span = sim.max(axis=1, keepdims=True) - lo
        return ((sim - lo) / np.where(span > 0, span, 1.0)).astype(np.float32)
    elif fusion == "rank":
        n = sim.shape[1]
        return (1.0 - row_ranks(sim) / max(n - 1, 1)).astype(np.float32)
    elif fusion == "rrf":
        return (1.0 / (rrf_k + 1.0 + row_ranks(sim))).astype(np.float32)
    else:
        raise KitError(f"--fusion {fusion!r}: unknown; use one of {', '.join(FUSIONS)}")


def weighted_sum(mats: np.ndarray | list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """``sum_m weights[m] * mats[m]`` in float32, accumulated model by model.

    The weight search (:mod:`utils.ensemble.weight_search`) adds in exactly this order, so
    its scores equal those of the fused matrix bit for bit.
    """
    weights = np.asarray(weights, dtype=np.float32)
    out = weights[0] * np.asarray(mats[0], dtype=np.float32)
    for w, m in zip(weights[1:], mats[1:]):
        out = out + w * np.asarray(m, dtype=np.float32)
    return out.astype(np.float32, copy=False)


def fuse(sims: list[np.ndarray], weights: np.ndarray, fusion: str, rrf_k: float = RRF_K) -> np.ndarray:
    """Transform each model's matrix with ``fusion`` and add them with ``weights``."""
    if len(sims) != len(weights):
        raise ValueError(f"{len(sims)} matrices but {len(weights)} weights")
    return weighted_sum([transform(s, fusion, rrf_k) for s in sims], weights)
