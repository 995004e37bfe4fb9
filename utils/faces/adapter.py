"""Cross-domain adaptation of frozen face embeddings, learned from the training identities.

The training identities hold real photos (the query domain) and synthetic
images (the gallery's domains) of the same people. Two things are learned from
them, each optional:

- :class:`DomainStats`: per-domain statistics. ``center`` subtracts each
  domain's mean training embedding (queries the query domain's, gallery images
  the other domains'); ``whiten`` also multiplies by the inverse square root of
  the pooled covariance of the centred training embeddings, shrunk towards a
  multiple of the identity (``shrinkage``), since a few hundred images cannot
  fill a 128- or 512-d covariance. Re-normalised after.
- :class:`Adapter`: a residual map ``x + f(x)``, L2-normalised, with ``f`` a
  linear layer or a 2-layer MLP whose last layer starts at zero, so the
  untrained adapter is the identity. Trained with a pytorch-metric-learning
  pair loss on real<->synthetic pairs (:func:`cross_domain_pairs`): positives
  are the same person across domains, negatives other people across domains,
  which is exactly what a query meets in the gallery.

    stats = DomainStats.fit(train_emb, train_side, "whiten")
    x = stats.transform(val_query_emb, side=0)     # 0: query domain, 1: gallery domains
    y = Adapter(dim, "mlp")(torch.from_numpy(x))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils.embedding.embed import l2_normalize
from utils.errors import KitError

ADAPTERS = ("none", "linear", "mlp")
DOMAIN_STATS = ("none", "center", "whiten")


@dataclass
class DomainStats:
    """Per-side means (row 0: query domain, row 1: gallery domains) and a shared whitening map."""

    kind: str
    means: np.ndarray  # (2, d)
    whitener: np.ndarray | None  # (d, d) for whiten

    @classmethod
    def fit(cls, emb: np.ndarray, side: np.ndarray, kind: str, shrinkage: float = 0.5) -> "DomainStats":
        """Statistics of training embeddings ``emb`` (n, d) whose domain side is ``side`` (n,) in {0, 1}.

        A side without training images takes the mean of all of them.

        Raises:
            KitError: unknown kind, shrinkage outside [0, 1], or fewer than 2 images.
        """
        if kind not in DOMAIN_STATS:
            raise KitError(f"--domain-stats {kind!r}: choose from {list(DOMAIN_STATS)}")
        if not 0.0 <= shrinkage <= 1.0:
            raise KitError(f"--shrinkage {shrinkage}: between 0 and 1")
        emb = np.asarray(emb, np.float64)
        if len(emb) < 2:
            raise KitError(f"{len(emb)} training embeddings: domain statistics need at least 2")
        d = emb.shape[1]
        if kind == "none":
            return cls(kind, np.zeros((2, d)), None)
        overall = emb.mean(0)
        means = np.stack([emb[side == s].mean(0) if (side == s).any() else overall for s in (0, 1)])
        whitener = None
        if kind == "whiten":
            centred = emb - means[side]
            cov = centred.T @ centred / len(centred)
            cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / d * np.eye(d)
            vals, vecs = np.linalg.eigh(cov)
            whitener = (vecs / np.sqrt(np.maximum(vals, 1e-12))) @ vecs.T
        return cls(kind, means, whitener)

    def transform(self, emb: np.ndarray, side: int) -> np.ndarray:
        """``emb`` (n, d) of one side, centred (and whitened), L2-normalised, float32."""
        if self.kind == "none":
            return np.asarray(emb, np.float32)
        x = np.asarray(emb, np.float64) - self.means[side]
        if self.whitener is not None:
            x = x @ self.whitener
        return l2_normalize(x.astype(np.float32))

    def transform_sides(self, emb: np.ndarray, side: np.ndarray) -> np.ndarray:
        """:meth:`transform` of each row of ``emb`` with its own side (``side`` (n,) in {0, 1})."""
        out = np.empty(emb.shape, np.float32)
        for s in (0, 1):
            if (side == s).any():
                out[side == s] = self.transform(emb[side == s], s)
        return out


class Adapter(nn.Module):
    """``normalize(x + f(x))``; ``f`` is ``linear`` (d -> d) or ``mlp`` (d -> hidden -> d, GELU), zero at the start."""

    def __init__(self, dim: int, kind: str = "mlp", hidden: int = 256):
        super().__init__()
        if kind == "linear":
            self.f = nn.Linear(dim, dim)
        elif kind == "mlp":
            self.f = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        else:
            raise KitError(f"--adapter {kind!r}: choose from {list(ADAPTERS)}")
        last = self.f if kind == "linear" else self.f[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x + self.f(x), dim=1)

    @torch.inference_mode()
    def apply_np(self, emb: np.ndarray) -> np.ndarray:
        """The adapter on an (n, d) array, in eval mode; (n, d) float32."""
        self.eval()
        return self(torch.from_numpy(np.ascontiguousarray(emb, np.float32))).numpy()


def cross_domain_pairs(labels: torch.Tensor, side: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """pytorch-metric-learning's ``indices_tuple`` ``(a1, p, a2, n)`` of every ordered pair
    of a batch whose two images lie on different domain sides: positives of one identity,
    negatives of two."""
    diff = side[:, None] != side[None, :]
    same = labels[:, None] == labels[None, :]
    a1, p = torch.where(diff & same)
    a2, n = torch.where(diff & ~same)
    return a1, p, a2, n
