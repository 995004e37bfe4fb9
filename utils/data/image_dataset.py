"""A torch Dataset over image files that never dies on a broken file.

Each item is ``(tensor, label, ok, error)``. A file that cannot be read gives
a blank tensor of the right shape, ``ok=False`` and the error line, so the
caller decides: training drops it from the batch and logs it once; embedding
query/gallery images stops with that line.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset

from utils.data.images import ImageError, load_image

log = logging.getLogger(__name__)

Transform = Callable[[Image.Image], torch.Tensor]


class ImageDataset(Dataset):
    """Images from ``paths`` through ``transform``; ``labels`` optional (default -1).

    ``epoch`` and ``seed`` make random augmentation reproducible: each item is
    drawn from a seed of (seed, epoch, index), whatever worker loads it.
    """

    def __init__(self, paths: list[Path], transform: Transform, labels: list[int] | None = None, seed: int = 0):
        self.paths = [Path(p) for p in paths]
        self.transform = transform
        self.labels = labels if labels is not None else [-1] * len(self.paths)
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.paths)

    def _seed_transform(self, index: int) -> None:
        set_seed = getattr(self.transform, "set_random_seed", None)
        if set_seed is not None:
            set_seed((self.seed * 1_000_003 + self.epoch * 100_003 + index) % 2**31)

    def __getitem__(self, index: int):
        self._seed_transform(index)
        try:
            x = self.transform(load_image(self.paths[index]))
            return x, self.labels[index], True, ""
        except ImageError as err:
            blank = self.transform(Image.new("RGB", (64, 64)))
            return torch.zeros_like(blank), self.labels[index], False, str(err)


def log_unreadable(ok: torch.Tensor, errors: list[str], seen: set[str]) -> None:
    """Log each unreadable training image of a batch once per run (``seen`` keeps track)."""
    for e, good in zip(errors, ok.tolist()):
        if not good and e not in seen:
            seen.add(e)
            log.warning("skipping training image %s", e)
