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

Memory: every fusion works per query row, so :func:`transform`, :func:`weighted_sum` and
:func:`fuse` go a row chunk (:data:`CHUNK_ELEMS` entries) at a time in float32, in place
where they can: :func:`fuse` of any number of models allocates the result and two chunks,
never a transformed copy of each model. The results are byte-identical to the whole-matrix
formulas (tests/test_ensemble.py checks it).

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


CHUNK_ELEMS = 1 << 20  # entries per row chunk (4 MiB of float32): bounds every temporary


def row_chunks(n_rows: int, row_elems: int, chunk_elems: int | None = None):
    """Slices of consecutive rows holding about ``chunk_elems`` (default CHUNK_ELEMS) entries each (at least one row)."""
    step = max(1, (chunk_elems or CHUNK_ELEMS) // max(1, row_elems))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def row_ranks(sim: np.ndarray) -> np.ndarray:
    """0-based rank of each entry within its row (0 = most similar), ties to the lower column."""
    order = np.argsort(-sim, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(sim.shape[1])[None, :], axis=1)
    return ranks


def row_zscore(sim: np.ndarray) -> np.ndarray:
    """Each row minus its mean, over its standard deviation (constant rows become 0); whole-matrix,
    for the re-ranking steps (which also take transposed views)."""
    sim = sim.astype(np.float32, copy=False)
    mean = sim.mean(axis=1, keepdims=True)
    std = sim.std(axis=1, keepdims=True)
    return ((sim - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)


def check_fusion(fusion: str) -> None:
    """Raises KitError for an unknown fusion name."""
    if fusion not in FUSIONS:
        raise KitError(f"--fusion {fusion!r}: unknown; use one of {', '.join(FUSIONS)}")


def _transform_rows(sim: np.ndarray, fusion: str, rrf_k: float, out: np.ndarray) -> None:
    """``transform`` of a few rows, written into ``out`` (float32, same shape)."""
    sim = sim.astype(np.float32, copy=False)
    if fusion == "zscore":
        mean = sim.mean(axis=1, keepdims=True)
        std = sim.std(axis=1, keepdims=True)
        np.subtract(sim, mean, out=out)
        np.divide(out, np.where(std > 0, std, 1.0), out=out)
    elif fusion == "minmax":
        lo = sim.min(axis=1, keepdims=True)
        span = sim.max(axis=1, keepdims=True) - lo
        np.subtract(sim, lo, out=out)
        np.divide(out, np.where(span > 0, span, 1.0), out=out)
    elif fusion == "rank":  # in float64, then rounded once to float32
        out[...] = 1.0 - row_ranks(sim) / max(sim.shape[1] - 1, 1)
    elif fusion == "rrf":
        out[...] = 1.0 / (rrf_k + 1.0 + row_ranks(sim))
    else:
        raise KitError(f"--fusion {fusion!r}: unknown; use one of {', '.join(FUSIONS)}")


def transform(sim: np.ndarray, fusion: str, rrf_k: float = RRF_K, out: np.ndarray | None = None) -> np.ndarray:
    """One model's (n_queries, n_gallery) matrix on the scale that ``fusion`` adds up, in float32.

    Every fusion works per query row, so rows are done a chunk at a time: the only full-size
    allocation is the result (or none, when ``out`` is given; ``out`` may be ``sim`` itself
    when ``sim`` is float32: in place).

    Raises:
        KitError: unknown ``fusion``.
    """
    check_fusion(fusion)
    sim = np.asarray(sim)
    if out is None:
        out = np.empty(sim.shape, dtype=np.float32)
    for rows in row_chunks(sim.shape[0], sim.shape[1]):
        _transform_rows(sim[rows], fusion, rrf_k, out[rows])
    return out


def weighted_sum(mats: np.ndarray | list[np.ndarray], weights: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``sum_m weights[m] * mats[m]`` in float32, accumulated model by model.

    The weight search (:mod:`utils.ensemble.weight_search`) adds in exactly this order, so
    its scores equal those of the fused matrix bit for bit. Done a row chunk at a time: the
    only full-size allocation is the result (none with ``out``).
    """
    return _accumulate(mats, weights, lambda m, rows, buf: _as_float32(m[rows], buf), out)


def fuse(sims: list[np.ndarray], weights: np.ndarray, fusion: str, rrf_k: float = RRF_K, out: np.ndarray | None = None) -> np.ndarray:
    """Transform each model's matrix with ``fusion`` and add them with ``weights``.

    Equal bit for bit to ``weighted_sum([transform(s, fusion) for s in sims], weights)``, but
    one row chunk of one model is transformed at a time: memory is the result plus two chunks,
    whatever the number of models.
    """
    if len(sims) != len(weights):
        raise ValueError(f"{len(sims)} matrices but {len(weights)} weights")
    check_fusion(fusion)

    def rows_of(m: np.ndarray, rows: slice, buf: np.ndarray) -> np.ndarray:
        _transform_rows(m[rows], fusion, rrf_k, buf)
        return buf

    return _accumulate(sims, weights, rows_of, out)


def _as_float32(x: np.ndarray, buf: np.ndarray) -> np.ndarray:
    if x.dtype == np.float32:
        return x
    buf[...] = x
    return buf


def _accumulate(mats, weights, rows_of, out: np.ndarray | None) -> np.ndarray:
    """out = w0 * rows_of(m0) + w1 * rows_of(m1) + ..., a row chunk at a time, in float32."""
    weights = np.asarray(weights, dtype=np.float32)
    shape = np.shape(mats[0])
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    for rows in row_chunks(shape[0], shape[1]):
        acc = out[rows]
        buf = np.empty(acc.shape, dtype=np.float32)
        np.multiply(rows_of(mats[0], rows, buf), weights[0], out=acc)
        for w, m in zip(weights[1:], mats[1:]):
            vals = rows_of(m, rows, buf)
            np.multiply(vals, w, out=buf)
            np.add(acc, buf, out=acc)
    return out
