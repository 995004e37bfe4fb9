"""The ensemble's recipe (fusion, weights, re-ranking): scored and chosen on validation, applied to any split.

A :class:`Plan` turns the member models' matrices of one split into one
matrix: transform each (``utils.ensemble.fusion``), add them with weights, re-rank
(``utils.ensemble.rerank``). :func:`choose_plan` searches the weights
(``utils.ensemble.weight_search``) for each fusion to try, then the re-ranking steps,
and records every option it scored as an :class:`Option` row (validation
bootstrap mean and spread, plain score, and the test score where a ground
truth exists, which is only reported, never used to choose).

With ``auto``, every fusion is tried (z-score stays unless another one beats
it in at least ``min_win`` of the paired bootstrap resamples) and re-ranking is chosen greedily: first
the best of none / dba / qe / dba+qe / kr, then dual-softmax or Sinkhorn at a
few temperatures on top. A re-ranking is kept only if it beats the plain fusion
in at least ``min_win`` of the paired bootstrap resamples, so a lucky gain on
a small validation split is not taken. A tie is no win: a change that moves one
query appears in only about 1 - 1/e (0.63) of the resamples, below the default 0.75.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np

from utils.data.split import identity_of
from utils.ensemble.fusion import FUSIONS, fuse
from utils.ensemble.rerank import RerankParams, rerank
from utils.ensemble.weight_search import (
    CandidateScorer,
    SearchResult,
    bootstrap_counts,
    bootstrap_stats,
    points_from_rank,
    search_weights,
)
from utils.errors import KitError
from utils.runs.metrics import first_hit_rank

log = logging.getLogger(__name__)

AUTO_TEMPERATURES = (0.5, 1.0, 2.0)


@dataclass
class Plan:
    """How member matrices become the ensemble's matrix."""

    fusion: str
    weights: list[float]
    rerank: RerankParams = field(default_factory=RerankParams)

    def apply(self, sims: list[np.ndarray]) -> np.ndarray:
        """The fused and re-ranked matrix of one split (members in the plan's order)."""
        return rerank(fuse(sims, np.asarray(self.weights, dtype=np.float32), self.fusion), self.rerank)

    def to_dict(self) -> dict:
        return {"fusion": self.fusion, "weights": [float(w) for w in self.weights], "rerank": dataclasses.asdict(self.rerank),
                "rerank_label": self.rerank.label()}


@dataclass
class Option:
    """One scored row of the report."""

    label: str
    kind: str  # "model", "seed fusion", "fusion", "re-rank"
    weights: str
    val_mean: float
    val_std: float
    val_score: float
    test_score: float | None = None
    chosen: bool = False
    plan: Plan | None = None
    points: np.ndarray | None = field(default=None, repr=False)  # per-query validation points

    def to_dict(self) -> dict:
        return {"label": self.label, "kind": self.kind, "weights": self.weights, "val_mean": round(self.val_mean, 3), "val_std": round(self.val_std, 3),
                "val_score": round(self.val_score, 3), "test_score": None if self.test_score is None else round(self.test_score, 3),
                "chosen": self.chosen}


def val_relevance(query_names: list[str], gallery_names: list[str]) -> np.ndarray:
    """Validation ground truth from the names (``train/<identity>/<image>``): same identity folder.

    Raises:
        KitError: a name does not look like ``train/<identity>/<image>``.
    """
    q = val_identities(query_names)
    g = val_identities(gallery_names)
    return q[:, None] == g[None, :]


def val_identities(names: list[str]) -> np.ndarray:
    """The identity folder of each validation name (``train/<identity>/<image>``).

    Raises:
        KitError: a name does not look like ``train/<identity>/<image>``.
    """
    return np.array([identity_of(n) for n in names])


@dataclass
class Scorer:
    """Scores matrices on validation (bootstrap) and on test (if ground truth), with shared resamples."""

    val_rel: np.ndarray
    test_rel: np.ndarray | None
    n_boot: int = 200
    seed: int = 0
    groups: np.ndarray | None = None  # identity of each validation query: resample identities, not queries

    def __post_init__(self):
        self.counts = bootstrap_counts(self.val_rel.shape[0], self.n_boot, self.seed, self.groups)

    def points(self, sim: np.ndarray) -> np.ndarray:
        return points_from_rank(first_hit_rank(sim, self.val_rel, 10))

    def test(self, sim_fn) -> float | None:
        """Test score of the matrix ``sim_fn()`` builds (built only when a ground truth exists)."""
        if self.test_rel is None:
            return None
        return float(points_from_rank(first_hit_rank(sim_fn(), self.test_rel, 10)).mean())

    def option(self, label: str, kind: str, points: np.ndarray, test_score: float | None, plan: Plan | None) -> Option:
        mean, std = bootstrap_stats(points, self.counts)
        weights = "/".join(f"{w:.2f}" for w in plan.weights) if plan is not None else ""
        return Option(label, kind, weights, float(mean[0]), float(std[0]), float(points.mean()), test_score, plan=plan, points=points)

    def win_rate(self, a: Option, b: Option) -> float:
        """Share of bootstrap resamples in which ``a`` scores strictly above ``b`` (a tie is no win)."""
        diff = (a.points - b.points) @ self.counts.T
        return float((diff > 0).mean())


def baseline_options(names: list[str], val: list[np.ndarray], test: list[np.ndarray] | None, scorer: Scorer) -> list[Option]:
    """Each model alone, and the seed's fusion: z-scored sum, weights in proportion to the single-model val scores."""
    rows = []
    for i, name in enumerate(names):
        pts = scorer.points(val[i])
        rows.append(scorer.option(name, "model", pts, scorer.test(lambda i=i: test[i]), Plan("zscore", [float(j == i) for j in range(len(names))])))
    if len(names) > 1:
        if len(names) == 2:  # the seed's hard-coded 0.7 / 0.3, the larger weight on the better model
            better = int(rows[1].val_score > rows[0].val_score)
            w = [0.3, 0.3]
            w[better] = 0.7
        else:
            s = np.array([max(r.val_score, 1e-9) for r in rows])
            w = list(s / s.sum())
        plan = Plan("zscore", [float(x) for x in w])
        rows.append(scorer.option("seed fusion", "seed fusion", scorer.points(plan.apply(val)),
                                  scorer.test(lambda: plan.apply(test)), plan))
    return rows


def search_fusion(fusion: str, val: list[np.ndarray], scorer: Scorer, search: dict) -> SearchResult:
    """Weight search for one fusion on the validation matrices."""
    cs = CandidateScorer(val, scorer.val_rel, top_m=search.get("top_m", 50), fusion=fusion)  # rows transformed as read
    return search_weights(cs, grid_step=search.get("grid_step", 0.05), n_random=search.get("n_random", 2000),
                          n_boot=scorer.n_boot, seed=scorer.seed, groups=scorer.groups, smooth_radius=search.get("smooth_radius", 0.2),
                          desc=f"weights {fusion}")


def auto_rerank_grid(base: RerankParams) -> list[list[RerankParams]]:
    """The two greedy stages of --auto: structural steps, then a two-way normalisation on top."""
    rp = lambda *steps, **kw: dataclasses.replace(base, steps=tuple(steps), **kw)
    stage1 = [rp("dba"), rp("qe"), rp("dba", "qe"), rp("kr")]
    stage2 = [rp(s, temperature=t) for s in ("dual_softmax", "sinkhorn") for t in AUTO_TEMPERATURES]
    return [stage1, stage2]


def choose_plan(
    names: list[str],
    val: list[np.ndarray],
    test: list[np.ndarray] | None,
    scorer: Scorer,
    *,
    fusions: tuple[str, ...],
    weights: list[float] | None,
    rerank_params: RerankParams,
    auto: bool,
    min_win: float,
    search: dict,
) -> tuple[Plan, list[Option], dict[str, SearchResult]]:
    """Score the options on validation and pick the plan (see the module doc)."""
    for f in fusions:
        if f not in FUSIONS:
            raise KitError(f"--fusion {f!r}: unknown; use one of {', '.join(FUSIONS)}")
    rows = baseline_options(names, val, test, scorer)
    searches: dict[str, SearchResult] = {}
    fusion_rows = []
    for f in fusions:
        if weights is not None:
            w = list(weights)
            label = f"{f} fixed weights"
        elif len(names) == 1:
            w = [1.0]
            label = f"{f} (one model)"
        else:
            searches[f] = res = search_fusion(f, val, scorer, search)
            w = [float(x) for x in res.weights]
            label = f"{f} searched"
        plan = Plan(f, w)
        fusion_rows.append(scorer.option(label, "fusion", scorer.points(plan.apply(val)), scorer.test(lambda p=plan: p.apply(test)), plan))
    rows += fusion_rows
    best = fusion_rows[0]  # the first fusion (zscore with --auto) unless another wins clearly
    for r in fusion_rows[1:]:
        if r.val_mean > best.val_mean and scorer.win_rate(r, best) >= min_win:
            best = r
    base_plan = best.plan
    if auto:
        chosen = best
        for stage in auto_rerank_grid(rerank_params):
            stage_rows = [_rerank_option(base_plan, p, chosen.plan.rerank, val, test, scorer) for p in stage]
            rows += stage_rows
            top = max(stage_rows, key=lambda r: r.val_mean)
            if top.val_mean > chosen.val_mean and scorer.win_rate(top, chosen) >= min_win:
                chosen = top
        plan = chosen.plan
    elif rerank_params.steps:
        chosen = _rerank_option(base_plan, rerank_params, RerankParams(), val, test, scorer)
        rows.append(chosen)
        plan = chosen.plan
    else:
        chosen, plan = best, base_plan
    chosen.chosen = True
    if auto:
        warn_if_saturated(rows, chosen, scorer.val_rel.shape[0])
    return plan, rows, searches


def warn_if_saturated(rows: list[Option], chosen: Option, n_queries: int) -> None:
    """A warning when several fusions or re-rankings reach the full score: validation cannot rank them."""
    full = [r for r in rows if r.kind in ("fusion", "re-rank") and r.val_score >= 1000.0 - 1e-6]
    if len(full) > 1:
        log.warning("validation saturates: %d fusions and re-rankings score 1000 on its %d queries, so --auto cannot tell "
                    "them apart (kept: %s). More validation identities (a larger --val-fraction in the model scripts) "
                    "give it something to measure", len(full), n_queries, chosen.label)


def _rerank_option(base: Plan, params: RerankParams, before: RerankParams, val, test, scorer: Scorer) -> Option:
    """``params`` steps added after the ``before`` steps, on the base plan's fusion and weights."""
    steps = tuple(dict.fromkeys(before.steps + params.steps))
    p = dataclasses.replace(params, steps=steps)
    plan = Plan(base.fusion, base.weights, p)
    label = f"{base.fusion} + {p.label()}"
    log.info("re-ranking on validation: %s", label)
    return scorer.option(label, "re-rank", scorer.points(plan.apply(val)), scorer.test(lambda: plan.apply(test)), plan)
