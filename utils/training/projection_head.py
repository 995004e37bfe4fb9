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
    """``mlp``: Linear-BN-GELU-Dropout-Linear; ``linear``: Linear-BN. No activation at the end.

    Raises:
        KitError: unknown ``kind``.
    """

    def __init__(self, in_dim: int, out_dim: int, kind: str = "mlp", hidden_dim: int = 0, dropout: float = 0.0):
        hidden = hidden_dim or out_dim
        if kind == "mlp":
            layers = [nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)]
        elif kind == "linear":
            layers = [nn.Linear(in_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim)]
        else:
            raise KitError(f"--head {kind!r}: choose from {HEAD_KINDS}")
        super().__init__(*layers)
        self.out_dim = out_dim
