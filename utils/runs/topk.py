"""Top-k of each row of a similarity matrix without a full argsort.

``np.argpartition`` finds the k best columns per row in linear time; only
those k are then sorted. Rows are processed in chunks so that the temporary
index arrays stay bounded for large galleries.
"""

from __future__ import annotations

import numpy as np


def topk(sim: np.ndarray, k: int, chunk_rows: int = 4096) -> np.ndarray:
    """Indices of the ``k`` largest entries of each row, best first.

    Ties are broken by the lower column index, so the result is deterministic.

    Args:
        sim: (n_queries, n_gallery) similarities, higher is better.
        k: how many columns to keep (at most n_gallery).
        chunk_rows: rows handled at once; bounds the temporary memory.

    Returns:
        (n_queries, k) int64 column indices.
    """
    n_rows, n_cols = sim.shape
    if not 1 <= k <= n_cols:
        raise ValueError(f"k={k} must be between 1 and the gallery size {n_cols}")
    out = np.empty((n_rows, k), dtype=np.int64)
    for start in range(0, n_rows, chunk_rows):
        block = sim[start : start + chunk_rows]
        if k < n_cols:
            part = np.argpartition(-block, k - 1, axis=1)[:, :k]
            # a tie at the k-th value may have excluded a lower index: widen to all tied
            kth = np.take_along_axis(block, part, axis=1).min(axis=1, keepdims=True)
            if np.any((block >= kth).sum(axis=1) > k):
                part = _ties_safe(block, k)
        else:
            part = np.broadcast_to(np.arange(n_cols), block.shape)
        vals = np.take_along_axis(block, part, axis=1)
        order = np.lexsort((part, -vals), axis=1)
        out[start : start + len(block)] = np.take_along_axis(part, order, axis=1)
    return out


def _ties_safe(block: np.ndarray, k: int) -> np.ndarray:
    """Stable full sort for the rare chunk with ties at the k-th value."""
    return np.argsort(-block, axis=1, kind="stable")[:, :k]
