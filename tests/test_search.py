"""The search backends: the chunked exact search equals a full stable sort, FAISS equals it up to exact ties,
memory stays bounded, and bad input fails with one line."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from utils.errors import KitError
from utils.runs import search
from utils.runs.search import chunk_shape, search_topk

needs_faiss = pytest.mark.skipif(not search.has_faiss, reason="faiss-cpu not installed")


def small_ints(rng, n, d=8):
    """Integer-valued float32 vectors: every dot product is exact, and ties are frequent."""
    return rng.integers(-2, 3, size=(n, d)).astype(np.float32)


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def full_sort(q, g, k):
    sim = q.astype(np.float64) @ g.T.astype(np.float64)
    idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sim, idx, axis=1), idx


# (n_query, n_gallery, k, chunk_rows, chunk_cols): one chunk, many chunks, chunks smaller than the seed, k == gallery
SHAPES = [(40, 25, 10, None, None), (50, 700, 10, 7, 64), (33, 5000, 5, 8, 1500), (64, 300, 100, 16, 128), (20, 57, 57, 6, 10)]


@pytest.mark.parametrize("n_q,n_g,k,rows,cols", SHAPES)
def test_exact_equals_full_stable_sort_with_ties(n_q, n_g, k, rows, cols):
    rng = np.random.default_rng(n_q + n_g + k)
    q, g = small_ints(rng, n_q), small_ints(rng, n_g)
    ref_s, ref_i = full_sort(q, g, k)
    scores, idx = search_topk(q, g, k, chunk_rows=rows, chunk_cols=cols)
    assert scores.dtype == np.float32 and idx.dtype == np.int64 and idx.shape == (n_q, k)
    assert np.array_equal(idx, ref_i)  # ties go to the lower gallery index, whatever the chunking
    assert np.array_equal(scores, ref_s.astype(np.float32))


@pytest.mark.parametrize("n_q,n_g,k", [(200, 3000, 10), (17, 40, 40), (100, 1000, 1)])
def test_exact_equals_full_argsort_on_random_unit_vectors(n_q, n_g, k):
    rng = np.random.default_rng(k)
    q, g = unit(rng, n_q, 32), unit(rng, n_g, 32)
    sim = q @ g.T
    ref = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    scores, idx = search_topk(q, g, k, chunk_rows=64, chunk_cols=256)
    assert np.allclose(scores, np.take_along_axis(sim, ref, axis=1), atol=1e-5)
    # float32 sums may differ in the last bit between block shapes; positions may swap only on such near-ties
    differ = idx != ref
    assert differ.mean() < 0.001
    assert np.allclose(np.take_along_axis(sim, idx, axis=1)[differ], np.take_along_axis(sim, ref, axis=1)[differ], atol=1e-6)


def test_every_later_chunk_beating_the_threshold_takes_the_dense_path():
    """Scores that grow with the gallery index: each new chunk replaces the whole running top-k."""
    q = np.ones((5, 4), np.float32)
    g = np.repeat(np.arange(3000, dtype=np.float32)[:, None] / 64, 4, axis=1)
    scores, idx = search_topk(q, g, 10, chunk_cols=100)
    assert idx.tolist() == [list(range(2999, 2989, -1))] * 5
    assert np.array_equal(idx, full_sort(q, g, 10)[1])


def test_memory_stays_within_the_budget_not_the_matrix():
    rng = np.random.default_rng(0)
    q, g = unit(rng, 2000, 16), unit(rng, 20000, 16)  # the full float32 matrix would be 160 MB
    budget = 8 * 2**20
    rows, cols = chunk_shape(2000, 20000, 10, budget)
    assert rows * cols * 14 <= budget
    tracemalloc.start()
    search_topk(q, g, 10, memory_budget_bytes=budget)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 3 * budget, f"peak {peak / 2**20:.1f} MB"


def test_k_out_of_range_and_bad_input_fail_with_one_line():
    rng = np.random.default_rng(1)
    q, g = unit(rng, 4, 8), unit(rng, 6, 8)
    with pytest.raises(KitError, match="k=7 must be between 1 and the gallery size 6"):
        search_topk(q, g, 7)
    with pytest.raises(KitError, match="k=0"):
        search_topk(q, g, 0)
    with pytest.raises(KitError, match="8-d but gallery embeddings 5-d"):
        search_topk(q, g[:, :5], 3)
    bad = q.copy()
    bad[1, 2] = np.nan
    with pytest.raises(KitError, match="query embeddings: 1 NaN"):
        search_topk(bad, g, 3)
    with pytest.raises(KitError, match="'annoy': unknown; use one of exact, faiss"):
        search_topk(q, g, 3, backend="annoy")
    full_s, full_i = search_topk(q, g, 6)  # k == gallery size: the whole order
    assert sorted(full_i[0].tolist()) == list(range(6)) and np.all(np.diff(full_s, axis=1) <= 0)


def test_missing_faiss_names_the_install_command(monkeypatch):
    monkeypatch.setattr(search, "has_faiss", False)
    q = np.eye(3, dtype=np.float32)
    with pytest.raises(KitError, match=r"pip install faiss-cpu==.*or use --search-backend exact"):
        search_topk(q, q, 2, backend="faiss")


@needs_faiss
@pytest.mark.parametrize("n_q,n_g,k", [(60, 500, 10), (30, 40, 40), (200, 2000, 100)])
def test_faiss_equals_exact_up_to_exact_ties(n_q, n_g, k):
    rng = np.random.default_rng(n_g)
    q, g = small_ints(rng, n_q), small_ints(rng, n_g)
    s_exact, i_exact = search_topk(q, g, k, chunk_rows=16, chunk_cols=128)
    s_faiss, i_faiss = search_topk(q, g, k, backend="faiss")
    assert np.array_equal(s_faiss, s_exact)  # integer dot products: exact in both
    sim = q.astype(np.float64) @ g.T.astype(np.float64)
    assert np.array_equal(np.take_along_axis(sim, i_faiss, axis=1), s_faiss)  # FAISS's scores are its indices' scores
    kth = s_exact[:, -1:]
    above = s_exact > kth  # strictly above the k-th score: no tie can change these
    assert np.array_equal(i_faiss[above], i_exact[above])
    assert all(len(set(row)) == k for row in i_faiss.tolist())


@needs_faiss
def test_faiss_equals_exact_on_random_unit_vectors():
    rng = np.random.default_rng(3)
    q, g = unit(rng, 300, 64), unit(rng, 4000, 64)
    s_exact, i_exact = search_topk(q, g, 10)
    s_faiss, i_faiss = search_topk(q, g, 10, backend="faiss")
    assert np.allclose(s_faiss, s_exact, atol=1e-5)
    assert (i_faiss == i_exact).mean() > 0.999


def test_benchmark_runs_each_method_in_its_own_process(tmp_path):
    """bench_topk.py end to end at a tiny size: rows for each method, the subset marked, lists agreeing."""
    from benchmarks.scale import bench_topk

    out = tmp_path / "bench.md"
    code = bench_topk.main(["--sizes", "400", "--methods", "exact", "argsort", "--dim", "16", "--subset-from", "400",
                            "--query-subset", "250", "--fuse-sizes", "300", "--fuse-candidates", "20", "--out", str(out)])
    assert code == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 400") or line.startswith("| 300")]
    assert len(rows) == 3, out.read_text()
    exact, argsort, fused = (r.split(" | ") for r in rows)
    assert "(extrapolated)" in exact[3] and exact[2] == "250"
    assert argsort[-1].rstrip(" |") == "1.000"  # the full sort's lists equal the exact search's
    assert "fuse_topk" in fused[1] and float(fused[5]) > 0  # a peak RSS was read from the child
