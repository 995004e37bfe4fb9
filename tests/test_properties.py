"""Property-based tests (hypothesis) of the numerical core: the competition score, top-k, the
fusions and the vectorised weight scorer, each against a plain reference on generated inputs
(many ties included: values are often drawn from a handful of integers)."""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from utils.ensemble.fusion import fuse, transform, weighted_sum
from utils.ensemble.weight_search import CandidateScorer, loop_first_hit, points_from_rank
from utils.runs.metrics import SCORE_WEIGHTS, topk_scores
from utils.runs.topk import topk

FAST = settings(max_examples=50, deadline=None, database=None)


# ---------------------------------------------------------------- strategies
def values(tied: bool):
    """Matrix entries: a few integers (many ties) or finite float32 values."""
    if tied:
        return st.integers(-3, 3).map(float)
    return st.floats(-100, 100, width=32, allow_subnormal=False)


@st.composite
def matrix(draw, max_rows: int = 8, max_cols: int = 24, min_cols: int = 1, tied: bool | None = None):
    n_q = draw(st.integers(1, max_rows))
    n_g = draw(st.integers(min_cols, max_cols))
    tied = draw(st.booleans()) if tied is None else tied
    return draw(arrays(np.float32, (n_q, n_g), elements=values(tied)))


@st.composite
def matrix_and_relevance(draw, **kw):
    sim = draw(matrix(**kw))
    rel = draw(arrays(np.bool_, sim.shape))
    return sim, rel


def reference_points(sim: np.ndarray, rel: np.ndarray) -> np.ndarray:
    """Per-query points by a plain loop: sort each row by (-value, column), find the first right answer."""
    out = []
    for row, r in zip(sim.tolist(), rel.tolist()):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))[:10]
        first = next((i for i, j in enumerate(order) if r[j]), None)
        out.append(0.0 if first is None else sum(w for k, w in SCORE_WEIGHTS.items() if first < k))
    return np.array(out)


# ---------------------------------------------------------------- the competition score
@FAST
@given(matrix_and_relevance())
def test_score_is_the_plain_loop_and_within_0_1000(case):
    sim, rel = case
    score = topk_scores(sim, rel)["score"]
    assert 0.0 <= score <= 1000.0
    assert np.isclose(score, reference_points(sim, rel).mean(), rtol=0, atol=1e-9)


@FAST
@given(matrix_and_relevance(tied=True), st.data())
def test_moving_a_right_answer_up_never_lowers_the_score(case, data):
    sim, rel = case
    assume(rel.any())
    q, g = map(int, data.draw(st.sampled_from(np.argwhere(rel).tolist())))
    better = sim.copy()
    better[q, g] += data.draw(st.integers(1, 8))
    assert topk_scores(better, rel)["score"] >= topk_scores(sim, rel)["score"]
    # and the score of that query alone never drops
    assert reference_points(better[q : q + 1], rel[q : q + 1])[0] >= reference_points(sim[q : q + 1], rel[q : q + 1])[0]


# ---------------------------------------------------------------- top-k
@st.composite
def distinct_matrix(draw, max_rows: int = 12, max_cols: int = 40, min_cols: int = 1, elements=None):
    """No two entries equal (so no ties within a row)."""
    shape = (draw(st.integers(1, max_rows)), draw(st.integers(min_cols, max_cols)))
    if elements is None:
        elements = st.floats(-100, 100, width=32, allow_subnormal=False)
    return draw(arrays(np.float32, shape, elements=elements, unique=True))


@FAST
@given(distinct_matrix(), st.data())
def test_topk_equals_a_full_stable_sort_without_ties(sim, data):
    k = data.draw(st.integers(1, sim.shape[1]))
    chunk = data.draw(st.integers(1, 16))
    np.testing.assert_array_equal(topk(sim, k, chunk_rows=chunk), np.argsort(-sim, axis=1, kind="stable")[:, :k])


@FAST
@given(matrix(max_rows=12, max_cols=40, tied=True), st.data())
def test_topk_with_ties_returns_distinct_indices_of_maximal_values(sim, data):
    k = data.draw(st.integers(1, sim.shape[1]))
    idx = topk(sim, k, chunk_rows=data.draw(st.integers(1, 16)))
    assert idx.shape == (sim.shape[0], k)
    for row, picked in zip(sim, idx):
        assert len(set(picked.tolist())) == k and ((picked >= 0) & (picked < len(row))).all()
        # the values picked are the k largest, best first
        np.testing.assert_array_equal(row[picked], np.sort(row)[::-1][:k])
    # ties go to the lower column, as documented: the same as a stable full sort
    np.testing.assert_array_equal(idx, np.argsort(-sim, axis=1, kind="stable")[:, :k])


# ---------------------------------------------------------------- fusions
def monotone(x: np.ndarray, kind: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A strictly increasing map of each row (per-row parameters a > 0 and b), exact on small integers."""
    if kind == 0:
        return a * x + b
    if kind == 1:
        return x**3 + b
    return np.exp(x / 4.0) * a - 100.0


@FAST
@given(st.data(), st.sampled_from(["rank", "rrf"]))
def test_rank_fusions_ignore_monotone_row_transforms_of_a_member(data, fusion):
    n_q, n_g = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 24))
    sims = [data.draw(arrays(np.float32, (n_q, n_g), elements=values(tied=True))) for _ in range(2)]
    a = data.draw(arrays(np.float32, (n_q, 1), elements=st.integers(1, 8).map(float)))
    b = data.draw(arrays(np.float32, (n_q, 1), elements=st.integers(-20, 20).map(float)))
    warped = monotone(sims[1].astype(np.float64), data.draw(st.integers(0, 2)), a, b).astype(np.float32)
    w = np.array([0.3, 0.7], np.float32)
    np.testing.assert_array_equal(transform(warped, fusion), transform(sims[1], fusion))
    np.testing.assert_array_equal(fuse([sims[0], warped], w, fusion), fuse(sims, w, fusion))


@FAST
@given(distinct_matrix(max_rows=8, max_cols=30, min_cols=2, elements=st.integers(-60, 60).map(float)), st.data())
def test_zscore_ignores_positive_affine_row_transforms(sim, data):
    n_q = sim.shape[0]
    a = data.draw(arrays(np.float64, (n_q, 1), elements=st.floats(0.1, 10)))
    b = data.draw(arrays(np.float64, (n_q, 1), elements=st.floats(-50, 50)))
    moved = (a * sim.astype(np.float64) + b).astype(np.float32)
    np.testing.assert_allclose(transform(moved, "zscore"), transform(sim, "zscore"), atol=2e-3)


@FAST
@given(st.data(), st.sampled_from(["zscore", "minmax", "rank", "rrf"]))
def test_scaling_the_weights_scales_the_fused_matrix_and_keeps_every_ranking(data, fusion):
    shape = (data.draw(st.integers(1, 6)), data.draw(st.integers(1, 20)))
    sims = [data.draw(arrays(np.float32, shape, elements=values(data.draw(st.booleans())))) for _ in range(3)]
    # a weight is 0 or at least 2^-40: a tiny weight times an entry underflows into float32's
    # subnormal range, where scaling by 2^k is no longer exact (e.g. w = 1e-38 gave a 1e-45 difference)
    weight = st.one_of(st.just(0.0), st.floats(2.0**-40, 1, width=32))
    w = data.draw(arrays(np.float32, 3, elements=weight))
    scale = np.float32(2.0 ** data.draw(st.integers(-4, 4)))  # a power of two scales (normal) float32 exactly
    base = fuse(sims, w, fusion)
    np.testing.assert_array_equal(fuse(sims, w * scale, fusion), base * scale)
    k = min(10, shape[1])
    np.testing.assert_array_equal(topk(fuse(sims, w * scale, fusion), k), topk(base, k))
    c = np.float32(data.draw(st.floats(0.1, 10)))  # any positive factor: equal up to float32 rounding
    np.testing.assert_allclose(fuse(sims, w * c, fusion), base * c, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the vectorised weight scorer
@settings(max_examples=60, deadline=None, database=None)
@given(st.data())
def test_vectorised_scorer_equals_the_loop_for_any_relevance_and_weights(data):
    n_models = data.draw(st.integers(1, 3))
    n_q, n_g = data.draw(st.integers(1, 10)), data.draw(st.integers(1, 40))
    tied = data.draw(st.booleans())
    mats = [data.draw(arrays(np.float32, (n_q, n_g), elements=values(tied))) for _ in range(n_models)]
    rel = data.draw(arrays(np.bool_, (n_q, n_g)))
    weights = data.draw(arrays(np.float32, (data.draw(st.integers(1, 6)), n_models),
                               elements=st.one_of(st.just(0.0), st.floats(0, 4, width=32, allow_subnormal=False))))
    top_m = data.draw(st.integers(1, n_g + 3))
    fusion = data.draw(st.sampled_from([None, "zscore", "rank", "rrf"]))  # None: mats given transformed
    scorer = CandidateScorer(mats, rel, top_m=top_m, n_blocks=data.draw(st.integers(1, 4)), fusion=fusion,
                             chunk_elems=data.draw(st.integers(1, 400)))  # small: rows read in several chunks
    fast = scorer.first_hit(weights)
    if fusion is not None:
        mats = [transform(m, fusion) for m in mats]
    np.testing.assert_array_equal(fast, loop_first_hit(mats, rel, weights))
    for w, f in zip(weights, fast):  # and the points are the kit's score of the fused matrix
        assert np.isclose(points_from_rank(f).mean(), topk_scores(weighted_sum(mats, w), rel)["score"], atol=1e-3)
