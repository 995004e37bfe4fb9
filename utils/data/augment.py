"""Albumentations pipelines as PIL -> tensor callables, seedable per item."""

from __future__ import annotations

import albumentations as A
import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class AlbumentationsTransform:
    """Wrap an ``A.Compose`` so it takes a PIL image and returns a CHW float tensor."""

    def __init__(self, compose: A.Compose):
        self.compose = compose

    def set_random_seed(self, seed: int) -> None:
        self.compose.set_random_seed(seed)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        out = self.compose(image=np.asarray(img))["image"]
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


def train_transform(
    size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, strength: float = 1.0
) -> AlbumentationsTransform:
    """Crops, flips and colour/style changes that mimic the real/synthetic gap."""
    s = strength
    return AlbumentationsTransform(
        A.Compose(
            [
                A.RandomResizedCrop(size=(size, size), scale=(0.6, 1.0), ratio=(0.8, 1.25)),
                A.HorizontalFlip(p=0.5),
                A.Affine(rotate=(-10, 10), p=0.3 * s),
                A.ColorJitter(0.3 * s, 0.3 * s, 0.3 * s, 0.05 * s, p=0.8),
                A.ToGray(p=0.2 * s),
                A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.GaussNoise(), A.Posterize()], p=0.3 * s),
                A.Normalize(mean=mean, std=std),
            ],
            seed=0,
        )
    )


def eval_transform(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> AlbumentationsTransform:
    """Resize to a square and normalise: what validation and test images get."""
    return AlbumentationsTransform(
        A.Compose([A.Resize(size, size), A.Normalize(mean=mean, std=std)], seed=0)
    )
