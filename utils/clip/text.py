"""A whole OpenCLIP model (image and text towers) for image-to-text matching.

    >>> clip = create_clip("ViT-B-32", "laion2b_s34b_b79k")                       # hub tag
    >>> clip = create_clip("ViT-B-32", "/models/openai-b32.bin", file_tag="openai")  # offline: a local file
    >>> clip = create_clip("configs/tiny.json", "none")                            # own config, random weights
    >>> text_emb = encode_texts(clip, ["a dog on grass", "a sketch of a house"], device)

``weights`` has the kit's one grammar (as in :func:`utils.clip.models.create_visual`):
an open_clip tag (from the weights folder, else downloaded or taken from the open_clip cache), ``none``
(random initialisation), or a ``.bin``/``.pt``/``.safetensors`` state dict of
the whole model (both towers), with ``file_tag`` naming the tag it is a copy
of (QuickGELU and mean/std come from it). The tokenizer is
``open_clip.get_tokenizer`` of the model name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import open_clip
import torch
from torch import nn

from utils.clip.models import build_open_clip, eval_transform_of
from utils.embedding.embed import l2_normalize
from utils.errors import KitError
from utils.weights import fingerprint, load_into, load_weights_file

log = logging.getLogger(__name__)

@dataclass
class ClipModel:
    """An open_clip model with both towers, its tokenizer and image preprocessing."""

    model: nn.Module
    name: str  # open_clip config name
    tokenizer: Callable[..., torch.Tensor]
    preprocess: dict[str, Any]  # open_clip's PreprocessCfg of the image tower
    weights_tag: str = ""  # identifies model + weights in embedding cache keys

    def eval_transform(self):
        """open_clip's eval preprocessing (resize, centre crop, normalise): PIL -> tensor."""
        return eval_transform_of(self.preprocess)

    @property
    def vocab_size(self) -> int:
        emb = getattr(self.model, "token_embedding", None)
        return int(emb.num_embeddings) if isinstance(emb, nn.Embedding) else -1


def _load_full_weights(model: nn.Module, path: str) -> None:
    report = load_into(model, load_weights_file(path), path, strict=False, what="this CLIP model", hint="check --model",
                       min_share=0.0)  # missing tensors get the message below
    if report.missing:
        raise KitError(
            f"{path}: {len(report.missing)} tensors of the CLIP model are missing (e.g. {report.missing[:2]}); "
            "image-text matching needs both towers: give the whole open_clip checkpoint and the matching --model"
        )


def create_clip(model: str, weights: str = "none", file_tag: str = "openai", img_size: int = 0) -> ClipModel:
    """Build an open_clip model with both towers.

    Args:
        model: open_clip name (``ViT-B-32``) or a config ``.json`` file.
        weights: open_clip tag, ``none`` or a local state dict file (see the module docstring).
        file_tag: for a file, the tag it is a copy of.
        img_size: input side in pixels; 0 keeps the model's own.

    Raises:
        KitError: unknown model or tag, failed download, missing or unfitting weights file.
    """
    clip, name, from_file, _ = build_open_clip(model, weights, file_tag, img_size)
    if from_file:
        _load_full_weights(clip, weights)
        log.info("%s: weights from %s (as %s)", name, weights, file_tag)
    if not hasattr(clip, "encode_text"):
        raise KitError(f"--model {model}: this open_clip model has no text tower; caption matching needs one")
    clip.eval()
    pp = dict(open_clip.get_model_preprocess_cfg(clip))
    stamp = f"{file_tag}:{fingerprint(weights)}" if from_file else ""
    return ClipModel(clip, name, open_clip.get_tokenizer(name), pp, f"{name}|{weights}|{stamp}|{img_size}")


@torch.no_grad()
def encode_texts(clip: ClipModel, texts: Sequence[str], device: torch.device, batch_size: int = 256) -> np.ndarray:
    """L2-normalised text embeddings, (len(texts), d) float32; each distinct text is encoded once.

    Raises:
        KitError: the tokenizer gives ids the text tower has no embedding for (a
            config whose vocab_size is smaller than the tokenizer's).
    """
    unique = sorted(set(texts))
    index = {t: i for i, t in enumerate(unique)}
    model = clip.model.to(device)
    chunks = []
    for start in range(0, len(unique), batch_size):
        tokens = clip.tokenizer(unique[start:start + batch_size])
        if clip.vocab_size > 0 and int(tokens.max()) >= clip.vocab_size:
            raise KitError(
                f"--model {clip.name}: the tokenizer gives token ids up to {int(tokens.max())} but the text tower has "
                f"vocab_size {clip.vocab_size}; use a config with the tokenizer's vocab_size (49408 for CLIP's)"
            )
        chunks.append(model.encode_text(tokens.to(device)).float().cpu().numpy())
    dim = int(getattr(model, "embed_dim", 0) or (chunks[0].shape[1] if chunks else 0))
    emb = l2_normalize(np.concatenate(chunks)) if chunks else np.zeros((0, dim), np.float32)
    return emb[[index[t] for t in texts]] if len(texts) else emb
