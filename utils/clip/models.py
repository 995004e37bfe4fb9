"""OpenCLIP image towers: build one by name, load its weights, unfreeze its last blocks.

    >>> clip = create_visual("ViT-L-14", weights="openai")                    # hub weights by tag
    >>> clip = create_visual("ViT-L-14", weights="vit-l.bin", file_tag="openai")  # same, from a local file
    >>> clip = create_visual("configs/tiny-vit.json", weights="none")          # own config, random init
    >>> groups = unfreeze_last(clip.visual, 4)  # last 4 blocks + the pooling/projection after them

``weights`` has the kit's one grammar: an open_clip tag (``openai``,
``laion2b_s32b_b82k``, ...), ``none``, or a local ``.pt``/``.bin``/
``.safetensors`` file. For a file, ``file_tag`` says which tag it is a copy of
(QuickGELU and mean/std come from it), so ``--weights open_clip_pytorch_model.bin
--file-tag openai`` is the offline form of ``--weights openai``. A tag is taken
from the weights folder when ``python -m utils.weights fetch`` put it there (no
network), else downloaded by open_clip. The text tower is dropped.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
from open_clip.factory import resize_pos_embed
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from torch import nn

from utils.errors import KitError
from utils.weights import (
    is_weights_file,  # noqa: F401  (the CLIP scripts import it from here)
    load_into,
    load_weights_file,
    resolve_weights,
)
from utils.weights.resolve import FETCH_HINT

log = logging.getLogger(__name__)


@dataclass
class ClipVisual:
    """An open_clip image tower and what its inputs must look like."""

    visual: nn.Module
    name: str  # open_clip config name
    preprocess: dict[str, Any]  # size, mean, std, interpolation, resize_mode (open_clip's PreprocessCfg)
    quick_gelu: bool

    @property
    def out_dim(self) -> int:
        return int(self.visual.output_dim)

    def eval_transform(self):
        """open_clip's own eval preprocessing (resize, centre crop, normalise): PIL -> tensor."""
        return eval_transform_of(self.preprocess)

    @property
    def image_size(self) -> int:
        size = self.preprocess["size"]
        return int(size[0] if isinstance(size, (tuple, list)) else size)


def eval_transform_of(preprocess: dict[str, Any]):
    """open_clip's eval preprocessing for a tower's PreprocessCfg (resize, centre crop, normalise): PIL -> tensor."""
    return open_clip.image_transform(
        preprocess["size"], is_train=False, mean=preprocess["mean"], std=preprocess["std"],
        resize_mode=preprocess["resize_mode"], interpolation=preprocess["interpolation"],
    )


def resolve_model_name(model: str) -> str:
    """A built-in open_clip name, or a ``.json`` config file registered under its stem.

    Raises:
        KitError: unknown name or unreadable config file.
    """
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise KitError(f"--model {model}: config file not found")
        open_clip.add_model_config(path)
        if path.stem not in open_clip.list_models():
            raise KitError(f"--model {model}: not an open_clip config (needs embed_dim, vision_cfg, text_cfg)")
        return path.stem
    if model not in open_clip.list_models():
        close = difflib.get_close_matches(model, open_clip.list_models(), n=3)
        raise KitError(f"--model {model!r}: not an open_clip model; did you mean {close}? (or pass a config .json)")
    return model


def tag_config(name: str, pretrained: str) -> dict[str, Any]:
    if pretrained in ("", "none"):
        return {}
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise KitError(f"--weights {pretrained!r}: no such open_clip tag for {name}; use one of {tags}, 'none' or a local file (with --file-tag TAG)")
    return cfg


def load_visual_weights(model: nn.Module, path: str | Path) -> None:
    """Load a full CLIP state dict (``visual.*`` keys), an image-tower state dict or a kit checkpoint.

    Raises:
        KitError: missing or unreadable file, or tensors that do not fit the image tower.
    """
    state = load_weights_file(path)
    if not any(k.startswith("visual.") for k in state):
        state = {f"visual.{k}": v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k.startswith("visual.")}
    try:
        resize_pos_embed(state, model)  # a checkpoint made for another image size
    except RuntimeError as err:  # shape mismatches
        raise KitError(f"{path}: weights do not fit this image tower ({str(err).strip()[:240]}); check --model") from None
    tower = {k.removeprefix("visual."): v for k, v in state.items()}
    load_into(model.visual, tower, path, strict=True, what="this image tower", hint="check --model")


@contextlib.contextmanager
def quiet_open_clip():
    """open_clip logs every creation step on the root logger; keep only its errors."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def build_open_clip(model: str, weights: str, file_tag: str = "openai", img_size: int = 0) -> tuple[nn.Module, str, bool, dict[str, Any]]:
    """The whole open_clip model for ``--weights``: a tag's weights (weights folder, else hub), random init for ``none`` or a file.

    For a file the caller loads its tensors (the image tower's, or both towers');
    ``file_tag`` then sets QuickGELU and mean/std, as the tag does for a download.

    Returns:
        (model, resolved name, whether ``weights`` is a file, the tag's pretrained config).

    Raises:
        KitError: unknown model or tag, failed download, missing weights file.
    """
    name = resolve_model_name(model)
    resolved = resolve_weights("open_clip", name, weights)
    from_file = resolved.mode == "file"
    tag = file_tag if from_file else weights
    tag_cfg = tag_config(name, tag)  # {} for none
    preprocess = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
    kwargs = dict(force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)), force_image_size=img_size or None,
                  force_preprocess_cfg=preprocess)
    if from_file or not tag_cfg:
        with quiet_open_clip():
            clip = open_clip.create_model(name, pretrained=None, **kwargs)
        if not from_file:
            log.info("%s: random initialisation (--weights none)", name)
        return clip, name, from_file, tag_cfg
    source = str(resolved.path) if resolved.mode == "folder" else tag  # open_clip reads a file as it reads a download
    try:
        with quiet_open_clip():
            clip = open_clip.create_model(name, pretrained=source, **kwargs)
    except (RuntimeError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise KitError(
            f"--weights {tag}: cannot load weights for {name} ({first}); offline, pass "
            f"--weights PATH (the open_clip .bin/.safetensors file) with --file-tag TAG, or --weights none "
            f"(or run {FETCH_HINT} where there is internet)"
        ) from None
    log.info("%s: weights %s", name, resolved.describe())
    return clip, name, from_file, tag_cfg


def create_visual(model: str, weights: str = "openai", file_tag: str = "openai", img_size: int = 0) -> ClipVisual:
    """Build the image tower of an open_clip model with the weights asked for.

    Args:
        model: open_clip name (``ViT-L-14``) or a config ``.json`` file.
        weights: an open_clip tag (hub download), ``none`` (random init), or a local file.
        file_tag: for a file, the tag it is a copy of (sets QuickGELU and mean/std).
        img_size: input side in pixels; 0 keeps the model's own.

    Raises:
        KitError: unknown model or tag, failed download, bad weights file.
    """
    clip, name, from_file, tag_cfg = build_open_clip(model, weights, file_tag, img_size)
    if from_file:
        load_visual_weights(clip, weights)
        log.info("%s: image tower weights from %s", name, weights)
    visual = clip.visual
    pp = dict(open_clip.get_model_preprocess_cfg(visual))
    return ClipVisual(visual, name, pp, bool(tag_cfg.get("quick_gelu", False)))


# ----------------------------------------------------------------------------
# partial unfreezing


def visual_blocks(visual: nn.Module) -> tuple[list[nn.Module], list[nn.Module | nn.Parameter]]:
    """The tower's blocks in forward order and what comes after them (pooling, norm, projection).

    Raises:
        KitError: a tower whose block structure is not known here.
    """
    if isinstance(visual, VisionTransformer):
        tail = [visual.ln_post, visual.proj]
        tail += [m for m in (getattr(visual, "attn_pool", None), getattr(visual, "attn_pool_contrastive", None)) if m is not None]
        return list(visual.transformer.resblocks), [t for t in tail if t is not None]
    if isinstance(visual, ModifiedResNet):
        blocks = [b for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4) for b in layer]
        return blocks, [visual.attnpool]
    raise KitError(
        f"--unfreeze N: partial unfreezing of a {type(visual).__name__} image tower is not supported; "
        "use --unfreeze 0 (frozen) or -1 (all)"
    )


def _params(parts: list[nn.Module | nn.Parameter]) -> list[nn.Parameter]:
    out = []
    for p in parts:
        out += [p] if isinstance(p, nn.Parameter) else list(p.parameters())
    return out


def unfreeze_last(visual: nn.Module, n_blocks: int) -> list[list[nn.Parameter]]:
    """Freeze the tower, then unfreeze its last ``n_blocks`` blocks and the layers after them.

    ``0`` keeps it all frozen, ``-1`` unfreezes everything.

    Returns:
        trainable parameters in groups from the output side inwards: [tail, last
        block, block before, ..., (stem, with -1)]; for layer-wise learning rates.

    Raises:
        KitError: ``n_blocks`` beyond the tower's depth or below -1.
    """
    for p in visual.parameters():
        p.requires_grad_(False)
    if n_blocks == 0:
        return []
    if n_blocks == -1:
        try:
            blocks, tail = visual_blocks(visual)
        except KitError:  # unknown structure: one group of everything
            groups = [list(visual.parameters())]
        else:
            inner = {id(p) for p in _params(blocks + tail)}
            stem = [p for p in visual.parameters() if id(p) not in inner]
            groups = [_params(tail)] + [_params([b]) for b in reversed(blocks)] + [stem]
    else:
        blocks, tail = visual_blocks(visual)
        if not 0 < n_blocks <= len(blocks):
            raise KitError(f"--unfreeze {n_blocks}: this tower has {len(blocks)} blocks; use 0..{len(blocks)} or -1 for all")
        groups = [_params(tail)] + [_params([b]) for b in reversed(blocks[-n_blocks:])]
    groups = [g for g in groups if g]
    for g in groups:
        for p in g:
            p.requires_grad_(True)
    return groups


def freeze_frozen_batchnorm(module: nn.Module) -> None:
    """Keep BatchNorm layers whose weights are frozen in eval mode (their running stats stay)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)

