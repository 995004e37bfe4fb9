"""Top-k inner-product search from embeddings, without the full query x gallery matrix.

Two backends, chosen by name, equal on the same data up to exact ties:

- ``exact`` (the kit's own, no extra package): queries and gallery are cut
  into chunks whose float32 score block fits a byte budget (default 256 MB).
  Each block is computed by one ``np.matmul`` into a preallocated buffer. The
  first gallery chunk of a query chunk is reduced with ``np.argpartition``.
  From then on, only the entries above each query's running k-th best score
  are gathered (a comparison and ``np.nonzero``) and merged, which on real or
  random data is a few per query and chunk. The full matrix is never held;
  peak memory is the embeddings plus the budget.
- ``faiss``: FAISS ``IndexFlatIP`` (exact brute force, ``faiss-cpu``; on a
  machine where FAISS sees GPUs, the index is moved onto all of them).

Both return scores and gallery indices best first. Ties are broken by the
lower gallery index (FAISS results are re-sorted the same way), so the exact
search equals ``np.argsort(-sim, kind="stable")[:, :k]`` on the same scores.

Example:
    >>> q = np.eye(3, 4, dtype=np.float32)
    >>> scores, idx = search_topk(q, q, k=2)
    >>> idx.tolist()
    [[0, 1], [1, 0], [2, 0]]
"""

from __future__ import annotations

import importlib.util
import logging
from contextlib import nullcontext

import numpy as np

from utils.errors import KitError
from utils.progress import ProgressBar

log = logging.getLogger(__name__)

BACKENDS = ("exact", "faiss")
DEFAULT_BUDGET_BYTES = 256 * 2**20
# bytes per cell of a chunk while it is reduced: float32 scores, a bool mask,
# argpartition's int64 indices and one more bool temporary on the dense path
_BYTES_PER_CELL = 4 + 1 + 8 + 1
_DEFAULT_CHUNK_COLS = 16384
_SEED_COLS = 1024  # columns whose dense top-k seeds each query chunk's running threshold
FAISS_GPU_MAX_K = 2048  # a GPU FAISS index's largest k (its k-selection kernels); the CPU index has no such bound
FAISS_INSTALL = "pip install faiss-cpu==1.15.1"

has_faiss = importlib.util.find_spec("faiss") is not None


def search_topk(
    query_emb: np.ndarray,
    gallery_emb: np.ndarray,
    k: int,
    backend: str = "exact",
    *,
    chunk_rows: int | None = None,
    chunk_cols: int | None = None,
    memory_budget_bytes: int = DEFAULT_BUDGET_BYTES,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` gallery rows with the largest inner product for each query row, best first.

    With L2-normalised embeddings the inner product is the cosine similarity.

    Args:
        query_emb: (n_query, d) embeddings; float32 is used as it is, other dtypes are converted once.
        gallery_emb: (n_gallery, d) embeddings.
        k: results per query, 1 <= k <= n_gallery.
        backend: ``exact`` (the kit's chunked search) or ``faiss``.
        chunk_rows: queries per chunk (default: from the budget).
        chunk_cols: gallery rows per chunk (exact backend; default 16384, at least k).
        memory_budget_bytes: bound on the temporaries of one chunk.
        progress: draw a progress bar.

    Returns:
        ``(scores, indices)``: (n_query, k) float32 and int64, best first, ties to the lower index.

    Raises:
        KitError: bad shapes, non-finite values, k out of range, unknown backend, FAISS missing.
    """
    q = _as_matrix(query_emb, "query")
    g = _as_matrix(gallery_emb, "gallery")
    if q.shape[1] != g.shape[1]:
        raise KitError(f"query embeddings are {q.shape[1]}-d but gallery embeddings {g.shape[1]}-d; embed both with the same model")
    n_g = g.shape[0]
    if not 1 <= k <= n_g:
        raise KitError(f"k={k} must be between 1 and the gallery size {n_g}")
    if backend == "exact":
        return _exact_search(q, g, k, chunk_rows, chunk_cols, memory_budget_bytes, progress)
    elif backend == "faiss":
        return _faiss_search(q, g, k, chunk_rows or 65536, progress)
    else:
        raise KitError(f"--search-backend {backend!r}: unknown; use one of {', '.join(BACKENDS)}")


def chunk_shape(n_query: int, n_gallery: int, k: int, memory_budget_bytes: int = DEFAULT_BUDGET_BYTES,
                chunk_rows: int | None = None, chunk_cols: int | None = None) -> tuple[int, int]:
    """(query rows, gallery rows) of one chunk so that its temporaries fit the budget."""
    cols = min(n_gallery, max(k, chunk_cols or _DEFAULT_CHUNK_COLS))
    rows = chunk_rows or memory_budget_bytes // (_BYTES_PER_CELL * cols)
    return max(1, min(n_query, rows)), cols


def _as_matrix(x: np.ndarray, what: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)  # no copy when already C-contiguous float32
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise KitError(f"{what} embeddings: expected a non-empty 2-D (n, d) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise KitError(f"{what} embeddings: {int((~np.isfinite(x)).sum())} NaN or infinite value(s); re-run the model")
    return x


def _exact_search(q, g, k, chunk_rows, chunk_cols, budget, progress):
    n_q, n_g = q.shape[0], g.shape[0]
    rows, cols = chunk_shape(n_q, n_g, k, budget, chunk_rows, chunk_cols)
    flat = np.empty(rows * cols, dtype=np.float32)  # the score block, reused
    flat_mask = np.empty(rows * cols, dtype=bool)
    scores = np.empty((n_q, k), dtype=np.float32)
    indices = np.empty((n_q, k), dtype=np.int64)
    log.debug("exact search %d x %d, k=%d, chunks of %d x %d", n_q, n_g, k, rows, cols)
    with ProgressBar("top-k search", total=n_q) if progress else nullcontext() as bar:
        for qs in range(0, n_q, rows):
            qc = q[qs : qs + rows]
            nr = len(qc)
            best_s = best_i = None
            for gs in range(0, n_g, cols):
                gc = g[gs : gs + cols]
                nc = len(gc)
                block = flat[: nr * nc].reshape(nr, nc)
                np.matmul(qc, gc.T, out=block)
                start = 0
                if best_s is None:  # seed the running top-k from the first columns only
                    start = min(nc, max(32 * k, _SEED_COLS))
                    best_s, best_i = _dense_topk(block[:, :start], k, gs)
                    if start == nc:
                        continue
                best_s, best_i = _merge_block(best_s, best_i, block[:, start:], gs + start, flat_mask)
            scores[qs : qs + nr], indices[qs : qs + nr] = best_s, best_i
            if progress:
                bar.advance(nr)
    return scores, indices


def _merge_block(best_s, best_i, block, offset, flat_mask):
    """Merge one score block into the running top-k: only entries above the k-th best are gathered."""
    nr, nc = block.shape
    k = best_s.shape[1]
    mask = flat_mask[: nr * nc].reshape(nr, nc)
    np.greater(block, best_s[:, -1:], out=mask)  # a tie with the k-th loses: its index is higher
    n_new = int(np.count_nonzero(mask))
    if n_new == 0:
        return best_s, best_i
    if n_new <= max(nr * k, mask.size // 64):  # few: sort just them
        r, c = np.divmod(np.flatnonzero(mask), nc)  # much faster than a 2-D np.nonzero
        return _merge(best_s, best_i, r, c + offset, block[r, c])
    s2, i2 = _dense_topk(block, k, offset)
    return _merge(best_s, best_i, np.repeat(np.arange(nr), s2.shape[1]), i2.ravel(), s2.ravel())


def _dense_topk(block: np.ndarray, k: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-min(k, n_cols) of each row of one block, best first, ties to the lower column."""
    nr, nc = block.shape
    kk = min(k, nc)
    if kk < nc:
        part = np.argpartition(block, nc - kk, axis=1)[:, nc - kk :]
        kth = np.take_along_axis(block, part, axis=1).min(axis=1, keepdims=True)
        tied = np.count_nonzero(block >= kth, axis=1) > kk  # argpartition may have kept a higher tied index
        if tied.any():
            part[tied] = np.argsort(-block[tied], axis=1, kind="stable")[:, :kk]
    else:
        part = np.broadcast_to(np.arange(nc), (nr, nc))
    vals = np.take_along_axis(block, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)
    return np.take_along_axis(vals, order, axis=1), np.take_along_axis(part, order, axis=1) + offset


def _merge(best_s, best_i, rows, idx, vals):
    """Merge (row, index, score) candidates into each row's running top-k."""
    nr, k = best_s.shape
    r = np.concatenate([np.repeat(np.arange(nr), k), rows])
    i = np.concatenate([best_i.ravel(), idx])
    s = np.concatenate([best_s.ravel(), vals])
    order = np.lexsort((i, -s, r))
    r, i, s = r[order], i[order], s[order]
    starts = np.searchsorted(r, np.arange(nr))
    keep = (np.arange(len(r)) - starts[r]) < k  # every row holds at least its k running entries
    return s[keep].reshape(nr, k), i[keep].reshape(nr, k)


def _import_faiss():
    if not has_faiss:
        raise KitError(f"--search-backend faiss: FAISS is not installed; run `{FAISS_INSTALL}` or use --search-backend exact")
    import faiss

    return faiss


def _faiss_search(q, g, k, chunk_rows, progress):
    faiss = _import_faiss()
    on_gpu = faiss.get_num_gpus() > 0 and hasattr(faiss, "index_cpu_to_all_gpus")
    if on_gpu and k > FAISS_GPU_MAX_K:
        raise KitError(f"--topk {k}: FAISS on a GPU returns at most {FAISS_GPU_MAX_K} neighbours per query; "
                       f"lower --topk or use --search-backend exact")
    index = faiss.IndexFlatIP(q.shape[1])
    if on_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
        log.info("FAISS on %d GPU(s)", faiss.get_num_gpus())
    index.add(g)
    n_q = q.shape[0]
    scores = np.empty((n_q, k), dtype=np.float32)
    indices = np.empty((n_q, k), dtype=np.int64)
    with ProgressBar("top-k search (faiss)", total=n_q) if progress else nullcontext() as bar:
        for qs in range(0, n_q, chunk_rows):
            d, i = index.search(q[qs : qs + chunk_rows], k)
            order = np.lexsort((i, -d), axis=1)  # ties to the lower index, like the exact search
            scores[qs : qs + len(d)] = np.take_along_axis(d, order, axis=1)
            indices[qs : qs + len(d)] = np.take_along_axis(i, order, axis=1)
            if progress:
                bar.advance(len(d))
    return scores, indices
