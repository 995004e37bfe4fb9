"""The projection head that maps backbone features to the retrieval embedding.

The seed's head ended in a ReLU before L2-normalisation, so every embedding
lay in the positive orthant and no two images could have a negative cosine:
half of the angular range that ArcFace works with was gone. These heads end
in a linear map (or BatchNorm), so embeddings can point anywhere.

    >>> head = ProjectionHead(768, 1024, kind="mlp")  # Linear-BN-GELU-Linear
    >>> head = ProjectionHead(768, 1024, kind="linear")  # Linear-BN
"""

from __future__ import annotations

from torch import nn

from utils.errors import KitError

HEAD_KINDS = ("mlp", "linear")


class ProjectionHead(nn.Sequential):
    """``mlp``: Linear-BN-GELU-Linear (hidden size = ``out_dim``); ``linear``: Linear-BN. No activation at the end.

    Raises:
        KitError: unknown ``kind``.
    """

    def __init__(self, in_dim: int, out_dim: int, kind: str = "mlp"):
        if kind == "mlp":
            layers = [nn.Linear(in_dim, out_dim), nn.BatchNorm1d(out_dim), nn.GELU(), nn.Linear(out_dim, out_dim)]
        elif kind == "linear":
            layers = [nn.Linear(in_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim)]
        else:
            raise KitError(f"--head {kind!r}: choose from {HEAD_KINDS}")
        super().__init__(*layers)
        self.out_dim = out_dim
