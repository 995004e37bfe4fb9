"""A frozen timm backbone's feature map at a chosen stage, pooled into one vector per image.

The painting face-similarity project took VGG16 and ResNet-50 "truncated
before the classifier"; here any timm model works and any of its stages: the
stage index counts the model's ``feature_info`` entries (ResNet: 0 = the stem,
4 = the last stage; ``-1`` = the last), read with timm's
``forward_intermediates`` after the layers beyond it are pruned (no compute
spent on them). The (B, C, H, W) map becomes a vector by:

- ``avg``: mean over positions; ``max``: maximum over positions;
- ``gem``: generalised mean ``mean(x^p)^(1/p)`` over positions (Radenovic et
  al.; p=3; negative activations, e.g. of a ViT, are clamped to a small epsilon);
- ``flatten``: the whole map, C x H x W values (keeps where things are; large).

Example:
    >>> model = timm.create_model("resnet50", pretrained=True, num_classes=0)
    >>> feats = StageFeatures(model, stage=3, pool="gem")
    >>> feats(torch.zeros(2, 3, 224, 224)).shape
    torch.Size([2, 1024])
"""

from __future__ import annotations

import torch
from torch import nn

from utils.errors import KitError

POOLS = ("avg", "max", "gem", "flatten")
GEM_P = 3.0
GEM_EPS = 1e-6


def pool_map(fmap: torch.Tensor, pool: str, p: float = GEM_P) -> torch.Tensor:
    """(B, C, H, W) -> (B, D) by ``pool`` (one of :data:`POOLS`)."""
    if pool == "avg":
        return fmap.mean(dim=(2, 3))
    if pool == "max":
        return fmap.amax(dim=(2, 3))
    if pool == "gem":
        return fmap.float().clamp(min=GEM_EPS).pow(p).mean(dim=(2, 3)).pow(1.0 / p)
    if pool == "flatten":
        return fmap.flatten(1)
    raise KitError(f"--pool {pool!r}: choose one of {POOLS}")


@torch.fx.wrap  # a leaf call when torch.fx traces the module (BatchNorm folding): its test is on real shapes
def check_map(fmap: torch.Tensor, index: int) -> torch.Tensor:
    """``fmap`` itself if it is a (B, C, H, W) map.

    Raises:
        KitError: another shape (the stage cannot be pooled).
    """
    if fmap.ndim != 4:
        raise KitError(f"stage {index} gives a {fmap.ndim}-D output; choose another --stage")
    return fmap


def n_stages(model: nn.Module) -> int:
    """How many feature stages a timm model exposes.

    Raises:
        KitError: the model cannot give intermediate features.
    """
    info = getattr(model, "feature_info", None)
    if info is None or not hasattr(model, "forward_intermediates"):
        raise KitError(f"--model {type(model).__name__}: this timm model gives no intermediate features; choose another --model (resnet50, vgg16, convnext_tiny, vit_base_patch16_224, ...)")
    return len(info)


class StageFeatures(nn.Module):
    """``forward(x)`` -> the pooled feature map of one stage of a (pruned) timm backbone."""

    def __init__(self, model: nn.Module, stage: int = -1, pool: str = "avg"):
        super().__init__()
        n = n_stages(model)
        if not -n <= stage < n:
            raise KitError(f"--stage {stage}: this model has {n} stages; use 0..{n - 1} or -1 for the last")
        if pool not in POOLS:
            raise KitError(f"--pool {pool!r}: choose one of {POOLS}")
        self.index = stage % n
        self.pool = pool
        if hasattr(model, "prune_intermediate_layers"):
            model.prune_intermediate_layers([self.index], prune_norm=False, prune_head=True)
        self.model = model.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.model.forward_intermediates(x, indices=[self.index], intermediates_only=True)[0]
        return pool_map(check_map(fmap, self.index), self.pool)
