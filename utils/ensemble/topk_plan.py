"""The ensemble in the top-k run form: weights searched on the candidate unions, then fused.

When member runs hold embeddings and top-K candidates instead of full matrices
(:mod:`utils.runs.topk_run`), each validation query's candidates are the union of
the members' top-K; every member scores each candidate exactly from its
embeddings, the scores are normalised per query by the fusion, and the weight
search ranks within those rows as it ranks full matrices. A right answer outside
every member's top-K counts as a miss. Re-ranking needs the full matrix and is
not available in this form.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from utils.ensemble.plan import val_identities
from utils.ensemble.weight_search import CandidateScorer, SearchResult, search_weights
from utils.errors import KitError
from utils.runs.topk_run import align_topk, candidate_matrices, ensemble_topk, load_topk_split

log = logging.getLogger(__name__)


def search_topk(dirs: list[Path], fusions: Sequence[str], fixed: Sequence[float] | None, search: dict) -> tuple[str, np.ndarray, dict[str, float]]:
    """The best fusion and weights on the validation candidate unions; the score of each fusion."""
    val = align_topk([load_topk_split(d, "val") for d in dirs])
    q_ids, g_ids = val_identities(val[0].query_names), val_identities(val[0].gallery_names)
    best: tuple[float, str, np.ndarray] | None = None
    scores = {}
    for fusion in fusions:
        cm = candidate_matrices(val, fusion)
        scorer = CandidateScorer(cm.mats, cm.relevance(q_ids, g_ids), top_m=search["top_m"])
        if fixed:
            w = np.asarray(fixed, np.float64) / sum(fixed)
            score = float(scorer.points(w[None, :])[0].mean())
        else:
            result: SearchResult = search_weights(scorer, grid_step=search["grid_step"], n_random=search["n_random"],
                                                  n_boot=search["bootstrap"], seed=search["seed"], smooth_radius=search["smooth_radius"],
                                                  desc=f"{fusion} weights (top-k form)")
            w, score = result.weights, result.score
        scores[fusion] = score
        if best is None or score > best[0]:
            best = (score, fusion, w)
    if best is None:
        raise KitError("no fusion to try")
    return best[1], best[2], scores


def fuse_topk_runs(dirs: list[Path], out_dir: Path, fusions: Sequence[str], fixed: Sequence[float] | None, search: dict,
                   meta: dict) -> dict:
    """Search (or take) the weights, fuse both splits into ``out_dir`` as a fused top-k run; returns the choice."""
    fusion, weights, scores = search_topk(dirs, fusions, fixed, search)
    log.info("top-k form: %s fusion, weights %s (validation score %s)", fusion,
             ", ".join(f"{d.name} {w:.2f}" for d, w in zip(dirs, weights)), f"{scores[fusion]:.2f}")
    choice = {"fusion": fusion, "weights": [float(w) for w in weights], "members": [d.name for d in dirs],
              "val_score_by_fusion": scores, "form": "topk"}
    ensemble_topk(dirs, weights, fusion, out_dir, meta={**meta, "choice": choice})
    return choice
