"""Pair-based metric losses from pytorch-metric-learning, for fine-tuning a backbone directly.

Unlike a classification head or ArcFace (:mod:`utils.training.margin_loss`),
these hold no per-identity weights: they pull images of one identity together
(real and synthetic alike, since an M-per-class batch mixes them) and push
others apart, so the embedding the matrices use is what is trained. Each comes
with pml's usual miner. Called as ``loss(embeddings, labels)`` in float32.

    >>> loss = build_pair_loss("multi-similarity")
"""

from __future__ import annotations

import torch
from pytorch_metric_learning import losses, miners
from torch import nn

from utils.errors import KitError

PAIR_LOSSES = ("contrastive", "multi-similarity", "triplet")


class MinedLoss(nn.Module):
    """A pml loss fed the pairs or triplets its miner picks (all of them without a miner)."""

    def __init__(self, loss: nn.Module, miner: nn.Module | None = None):
        super().__init__()
        self.loss, self.miner = loss, miner

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pairs = self.miner(emb, labels) if self.miner is not None else None
        return self.loss(emb, labels, pairs)


def build_pair_loss(kind: str) -> MinedLoss:
    """``contrastive`` (pos margin 0, neg margin 0.5 on cosine distance of unit vectors),
    ``multi-similarity`` (Wang et al. 2019, with its miner) or ``triplet`` (margin 0.1, semi-hard mining).

    Raises:
        KitError: unknown kind.
    """
    if kind == "contrastive":
        return MinedLoss(losses.ContrastiveLoss(pos_margin=0.0, neg_margin=0.5))
    if kind == "multi-similarity":
        return MinedLoss(losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5), miners.MultiSimilarityMiner(epsilon=0.1))
    if kind == "triplet":
        return MinedLoss(losses.TripletMarginLoss(margin=0.1), miners.TripletMarginMiner(margin=0.1, type_of_triplets="semihard"))
    raise KitError(f"--loss {kind!r}: choose from {PAIR_LOSSES}")
