"""Batched image embedding with test-time augmentation and an on-disk cache.

One DataLoader pass per image set; the model sees whole batches. TTA views
are tensor functions applied to the batch (e.g. a horizontal flip); the
embeddings of all views are averaged, then L2-normalised.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from utils.atomic import atomic_save_npy
from utils.data.image_dataset import ImageDataset, Transform
from utils.errors import KitError
from utils.progress import ProgressBar

log = logging.getLogger(__name__)

View = Callable[[torch.Tensor], torch.Tensor]

TTA_VIEWS: dict[str, View] = {
    "id": lambda x: x,
    "flip": lambda x: torch.flip(x, dims=[3]),
}


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def files_key(paths: Sequence[Path], extra: str) -> str:
    """A key that changes when any file (name, size, mtime) or ``extra`` changes."""
    h = hashlib.sha256(extra.encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def embed_images(
    forward: Callable[[torch.Tensor], torch.Tensor],
    paths: Sequence[Path],
    transform: Transform,
    *,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 2,
    views: Sequence[str] = ("id",),
    amp: torch.dtype | None = None,
    desc: str = "embedding",
    cache_dir: Path | None = None,
    cache_tag: str = "",
) -> np.ndarray:
    """Embed ``paths`` in batches; returns (n, d) float32, L2-normalised.

    Args:
        forward: batch (B, C, H, W) on ``device`` -> embeddings (B, d).
        views: TTA view names from :data:`TTA_VIEWS`, averaged.
        cache_dir: if given, reuse embeddings saved there for the same files,
            views and ``cache_tag`` (which should identify the model weights).

    Raises:
        KitError: an image cannot be read (query and gallery need every one).
    """
    for v in views:
        if v not in TTA_VIEWS:
            raise KitError(f"unknown TTA view {v!r}; choose from {sorted(TTA_VIEWS)}")
    paths = [Path(p) for p in paths]
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"emb_{files_key(paths, cache_tag + '|' + ','.join(views))}.npy"
        if cache.is_file():
            log.info("%s: %d embeddings from cache %s", desc, len(paths), cache.name)
            return np.load(cache)
    loader = DataLoader(
        ImageDataset(paths, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    chunks = []
    with ProgressBar(desc, total=len(paths)) as bar:
        for x, _, ok, err in loader:
            if not bool(ok.all()):
                bad = [e for e, good in zip(err, ok.tolist()) if not good]
                raise KitError(bad[0])
            x = x.to(device, non_blocking=True)
            acc = None
            for v in views:
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    e = forward(TTA_VIEWS[v](x)).float()
                e = torch.nn.functional.normalize(e, dim=1)
                acc = e if acc is None else acc + e
            chunks.append(acc.cpu().numpy())
            bar.advance(len(x))
    out = l2_normalize(np.concatenate(chunks))
    if cache is not None:
        atomic_save_npy(cache, out)
    return out


def cosine_similarity(query_emb: np.ndarray, gallery_emb: np.ndarray) -> np.ndarray:
    """Dot products of L2-normalised embeddings, float32."""
    return (query_emb @ gallery_emb.T).astype(np.float32)
