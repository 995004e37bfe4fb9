"""timm backbones with the kit's ``--weights`` grammar, for every script that uses one.

    >>> model = create_backbone("resnet50", "default")   # timm's pretrained weights: the weights folder, else the hub
    >>> model = create_backbone("resnet50", "none")      # random init
    >>> model = create_backbone("resnet50", "/models/resnet50.safetensors")  # offline: a local file

``default`` is taken from the weights folder when ``python -m utils.weights fetch``
put it there (no network), else downloaded by timm. The classifier is removed
(``num_classes=0``): the model returns pooled features.
"""

from __future__ import annotations

import logging

import timm
from torch import nn

from utils.errors import KitError
from utils.weights import fingerprint, load_into, load_weights_file, resolve_weights
from utils.weights.resolve import FETCH_HINT

log = logging.getLogger(__name__)


def create_backbone(model: str, weights: str, **model_args) -> nn.Module:
    """A timm model with pooled features and the weights asked for.

    Args:
        model: a timm model name.
        weights: ``default`` (timm's pretrained weights: the weights folder, else the hub), ``none``
            (random init) or a local file (timm checkpoint or state dict, ``.pth``/``.bin``/``.safetensors``).
        model_args: passed to ``timm.create_model`` (e.g. ``img_size=224``, or ``depth=2`` for a tiny random model).

    Raises:
        KitError: unknown model, failed download, or a weights file that does not fit.
    """
    if not timm.is_model(model):
        raise KitError(f"--model {model!r}: not a timm model; list them with timm.list_models('*resnet*')")
    resolved = resolve_weights("timm", model, weights)
    kwargs = {}
    if resolved.mode == "folder":  # timm loads the file as its pretrained weights (its filters, no classifier)
        kwargs["pretrained_cfg_overlay"] = {"file": str(resolved.path), "source": ""}
    try:
        net = timm.create_model(model, pretrained=resolved.mode in ("hub", "folder"), num_classes=0, **kwargs, **model_args)
    except (RuntimeError, TypeError) as err:  # TypeError: a model argument this model does not take
        raise KitError(f"--model {model!r}: {err}") from None
    except OSError as err:
        raise KitError(f"cannot download weights for {model!r} ({type(err).__name__}); "
                       f"pass --weights PATH to a local file, or --weights none (or run {FETCH_HINT} where there is internet)") from None
    if resolved.mode == "file":
        load_into(net, load_weights_file(resolved.path), resolved.path, strict=False)
    log.info("%s: weights %s", model, resolved.describe())
    return net


def weights_id(weights: str) -> str:
    """``weights`` plus, for a file, its size and mtime: part of an embedding cache key."""
    if weights in ("default", "none"):
        return weights
    return f"{weights}:{fingerprint(weights)}"
