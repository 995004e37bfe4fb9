"""Cosine similarity matrices of L2-normalised embeddings: a run's ``val`` and ``test`` matrices.

    sims = similarities({"val_query": q, "val_gallery": g, "test_query": tq, "test_gallery": tg})
    sims["val"].shape  # (len(q), len(g)), float32
"""

from __future__ import annotations

import numpy as np


def cosine_similarity(query_emb: np.ndarray, gallery_emb: np.ndarray) -> np.ndarray:
    """Dot products of L2-normalised embeddings, float32 (no extra copy of the matrix)."""
    sim = np.asarray(query_emb, dtype=np.float32) @ np.asarray(gallery_emb, dtype=np.float32).T
    return sim.astype(np.float32, copy=False)


def similarities(emb: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The validation and test query x gallery cosine matrices of the four embedding sets."""
    return {
        "val": cosine_similarity(emb["val_query"], emb["val_gallery"]),
        "test": cosine_similarity(emb["test_query"], emb["test_gallery"]),
    }
