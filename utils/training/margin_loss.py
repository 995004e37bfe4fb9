"""Margin losses over training identities, from pytorch-metric-learning.

Both hold a learnable weight matrix (one column per identity, or per
sub-centre), so they need their own optimiser group and must be saved in the
checkpoint. pml's margin is in **degrees** (0.5 rad = 28.6 deg).

Compute them in float32: pml's ArcFace casts its weights to the dtype of the
embeddings it is given (a bf16 batch would silently turn the weights into bf16
for good), and acos in half precision is a known source of NaN. Call
``loss(embeddings.float(), labels)`` outside autocast.
"""

from __future__ import annotations

from pytorch_metric_learning.losses import ArcFaceLoss, SubCenterArcFaceLoss
from torch import nn

from utils.errors import KitError

LOSS_KINDS = ("arcface", "subcenter")


def build_margin_loss(
    kind: str, num_classes: int, embedding_size: int, margin_deg: float = 28.6, scale: float = 64.0, sub_centers: int = 3
) -> nn.Module:
    """ArcFace (``arcface``) or sub-centre ArcFace (``subcenter``), called as ``loss(emb, labels)``.

    Raises:
        KitError: unknown kind or a margin outside (0, 90) degrees.
    """
    if not 0.0 < margin_deg < 90.0:
        raise KitError(f"--margin-deg {margin_deg}: expected degrees in (0, 90), e.g. 28.6 (= 0.5 rad)")
    if kind == "arcface":
        return ArcFaceLoss(num_classes=num_classes, embedding_size=embedding_size, margin=margin_deg, scale=scale)
    if kind == "subcenter":
        return SubCenterArcFaceLoss(
            num_classes=num_classes, embedding_size=embedding_size, margin=margin_deg, scale=scale, sub_centers=sub_centers
        )
    raise KitError(f"--loss {kind!r}: choose from {LOSS_KINDS}")
