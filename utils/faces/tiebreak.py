"""A validation that can tell recipes apart: when options tie at the top of validation, a harder one decides.

The plain validation of a strong face model saturates (every option scores 1000), so a choice among
tied options falls to a fixed tie-break. :func:`break_tie` scores the tied options on a harder
validation instead and reports how many of its queries separate the chosen option from the
runner-up (their average precision differs); fewer than :data:`MIN_SEPARATING` is warned about:
the choice then rests on a handful of queries.

:func:`harder_face_validation` builds that harder validation from the validation identities (the
kit's validation split holds training identities): its queries and gallery, plus renders of each
query photo in styles held out from training (:data:`utils.faces.styles.VALIDATION_STYLES`), relevant
to the other photos of the same person (a render of the query photo itself is ranked last and not
relevant), and optional distractors (other identities' images, e.g. the adapter's training images).

For other scripts (``ensemble.py --auto``)::

    from utils.faces.tiebreak import break_tie, tied_at_top
    tied = tied_at_top(val_metrics)                                     # names at the top score
    if len(tied) > 1:
        result = break_tie(tied, lambda name: hard_sim[name], hard_rel, "ensemble --auto")
        choice = result.chosen                                          # result.record() for meta.json
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from utils.errors import KitError
from utils.runs.metrics import average_precision, evaluate

log = logging.getLogger(__name__)

MIN_SEPARATING = 5  # fewer separating queries than this: the choice is warned about


def rank_key(m: dict[str, float]) -> float:
    """The competition score, ties broken by mAP@All (score steps exceed 1e-3)."""
    return m["score"] + 1e-3 * m["map_all"]


def tied_at_top(metrics: dict[str, dict[str, float]]) -> list[str]:
    """The options whose validation score equals the best one's, in the given order."""
    if not metrics:
        raise KitError("no options to choose from")
    top = max(m["score"] for m in metrics.values())
    return [name for name, m in metrics.items() if m["score"] >= top]


def separating_queries(sim_a: np.ndarray, sim_b: np.ndarray, rel: np.ndarray) -> int:
    """How many queries rank their relevant images differently under ``sim_a`` and ``sim_b`` (their AP differs)."""
    ap_a, ap_b = average_precision(sim_a, rel), average_precision(sim_b, rel)
    return int(np.sum(np.abs(np.nan_to_num(ap_a) - np.nan_to_num(ap_b)) > 1e-9))


@dataclass
class TieBreak:
    """The harder validation's verdict among options tied on the plain one."""

    chosen: str
    runner_up: str
    separating: int  # harder validation queries whose AP differs between chosen and runner-up
    n_queries: int
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def weak(self) -> bool:
        return self.separating < MIN_SEPARATING

    def record(self) -> dict:
        """For meta.json."""
        return {"chosen": self.chosen, "runner_up": self.runner_up, "separating_queries": self.separating, "queries": self.n_queries,
                "weak": self.weak, "harder_val": {n: {k: round(float(v), 4) for k, v in m.items()} for n, m in self.metrics.items()}}


def break_tie(tied: Sequence[str], hard_sim: Callable[[str], np.ndarray], hard_rel: np.ndarray, what: str) -> TieBreak:
    """Of ``tied`` options (in the caller's order of preference: the first wins equal scores), the best by
    the competition score on the harder validation ``hard_sim(name)`` x ``hard_rel`` (mAP is reported, not
    used: on seed 0 of the hard benchmark the harder validation tied every fusion rule at 1000 and
    mAP differed by 0.001 between the best rule and the plain view, which scores 35 lower on test);
    warns when fewer than :data:`MIN_SEPARATING` queries separate it from the runner-up (their AP differs).

    Raises:
        KitError: fewer than two options.
    """
    if len(tied) < 2:
        raise KitError(f"{what}: a tie needs two or more options, not {list(tied)}")
    sims = {name: hard_sim(name) for name in tied}
    metrics = {name: evaluate(s, hard_rel) for name, s in sims.items()}
    order = sorted(tied, key=lambda n: -metrics[n]["score"])  # stable: options the harder score cannot tell apart keep the caller's order
    chosen, runner_up = order[0], order[1]
    sep = separating_queries(sims[chosen], sims[runner_up], hard_rel)
    result = TieBreak(chosen, runner_up, sep, int(hard_rel.shape[0]), metrics)
    log.info("%s: %d options tie on validation; the harder validation (%d queries) chooses %s (score %.2f, mAP %.3f) over %s (%.2f, %.3f); "
             "%d queries separate them", what, len(tied), hard_rel.shape[0], chosen, metrics[chosen]["score"], metrics[chosen]["map_all"],
             runner_up, metrics[runner_up]["score"], metrics[runner_up]["map_all"], sep)
    if result.weak:
        log.warning("%s: only %d harder validation queries separate %s from %s (fewer than %d): the choice rests on too few queries",
                    what, sep, chosen, runner_up, MIN_SEPARATING)
    return result


@dataclass
class HarderSet:
    """A harder validation: queries, gallery (plain, then each view) and relevance; ``own`` marks each
    query's own render (ranked last by :meth:`sim`)."""

    query: np.ndarray
    gallery: list[np.ndarray]
    rel: np.ndarray
    own: np.ndarray

    def sim(self, fuse_views: Callable[[np.ndarray, list[np.ndarray]], np.ndarray]) -> np.ndarray:
        """``fuse_views(query, gallery views)`` with each query's own render pushed to the end of its ranking."""
        s = fuse_views(self.query, self.gallery).astype(np.float64)
        return np.where(self.own, s.min() - 1.0, s)


def harder_face_validation(query: np.ndarray, query_labels: np.ndarray, gallery: list[np.ndarray], gallery_labels: np.ndarray,
                           renders: list[np.ndarray], render_src: np.ndarray,
                           distractors: list[np.ndarray] | None = None) -> HarderSet:
    """The validation queries against their gallery plus renders of the query photos (``renders``: each view's
    embeddings, plain first; ``render_src``: the query each came from) plus ``distractors`` (each view's
    embeddings of images of identities outside the validation). A render is relevant to the queries of its
    person other than its own photo."""
    if len(renders) != len(gallery) or (distractors is not None and len(distractors) != len(gallery)):
        raise KitError(f"harder validation: {len(gallery)} gallery views, {len(renders)} render views, "
                       f"{None if distractors is None else len(distractors)} distractor views: they must match")
    n_d = 0 if distractors is None else len(distractors[0])
    views = [np.concatenate([g, r, *([distractors[v]] if distractors is not None else [])]) for v, (g, r) in enumerate(zip(gallery, renders))]
    labels = np.concatenate([gallery_labels, query_labels[render_src], np.full(n_d, -1)])
    rel = query_labels[:, None] == labels[None, :]
    own = np.zeros_like(rel)
    own[render_src, len(gallery_labels) + np.arange(len(render_src))] = True
    return HarderSet(query, views, rel & ~own, own)


def mapped(hard: HarderSet, query_map: Callable[[np.ndarray], np.ndarray], gallery_map: Callable[[np.ndarray], np.ndarray]) -> HarderSet:
    """``hard`` with its query and gallery embeddings passed through a candidate's maps (e.g. an adapter), L2-normalised."""
    unit = lambda e: e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)  # noqa: E731
    return HarderSet(unit(query_map(hard.query)), [unit(gallery_map(g)) for g in hard.gallery], hard.rel, hard.own)


def face_harder_set(pipe, task, emb: dict[str, np.ndarray], gallery_views: list[np.ndarray], seed: int = 0, n_renders: int = 2,
                    distractors: np.ndarray | None = None) -> HarderSet:
    """The harder validation of a face run (``pipe``: its :class:`~utils.faces.pipeline.FacePipeline`): the validation
    split (``emb``; ``gallery_views``: the val gallery's view embeddings, or none), ``n_renders`` renders of every
    validation query photo in :data:`~utils.faces.styles.VALIDATION_STYLES` (embedded and cached like the run's
    crops), and ``distractors`` (plain embeddings of other identities' images; every view uses them as they are)."""
    from utils.faces.styles import VALIDATION_STYLES, StyleLibrary

    qnames, gnames = task.names("val_query"), task.names("val_gallery")
    ids = {i: k for k, i in enumerate(sorted({task.split.identity_of(n) for n in (*qnames, *gnames)}))}
    q_labels = np.array([ids[task.split.identity_of(n)] for n in qnames], np.int64)
    g_labels = np.array([ids[task.split.identity_of(n)] for n in gnames], np.int64)
    r_emb, r_src, _, r_views = pipe.embed_rendered(task.val_query, np.arange(len(qnames)), StyleLibrary(styles=VALIDATION_STYLES), n_renders,
                                                    seed, "val query", with_views=bool(gallery_views))
    views = [emb["val_gallery"], *gallery_views]
    return harder_face_validation(emb["val_query"], q_labels, views, g_labels, [r_emb, *r_views][: len(views)], r_src,
                                  None if distractors is None else [distractors] * len(views))
