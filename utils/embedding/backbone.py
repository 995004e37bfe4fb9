"""timm backbones with the kit's ``--weights`` grammar, for every script that uses one.

    >>> model = create_backbone("resnet50", "default")   # timm's pretrained weights, from the hub
    >>> model = create_backbone("resnet50", "none")      # random init
    >>> model = create_backbone("resnet50", "/models/resnet50.safetensors")  # offline: a local file

The classifier is removed (``num_classes=0``): the model returns pooled features.
"""

from __future__ import annotations

from pathlib import Path

import timm
from torch import nn

from utils.errors import KitError
from utils.training.checkpoint import load_into, load_weights_file


def create_backbone(model: str, weights: str) -> nn.Module:
    """A timm model with pooled features and the weights asked for.

    Args:
        model: a timm model name.
        weights: ``default`` (timm's pretrained weights, downloaded), ``none`` (random init)
            or a local file (timm checkpoint or state dict, ``.pth``/``.bin``/``.safetensors``).

    Raises:
        KitError: unknown model, failed download, or a weights file that does not fit.
    """
    if not timm.is_model(model):
        raise KitError(f"--model {model!r}: not a timm model; list them with timm.list_models('*resnet*')")
    try:
        net = timm.create_model(model, pretrained=weights == "default", num_classes=0)
    except RuntimeError as err:
        raise KitError(f"--model {model!r}: {err}") from None
    except OSError as err:
        raise KitError(f"cannot download weights for {model!r} ({type(err).__name__}); pass --weights PATH to a local file, or --weights none") from None
    if weights not in ("default", "none"):
        load_into(net, load_weights_file(weights), weights, strict=False)
    return net


def weights_id(weights: str) -> str:
    """``weights`` plus, for a file, its size and mtime: part of an embedding cache key."""
    if weights in ("default", "none"):
        return weights
    st = Path(weights).stat()
    return f"{weights}:{st.st_size}:{st.st_mtime_ns}"
