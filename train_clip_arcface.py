"""Fine-tune an OpenCLIP image tower with a margin loss over the training identities and
write its similarity matrices to runs/<run-name>/.

    # the seed's setup (the defaults): ViT-L-14 OpenAI weights, last 4 blocks unfrozen,
    # 1024-d head, ArcFace s=64 m=0.5 rad (28.6 deg), batch 32, 20 epochs
    python train_clip_arcface.py --data DATA
    # offline: the same weights from a local file (open_clip_pytorch_model.bin / .safetensors)
    python train_clip_arcface.py --data DATA --weights /models/vit-l-14-openai.bin --file-tag openai
    # the baseline any fine-tune must beat: frozen tower, no training (writes runs/clip_zeroshot/)
    python train_clip_arcface.py --data DATA --zero-shot
    # sub-centre ArcFace, a wider unfreeze with layer-wise decay, continue after a crash
    python train_clip_arcface.py --data DATA --loss subcenter --unfreeze 8 --layer-decay 0.8 --resume
    # several GPUs: the same script under torchrun (each rank trains on and embeds its share; rank 0 logs and writes)
    torchrun --standalone --nproc_per_node=4 train_clip_arcface.py --data DATA
    # final test matrix: retrain on every identity with the chosen settings
    python train_clip_arcface.py --data DATA --full-train --run-name clip_arcface_full

Stages: read data and the shared validation split -> build the image tower
(open_clip name or config .json; --weights hub tag, none or a local file) -> freeze
it except its last --unfreeze blocks -> projection head (Linear-BN-GELU-Linear,
no final ReLU) -> train with pml's ArcFace/SubCenterArcFace (float32) on
M-per-class batches with the shared loop (utils/training/loop.py): AdamW with
layer-wise learning rates (loss weights >= head > unfrozen blocks), warm-up +
cosine, gradient clipping, mixed precision on GPU, last.pt/best.pt every epoch,
early stopping on the validation score -> embed validation and test images with open_clip's preprocessing and flip
TTA, L2-normalise -> cosine similarity matrices + meta.json.

Under torchrun every rank trains on its share of each batch (DDP), embeds its share of
each image set for the per-epoch validation and, after restoring the checkpoint rank 0
picked, for the final matrices (gathered on every rank); rank 0 alone logs and writes
checkpoints, the run files and meta.json.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from utils.cache import files_key
from utils.clip.models import ClipVisual, count_trainable, create_visual, freeze_frozen_batchnorm, is_weights_file, unfreeze_last
from utils.config import (
    EmbeddingConfig,
    FineTuneConfig,
    FormConfig,
    RunConfig,
    add_config_args,
    check_at_least,
    check_groups,
    config_from_args,
    config_to_dict,
    override,
)
from utils.data.augment import train_transform
from utils.data.image_dataset import ImageDataset
from utils.data.task import prepare_task
from utils.device import amp_dtype, resolve_workers
from utils.distributed import DistInfo, barrier, cleanup, init_distributed
from utils.embedding.embedder import Embedder
from utils.embedding.step import embed_task, val_score
from utils.embedding.views import PixelScale, tta_views
from utils.errors import KitError, run_cli
from utils.logs import setup_logging
from utils.runs.model_run import write_embedding_run
from utils.runs.similarity_io import invalidate_run
from utils.seed import seed_everything, worker_init
from utils.training.checkpoint import file_sha
from utils.training.class_sampler import MPerClassShardSampler
from utils.training.loop import LoopSettings, Trainer
from utils.training.margin_loss import LOSS_KINDS, build_margin_loss
from utils.training.projection_head import HEAD_KINDS, ProjectionHead
from utils.weights import fingerprint

log = logging.getLogger("train_clip_arcface")

DEFAULT_RUN = "clip_arcface"
ZERO_SHOT_RUN = "clip_zeroshot"


# ----------------------------------------------------------------------------
# defaults = the seed's setup; every field is a --flag (kebab-case); the resolved config goes to meta.json
@dataclass
class Config(EmbeddingConfig, FineTuneConfig, FormConfig, RunConfig):
    # shared flags (utils/config.py): data, split and device (RunConfig), run form (FormConfig),
    # the training loop (FineTuneConfig: --epochs, --batch-size, --lr, ...), embedding (EmbeddingConfig: --tta, --workers, ...)
    run_name: str = field(default=DEFAULT_RUN, metadata={"help": f"output folder under --runs ({ZERO_SHOT_RUN} for --zero-shot unless set)"})
    # backbone: any open_clip name (open_clip.list_models()) or a config .json; ViT-B-16 is ~4x cheaper
    model: str = field(default="ViT-L-14", metadata={"help": "open_clip model name or a model config .json file", "metavar": "NAME"})
    weights: str = field(default="openai", metadata={"help": "backbone weights: an open_clip tag (hub), 'none' (random init) or a local .pt/.bin/.safetensors file", "metavar": "TAG|none|PATH"})
    file_tag: str = field(default="openai", metadata={"help": "for a local --weights file: the open_clip tag it is a copy of (sets QuickGELU, mean/std)", "metavar": "TAG"})
    img_size: int = field(default=0, metadata={"help": "input side in pixels; 0 keeps the model's own"})
    unfreeze: int = field(default=4, metadata={"help": "train the last N blocks of the image tower (0: frozen, -1: all)", "metavar": "N"})
    # head and loss: the embedding the matrices use; subcenter copes better with noisy identities
    embed_dim: int = field(default=1024, metadata={"help": "embedding size (projection head output)"})
    head: str = field(default="mlp", metadata={"help": "projection head: mlp (Linear-BN-GELU-Linear) or linear (Linear-BN)", "choices": list(HEAD_KINDS)})
    loss: str = field(default="arcface", metadata={"help": "margin loss (pytorch-metric-learning)", "choices": list(LOSS_KINDS)})
    margin_deg: float = field(default=28.6, metadata={"help": "angular margin in degrees (28.6 = 0.5 rad)"})
    scale: float = field(default=64.0, metadata={"help": "logit scale s of the margin loss"})
    sub_centers: int = field(default=3, metadata={"help": "sub-centres per identity (--loss subcenter)", "metavar": "N"})
    # training; --zero-shot or --epochs 0 skip it (frozen tower embeddings: the baseline)
    zero_shot: bool = field(default=False, metadata={"help": "no training: embed with the frozen tower"})
    epochs: int = override(20, "training epochs (0: zero-shot)")
    batch_size: int = override(32, "training batch size per process")
    lr: float = override(1e-5, "peak learning rate of the unfrozen blocks")
    layer_decay: float = field(default=1.0, metadata={"help": "each deeper unfrozen block gets this factor more (1: same lr)"})
    head_lr: float = field(default=1e-3, metadata={"help": "peak learning rate of the projection head"})
    loss_lr: float = field(default=1e-3, metadata={"help": "peak learning rate of the margin loss's class weights"})
    weight_decay: float = override(0.05, "AdamW weight decay (not on biases, norms, class weights)")
    patience: int = override(5)
    amp: bool = override(True, "mixed precision on GPU (bf16 where supported); the loss stays float32")


# ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, Config)
    return parser


class ClipEmbedder(nn.Module):
    """Image tower + projection head; ``forward`` gives the (unnormalised) retrieval embedding."""

    def __init__(self, visual: nn.Module, head: nn.Module):
        super().__init__()
        self.visual, self.head = visual, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual(x))


class MarginStep(nn.Module):
    """Embedder and margin loss in one module, so DDP averages the loss's class weights too."""

    def __init__(self, embedder: ClipEmbedder, loss: nn.Module):
        super().__init__()
        self.embedder, self.loss = embedder, loss

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        emb = self.embedder(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.loss(emb.float(), y)  # float32: see utils/training/margin_loss.py


def check_config(cfg: Config) -> None:
    """User mistakes that would otherwise fail deep inside torch: the shared groups' checks, then this script's own."""
    check_groups(cfg)
    check_at_least(cfg, ("img_size",), low=0)
    check_at_least(cfg, ("embed_dim", "sub_centers"))
    if cfg.layer_decay <= 0 or cfg.layer_decay > 1:
        raise KitError(f"--layer-decay {cfg.layer_decay}: must be in (0, 1]")
    if cfg.head_lr < 0 or cfg.loss_lr < 0:
        raise KitError(f"--head-lr {cfg.head_lr} / --loss-lr {cfg.loss_lr}: must be >= 0 (AdamW refuses negative values)")


def param_groups(cfg: Config, backbone: list[list[nn.Parameter]], head: nn.Module, loss: nn.Module) -> list[dict[str, Any]]:
    """AdamW groups: unfrozen blocks (layer-wise decayed ``lr``), head (``head_lr``), loss (``loss_lr``, no decay)."""
    groups = []

    def add(name: str, params: list[nn.Parameter], lr: float, decay: bool = True) -> None:
        with_wd = [p for p in params if p.ndim >= 2 and decay]
        without = [p for p in params if not (p.ndim >= 2 and decay)]
        groups.extend(
            {"name": name, "params": ps, "lr": lr, "weight_decay": wd}
            for ps, wd in ((with_wd, cfg.weight_decay), (without, 0.0)) if ps
        )

    for depth, params in enumerate(backbone):  # [tail, last block, block before, ...]
        add(f"backbone.{depth}", params, cfg.lr * cfg.layer_decay ** max(0, depth - 1))
    add("head", list(head.parameters()), cfg.head_lr)
    add("loss", list(loss.parameters()), cfg.loss_lr, decay=False)
    return groups


def weights_tag(cfg: Config, clip: ClipVisual) -> str:
    """Identifies the tower's starting weights for the embedding cache."""
    tag = f"{clip.name}|{cfg.weights}|{clip.image_size}"
    if is_weights_file(cfg.weights):
        tag += f"|{cfg.file_tag}:{fingerprint(cfg.weights)}"
    return tag


def embedder_for(forward: nn.Module, clip: ClipVisual, cfg: Config, device, amp, run_dir: Path, dist_info: DistInfo) -> Embedder:
    """The tower's embedder with open_clip's preprocessing: identity view, no cache (``but(views=..., key=...)`` for the matrices);
    under torchrun each rank embeds its share of every set."""
    scale = PixelScale(tuple(clip.preprocess["mean"]), tuple(clip.preprocess["std"]))
    return Embedder(forward, clip.eval_transform(), scale, device, views=tta_views([]), batch_size=cfg.embed_batch_size,
                    workers=resolve_workers(cfg.workers), amp=amp, cache_dir=run_dir / "cache", dist_info=dist_info)


def final_embedder(embedder: Embedder, cfg: Config, tag: str) -> Embedder:
    """The embedding the matrices use: every --tta view, cached under ``tag``, compiled with --compile."""
    return embedder.but(views=tta_views(cfg.tta), key=tag, compile_model=cfg.compile)


def run_zero_shot(cfg: Config, task, clip: ClipVisual, device, amp, run_dir: Path, timings: dict[str, float], dist_info: DistInfo) -> int:
    """Embed with the frozen tower (no head, no training): the baseline a fine-tune must beat. Every rank embeds its share."""
    t0 = time.time()
    clip.visual.to(device)
    embedder = final_embedder(embedder_for(clip.visual, clip, cfg, device, amp, run_dir, dist_info), cfg, weights_tag(cfg, clip) + "|zero-shot")
    emb = embed_task(task, embedder.embed_set)
    timings["embed"] = time.time() - t0
    write_embedding_run(run_dir, run_dir.name, config_to_dict(cfg), task, emb, timings, {"zero_shot": True, "quick_gelu": clip.quick_gelu}, form=cfg.run_form())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    cfg = config_from_args(Config, build_parser().parse_args(argv))
    check_config(cfg)
    dist_info, device = init_distributed(cfg.device, cfg.dist_timeout_min)
    try:
        return train_and_embed(cfg, dist_info, device)
    finally:
        cleanup(dist_info)


def train_and_embed(cfg: Config, dist_info: DistInfo, device: torch.device) -> int:
    master = dist_info.master
    setup_logging(cfg.verbose)
    if not master:
        logging.getLogger().setLevel(logging.WARNING)
    t0 = time.time()
    zero_shot = cfg.zero_shot or cfg.epochs == 0
    run_dir = cfg.runs / (ZERO_SHOT_RUN if zero_shot and cfg.run_name == DEFAULT_RUN else cfg.run_name)
    if master:
        invalidate_run(run_dir)  # a killed or failed re-run must not leave the old run looking complete
    amp = amp_dtype(device, cfg.amp)
    seed_everything(cfg.seed, cfg.deterministic, device)

    # data and the shared validation split (rank 0 writes runs/split.json first)
    task = prepare_task(cfg.data, cfg.runs, cfg.split_params(), cfg.full_train) if master else None
    barrier(dist_info)
    task = task or prepare_task(cfg.data, cfg.runs, cfg.split_params(), cfg.full_train)
    timings = {"prepare": time.time() - t0}

    # image tower; zero-shot embeds it as it is (the baseline a fine-tune must beat)
    clip = create_visual(cfg.model, cfg.weights, cfg.file_tag, cfg.img_size)
    if zero_shot:
        return run_zero_shot(cfg, task, clip, device, amp, run_dir, timings, dist_info)

    # model: partly unfrozen tower + projection head + margin loss, in one module for DDP
    backbone_groups = unfreeze_last(clip.visual, cfg.unfreeze)
    head = ProjectionHead(clip.out_dim, cfg.embed_dim, cfg.head)
    loss_fn = build_margin_loss(cfg.loss, len(task.classes), cfg.embed_dim, cfg.margin_deg, cfg.scale, cfg.sub_centers)
    embedder = ClipEmbedder(clip.visual, head)
    step_module = MarginStep(embedder, loss_fn).to(device)
    log.info("%s (%s, quick_gelu=%s): %d trainable tower parameters in the last %s blocks, head %d, loss %d", clip.name, cfg.weights,
             clip.quick_gelu, count_trainable(clip.visual), cfg.unfreeze, count_trainable(head), count_trainable(loss_fn))
    optimizer = torch.optim.AdamW(param_groups(cfg, backbone_groups, head, loss_fn))
    if dist_info.ddp and device.type == "cuda":
        step_module = nn.SyncBatchNorm.convert_sync_batchnorm(step_module)
    trainer_module = DDP(step_module, device_ids=[device.index] if device.type == "cuda" else None) if dist_info.ddp else step_module
    quick = embedder_for(embedder, clip, cfg, device, amp, run_dir, dist_info)
    trainer = Trainer(
        LoopSettings.from_config(cfg), run_dir=run_dir, modules={"model": clip.visual, "head": head, "loss": loss_fn},
        step_module=trainer_module, optimizer=optimizer, device=device, amp=amp, config=config_to_dict(cfg), classes=task.classes,
        resume_keys=("model", "weights", "unfreeze", "embed_dim", "head", "loss", "sub_centers", "img_size"),
        evaluate=lambda: val_score(task, quick.embed_set), dist_info=dist_info, shared_evaluate=True, min_batch=2,
        data_key=files_key(task.train_paths, "train"),
    )

    train_set, sampler, loader = train_loader(cfg, clip, task, dist_info, device)

    def on_epoch(epoch: int) -> None:
        freeze_frozen_batchnorm(clip.visual)
        train_set.epoch = epoch
        sampler.set_epoch(epoch)

    trainer.fit(loader, on_epoch)
    timings["train"] = time.time() - t0 - timings["prepare"]
    return embed_and_write(cfg, trainer, quick, clip, task, run_dir, timings, dist_info)


def train_loader(cfg: Config, clip, task, dist_info: DistInfo, device: torch.device):
    """The training data: M images per identity in each batch, each rank its share; (dataset, sampler, loader)."""
    mean, std = clip.preprocess["mean"], clip.preprocess["std"]
    train_set = ImageDataset(task.train_paths, train_transform(clip.image_size, mean, std, cfg.aug_strength), task.train_labels, seed=cfg.seed)
    sampler = MPerClassShardSampler(task.train_labels, cfg.m_per_class, cfg.batch_size, dist_info.world_size, dist_info.rank, seed=cfg.seed)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, num_workers=resolve_workers(cfg.workers),
                        worker_init_fn=worker_init, pin_memory=device.type == "cuda")
    return train_set, sampler, loader


def embed_and_write(cfg: Config, trainer: Trainer, quick, clip, task, run_dir: Path, timings: dict, dist_info: DistInfo) -> int:
    """Embed with the checkpoint the loop picked (best by validation; last with --full-train) and write the run.

    Under torchrun every rank restores that checkpoint (rank 0 picked and wrote it before the others hear of it)
    and embeds its share of each set; rank 0 alone writes the run (:func:`write_embedding_run`).
    """
    final = trainer.final_checkpoint()  # a collective: rank 0's choice on every rank
    tag = weights_tag(cfg, clip) + f"|{cfg.head}|{cfg.embed_dim}"
    if final is not None:
        trainer.restore(final)
        tag += "|" + file_sha(final)
        log.info("embedding with %s", final)
    else:
        trainer.sync_buffers()  # no checkpoint: every rank embeds with rank 0's BatchNorm statistics
    t1 = time.time()
    emb = embed_task(task, final_embedder(quick, cfg, tag).embed_set)
    timings["embed"] = time.time() - t1
    extra = {"history": trainer.state.history, "checkpoint": str(final) if final else None, "quick_gelu": clip.quick_gelu,
             "world_size": dist_info.world_size}
    write_embedding_run(run_dir, run_dir.name, config_to_dict(cfg), task, emb, timings, extra, form=cfg.run_form())
    return 0


if __name__ == "__main__":
    run_cli(main)
