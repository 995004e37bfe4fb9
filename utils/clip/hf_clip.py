"""A Hugging Face CLIP image tower (``transformers``), by hub name or local folder: optional.

FashionCLIP (``patrickjohncyh/fashion-clip``) and other CLIP fine-tunes are
published as ``transformers`` checkpoints. :data:`utils.deps.has_transformers`
says whether ``transformers`` is installed, and :func:`create_hf_visual`
refuses with one line when it is not.

Example:
    >>> tower = create_hf_visual("patrickjohncyh/fashion-clip")   # or a folder saved with save_pretrained
    >>> emb = tower(tower.transform(img)[None])                    # (1, projection_dim)
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torchvision import transforms as T

from utils.deps import require
from utils.errors import KitError
from utils.weights import resolve_hf_source

log = logging.getLogger(__name__)

HF_PREFIX = "hf:"


class HFClipVisual(nn.Module):
    """``forward(pixels)`` -> the projected CLIP image embedding; ``transform`` makes the pixels from a PIL image."""

    def __init__(self, model: nn.Module, transform, mean: tuple[float, ...], std: tuple[float, ...], source: str):
        super().__init__()
        self.model = model.eval()
        self.transform = transform
        self.mean, self.std = mean, std  # of the normalised pixels (the TTA views need them)
        self.source = source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).image_embeds


def create_hf_visual(source: str) -> HFClipVisual:
    """The image tower and preprocessing of a ``transformers`` CLIP model (hub name or folder).

    A hub name is read from the weights folder when it holds a copy (``hf/<name>``).

    Raises:
        KitError: transformers missing, or the model cannot be found or read.
    """
    require("transformers", f"--model {HF_PREFIX}{source} (a Hugging Face CLIP)")
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    local = resolve_hf_source(source)  # a folder as given, or the weights folder's copy of a hub name
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(local)
        proc = CLIPImageProcessor.from_pretrained(local)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        where = "folder" if Path(source).exists() else "hub name (offline? pass a local folder saved with save_pretrained)"
        raise KitError(f"--model {HF_PREFIX}{source}: cannot load a CLIP model from this {where}: {first}") from None
    short = proc.size.get("shortest_edge") or min(proc.size.values())
    crop = (proc.crop_size["height"], proc.crop_size["width"])
    transform = T.Compose([
        T.Resize(short, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(crop),
        T.ToTensor(),
        T.Normalize(proc.image_mean, proc.image_std),
    ])
    log.info("%s: transformers CLIP image tower, %s px input", source, crop)
    return HFClipVisual(model, transform, tuple(proc.image_mean), tuple(proc.image_std), source)
