"""The step every model script ends with: embed the four image sets, then two cosine matrices.

A script supplies ``embed_set(paths, desc) -> (n, d) L2-normalised array``
(its model, transform, views and cache); this module runs it over the task's
validation and test queries and galleries in a fixed order and compares them:

    emb = embed_task(task, embed_set)
    write_model_run(run_dir, name, config, task, similarities(emb), timings)

:func:`val_score` is the per-epoch validation the training loop calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from utils.data.task import Task
from utils.runs.cosine import cosine_similarity, similarities
from utils.runs.metrics import split_relevance, topk_scores

__all__ = ["SETS", "EmbedSet", "embed_task", "similarities", "val_score"]

SETS = ("val_query", "val_gallery", "test_query", "test_gallery")

EmbedSet = Callable[[Sequence[Path], str], np.ndarray]


def embed_task(task: Task, embed_set: EmbedSet, sets: Sequence[str] = SETS) -> dict[str, np.ndarray]:
    """``embed_set`` over each image set of ``task``, keyed by set name."""
    return {which: embed_set(getattr(task, which), which.replace("_", " ")) for which in sets}


def val_score(task: Task, embed_set: EmbedSet) -> float:
    """The competition score on the validation split (``embed_set`` should skip TTA and caches)."""
    q = embed_set(task.val_query, "val queries")
    g = embed_set(task.val_gallery, "val gallery")
    return topk_scores(cosine_similarity(q, g), split_relevance(task, "val"))["score"]
