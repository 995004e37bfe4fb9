"""How alike a query and its retrieved images look pixel by pixel: RMSE and SSIM.

The painting face-similarity project judged retrieval by these: every image is
shrunk to a common grey square (``size_px``), then each query is compared with
each of its top-``k`` retrieved images by root-mean-square error (0..1, lower =
closer) and scikit-image's structural similarity (-1..1, higher = closer).
They measure look, not identity: a high SSIM with a wrong identity is the
pixel similarity a retrieval model should *not* rely on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from skimage.metrics import structural_similarity

from utils.data.images import load_image
from utils.progress import track
from utils.runs.topk import topk


def grey_squares(paths: Sequence[Path], size_px: int = 64, desc: str = "images") -> np.ndarray:
    """(n, size_px, size_px) float32 in [0, 1]: each image grey, resized to a square (aspect not kept)."""
    out = np.zeros((len(paths), size_px, size_px), dtype=np.float32)
    for i, p in enumerate(track(list(paths), f"{desc}: grey {size_px} px")):
        img = load_image(p, max_side=4 * size_px).convert("L").resize((size_px, size_px), Image.Resampling.BILINEAR)
        out[i] = np.asarray(img, dtype=np.float32) / 255.0
    return out


def topk_agreement(sim: np.ndarray, query: np.ndarray, gallery: np.ndarray, k: int = 5) -> dict[str, float]:
    """Mean RMSE and SSIM between each query and its top-``k`` gallery images.

    Args:
        sim: (n_query, n_gallery) similarities, higher = more similar.
        query, gallery: grey squares from :func:`grey_squares`, in row/column order.
        k: retrieved images per query (at most the gallery size).
    """
    k = min(k, sim.shape[1])
    idx = topk(sim, k)
    rmse, ssim = [], []
    for i, cols in enumerate(idx):
        for j in cols:
            diff = query[i] - gallery[j]
            rmse.append(float(np.sqrt(np.mean(diff * diff))))
            ssim.append(float(structural_similarity(query[i], gallery[j], data_range=1.0)))
    return {"k": k, "rmse": float(np.mean(rmse)), "ssim": float(np.mean(ssim))}
