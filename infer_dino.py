"""Frozen self-supervised ViT features (DINOv2 by default): no training, cosine neighbours,
written as runs/<run-name>/{val,test}_sim.npy + meta.json for the ensemble.

    # DINOv2 ViT-S/14, its pretrained weights (the weights folder, else the hub), the CLS token:
    python infer_dino.py --data DATA
    # a bigger DINOv2, the mean of the patch tokens:
    python infer_dino.py --data DATA --model vit_base_patch14_dinov2 --pooling patch-mean --run-name dino_b
    # GeM over the patch tokens (favours the strongest local evidence), larger input:
    python infer_dino.py --data DATA --pooling gem --img-size 336 --run-name dino_gem
    # offline: weights from a local file
    python infer_dino.py --data DATA --weights /path/to/dinov2_vits14.safetensors
    # under torchrun the embedding is split across the processes (rank 0 writes the run):
    torchrun --standalone --nproc_per_node=2 infer_dino.py --data DATA

Stages: read data and the shared validation split -> a frozen timm ViT (any
``--model``; ``--model-args`` passes more arguments to timm, e.g. a tiny
random model for tests) at ``--img-size`` (its position embeddings resampled)
-> the last layer's tokens pooled (``--pooling cls|patch-mean|gem``) ->
L2-normalised embeddings (``--tta`` views), cached -> cosine similarity matrices.
Self-supervised features match instances rather than classes: a model to run
beside CLIP.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import timm
import torch
from torch import nn

from utils.config import (
    EmbeddingConfig,
    RunConfig,
    TimmModelConfig,
    add_config_args,
    check_groups,
    config_from_args,
    config_to_dict,
    override,
)
from utils.data.augment import eval_transform
from utils.device import amp_dtype, resolve_workers
from utils.embedding.backbone import create_backbone, weights_id
from utils.embedding.embedder import Embedder
from utils.embedding.stage_features import pool_map
from utils.embedding.step import embed_task, similarities
from utils.embedding.views import PixelScale, tta_views
from utils.errors import KitError, run_cli
from utils.logs import setup_logging
from utils.runs.model_run import begin_inference_run, write_model_run

log = logging.getLogger("infer_dino")

POOLINGS = ("cls", "patch-mean", "gem")


# ----------------------------------------------------------------------------
# defaults: every field is a --flag (kebab-case); the resolved config goes to meta.json
@dataclass
class Config(EmbeddingConfig, TimmModelConfig, RunConfig):
    # shared flags (utils/config.py): data, split and device (RunConfig), the timm model (TimmModelConfig: --model, --img-size),
    # embedding (EmbeddingConfig: --tta, --embed-batch-size, --amp, --workers)
    run_name: str = field(default="dino", metadata={"help": "output folder name under --runs"})
    # model: a timm ViT; the DINOv2 family is vit_{small,base,large,giant2}_patch14_dinov2 (larger = stronger, slower)
    model: str = override("vit_small_patch14_dinov2", "timm ViT name")
    model_glob = "*dinov2*"  # the family --model's error suggests
    weights: str = field(default="default", metadata={"help": "backbone weights: 'default' (timm's pretrained: the weights folder, else the hub), 'none' (random init) or a local file", "metavar": "TAG|none|PATH"})
    model_args: str = field(default="", metadata={"help": "more timm.create_model arguments as a JSON object, e.g. '{\"depth\": 2}'", "metavar": "JSON"})
    # input side: a multiple of the patch size (14 for DINOv2); the model was trained at 518, 224 is 5x cheaper
    img_size: int = override(224, "square input side in pixels (a multiple of the patch size)")
    # pooling: cls suits whole-image identity; patch-mean and gem weigh the whole picture's parts
    pooling: str = field(default="cls", metadata={"help": "how the last layer's tokens become one vector", "choices": list(POOLINGS)})
# ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, Config)
    return parser


def model_args(cfg: Config) -> dict[str, Any]:
    """``--model-args`` as keyword arguments.

    Raises:
        KitError: not a JSON object.
    """
    if not cfg.model_args:
        return {}
    try:
        args = json.loads(cfg.model_args)
    except json.JSONDecodeError as err:
        raise KitError(f"--model-args {cfg.model_args!r}: not JSON ({err.msg}); give an object, e.g. '{{\"depth\": 2}}'") from None
    if not isinstance(args, dict):
        raise KitError(f"--model-args {cfg.model_args!r}: give a JSON object, e.g. '{{\"depth\": 2}}'")
    return args


def check_config(cfg: Config) -> None:
    """Flag mistakes before any data is read: the shared groups' checks, then this script's own."""
    check_groups(cfg)
    model_args(cfg)


class TokenPool(nn.Module):
    """``forward(x)`` -> one vector per image from a timm ViT's last-layer tokens (``forward_features``)."""

    def __init__(self, vit: nn.Module, pooling: str):
        super().__init__()
        if pooling not in POOLINGS:
            raise KitError(f"--pooling {pooling!r}: choose one of {POOLINGS}")
        if not hasattr(vit, "num_prefix_tokens"):
            raise KitError(f"--model: {type(vit).__name__} is not a ViT; choose one (vit_small_patch14_dinov2, ...)")
        if pooling == "cls" and not getattr(vit, "has_class_token", False):
            raise KitError(f"--pooling cls: this {type(vit).__name__} has no CLS token; use --pooling patch-mean or gem")
        self.vit, self.pooling, self.prefix = vit.eval(), pooling, vit.num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x)  # (B, prefix + patches, D), normalised
        if self.pooling == "cls":
            return tokens[:, 0]
        patches = tokens[:, self.prefix:]
        if self.pooling == "patch-mean":
            return patches.mean(dim=1)
        if self.pooling == "gem":
            return pool_map(patches.transpose(1, 2).unsqueeze(-1), "gem")  # (B, D, N, 1): GeM over the patches
        raise KitError(f"--pooling {self.pooling!r}: choose one of {POOLINGS}")


def build_model(cfg: Config) -> tuple[TokenPool, PixelScale, str]:
    """The pooled frozen ViT, its pixel scale, and the key of its embeddings for the cache."""
    try:
        vit = create_backbone(cfg.model, cfg.weights, img_size=cfg.img_size, **model_args(cfg))
    except KitError as err:
        raise KitError(f"{err} (--model-args {cfg.model_args or '{}'}, --img-size {cfg.img_size})") from None
    data_cfg = timm.data.resolve_data_config({}, model=vit)
    key = f"{cfg.model}|{weights_id(cfg.weights)}|{cfg.model_args}|{cfg.img_size}|{cfg.pooling}"
    if cfg.weights == "none":
        key += f"|seed={cfg.seed}"  # random weights differ by seed
    return TokenPool(vit, cfg.pooling), PixelScale(tuple(data_cfg["mean"]), tuple(data_cfg["std"])), key


def main(argv: Sequence[str] | None = None) -> int:
    cfg = config_from_args(Config, build_parser().parse_args(argv))
    setup_logging(cfg.verbose)
    check_config(cfg)
    # the old run invalidated, device (one per rank under torchrun), seed, data and the shared validation split
    run = begin_inference_run(cfg)
    model, scale, key = build_model(cfg)
    embedder = Embedder(model.to(run.device), eval_transform(cfg.img_size, scale.mean, scale.std), scale, run.device, key=key,
                        views=tta_views(cfg.tta), batch_size=cfg.embed_batch_size, workers=resolve_workers(cfg.workers),
                        amp=amp_dtype(run.device, cfg.amp), cache_dir=run.run_dir / "cache", dist_info=run.dist_info)
    t1 = time.time()
    emb = embed_task(run.task, embedder.embed_set)
    run.timings["embed"] = time.time() - t1
    extra = {"feature_dim": int(emb["val_query"].shape[1]), "pooling": cfg.pooling}
    write_model_run(run.run_dir, cfg.run_name, config_to_dict(cfg), run.task, similarities(emb), run.timings, extra)
    return 0


if __name__ == "__main__":
    run_cli(main)
