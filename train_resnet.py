"""Fine-tune a timm backbone (ResNet-50 by default) on the training identities and
write its similarity matrices to runs/<run-name>/.

    # competition day, ImageNet weights from the hub:
    python train_resnet.py --data DATA
    # offline, weights from a local file (timm checkpoint or state dict):
    python train_resnet.py --data DATA --weights /path/to/resnet50.safetensors
    # any timm model, retrain on every identity for the final test matrix:
    python train_resnet.py --data DATA --model convnext_tiny --full-train
    # pull real and synthetic images of one identity together (no classifier head):
    python train_resnet.py --data DATA --loss multi-similarity --m-per-class 4
    # continue an interrupted run from runs/resnet/last.pt:
    python train_resnet.py --data DATA --resume

Stages: read data and the shared validation split -> build the model -> train
it with the shared loop (utils/training/loop.py): a classification head over
the training identities (cross-entropy with label smoothing, --loss ce) or a
pair loss on the backbone's embedding (--loss contrastive|multi-similarity|
triplet, M-per-class batches); AdamW, warm-up + cosine, mixed precision on GPU,
checkpoint every epoch -> embed validation and test images in batches (--tta
views), L2-normalise -> cosine similarity matrices + meta.json.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import timm
import torch
from torch import nn
from torch.utils.data import DataLoader

from utils.cache import files_key
from utils.config import (
    EmbeddingConfig,
    FineTuneConfig,
    FormConfig,
    RunConfig,
    TimmModelConfig,
    add_config_args,
    check_groups,
    config_from_args,
    config_to_dict,
    override,
)
from utils.data.augment import eval_transform, train_transform
from utils.data.image_dataset import ImageDataset
from utils.data.task import Task, prepare_task, require_identities
from utils.device import amp_dtype, is_cnn, pick_device, resolve_workers
from utils.distributed import refuse_torchrun
from utils.embedding.backbone import create_backbone
from utils.embedding.embedder import Embedder
from utils.embedding.step import embed_task, val_score
from utils.embedding.views import PixelScale, tta_views
from utils.errors import run_cli
from utils.logs import setup_logging
from utils.runs.model_run import write_embedding_run
from utils.runs.similarity_io import invalidate_run
from utils.seed import seed_everything, worker_init
from utils.training.checkpoint import file_sha
from utils.training.class_sampler import MPerClassShardSampler
from utils.training.loop import LoopSettings, Trainer
from utils.training.pair_loss import PAIR_LOSSES, build_pair_loss

log = logging.getLogger("train_resnet")

LOSSES = ("ce", *PAIR_LOSSES)


# ----------------------------------------------------------------------------
# defaults: every field is a --flag (kebab-case); the resolved config goes to meta.json
@dataclass
class Config(EmbeddingConfig, FineTuneConfig, FormConfig, TimmModelConfig, RunConfig):
    # shared flags (utils/config.py): data, split and device (RunConfig), the timm model (TimmModelConfig: --model, --img-size), run form (FormConfig),
    # the training loop (FineTuneConfig: --epochs, --batch-size, --lr, ...), embedding (EmbeddingConfig: --tta, --workers, ...)
    run_name: str = field(default="resnet", metadata={"help": "output folder name under --runs"})
    # model: any timm name; change for a stronger backbone (convnext_tiny, vit_base_patch16_224, ...)
    weights: str = field(default="default", metadata={"help": "backbone weights: 'default' (timm's pretrained, from the hub), 'none' (random init) or a local file", "metavar": "TAG|none|PATH"})
    img_size: int = override(224, "square input side in pixels; lower it on CPU")
    # loss: ce trains a classifier head; the pair losses train the embedding itself on M-per-class batches
    loss: str = field(default="ce", metadata={"help": "training loss (pair losses: pytorch-metric-learning)", "choices": list(LOSSES)})
    m_per_class: int = override(4, "pair losses: images per identity in each batch (divides --batch-size)")
    label_smoothing: float = field(default=0.1, metadata={"help": "ce: cross-entropy label smoothing"})
    # training (the shared loop); epochs=0 skips training (pretrained features only)
    lr: float = override(3e-4, "peak learning rate of the backbone")
    head_lr_factor: float = field(default=10.0, metadata={"help": "ce: the head's peak learning rate is this times --lr"})
    grad_clip: float = override(5.0)

    def uses_m_per_class(self) -> bool:
        return self.loss != "ce"  # ce batches are shuffled images


# ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, Config)
    return parser


def check_config(cfg: Config) -> None:
    """Flag mistakes, before any data is read: the shared groups' checks, then this script's own."""
    check_groups(cfg)


class Classifier(nn.Module):
    """--loss ce: backbone + linear head over the training identities; ``forward(x, y)`` is the loss."""

    def __init__(self, backbone: nn.Module, head: nn.Module, label_smoothing: float):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.criterion(self.head(self.backbone(x)).float(), y)


class PairStep(nn.Module):
    """--loss contrastive|multi-similarity|triplet on the backbone's embedding, in float32."""

    def __init__(self, backbone: nn.Module, loss: nn.Module):
        super().__init__()
        self.backbone, self.loss = backbone, loss

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        emb = self.backbone(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.loss(emb.float(), y)


def build_objective(cfg: Config, backbone: nn.Module, n_classes: int, device: torch.device) -> tuple[nn.Module, dict[str, nn.Module], list[dict[str, Any]]]:
    """The loss module the loop steps, the modules a checkpoint holds, and the optimiser groups."""
    if cfg.loss != "ce":
        return PairStep(backbone, build_pair_loss(cfg.loss)), {"model": backbone}, [{"params": backbone.parameters(), "lr": cfg.lr}]
    with torch.no_grad():  # the pooled output size (timm's num_features is not it for every model)
        backbone.eval()
        dim = backbone(torch.zeros(1, 3, cfg.img_size, cfg.img_size, device=device)).shape[1]
    head = nn.Linear(dim, n_classes).to(device)
    groups = [{"params": backbone.parameters(), "lr": cfg.lr}, {"params": head.parameters(), "lr": cfg.lr * cfg.head_lr_factor}]
    return Classifier(backbone, head, cfg.label_smoothing), {"model": backbone, "head": head}, groups


def build_loader(cfg: Config, task: Task, mean, std, shuffle_gen: torch.Generator, device: torch.device, workers: int) -> tuple[ImageDataset, DataLoader, Any]:
    """Augmented training images: shuffled (ce) or M images per identity per batch (pair losses)."""
    train_set = ImageDataset(task.train_paths, train_transform(cfg.img_size, mean, std, cfg.aug_strength), task.train_labels, seed=cfg.seed)
    common = dict(batch_size=cfg.batch_size, num_workers=workers, worker_init_fn=worker_init, pin_memory=device.type == "cuda")
    if cfg.loss == "ce":
        loader = DataLoader(train_set, shuffle=True, drop_last=len(train_set) > cfg.batch_size, generator=shuffle_gen, persistent_workers=False, **common)
        return train_set, loader, None
    sampler = MPerClassShardSampler(task.train_labels, cfg.m_per_class, cfg.batch_size, seed=cfg.seed)
    return train_set, DataLoader(train_set, sampler=sampler, drop_last=True, **common), sampler


def main(argv: Sequence[str] | None = None) -> int:
    cfg = config_from_args(Config, build_parser().parse_args(argv))
    setup_logging(cfg.verbose)
    check_config(cfg)
    refuse_torchrun("train_resnet.py", "its training is not distributed; train_clip_arcface.py trains under torchrun")
    t0 = time.time()
    run_dir = cfg.runs / cfg.run_name
    invalidate_run(run_dir)  # a killed or failed re-run must not leave the old run looking complete
    device = pick_device(cfg.device)
    amp = amp_dtype(device, cfg.amp)
    views, workers = tta_views(cfg.tta), resolve_workers(cfg.workers)
    shuffle_gen = seed_everything(cfg.seed, cfg.deterministic, device)

    # data and the shared validation split
    task = prepare_task(cfg.data, cfg.runs, cfg.split_params(), cfg.full_train)
    require_identities(task, len(task.classes), "training")  # a classifier of one identity learns nothing
    timings = {"prepare": time.time() - t0}

    # model and its objective (a head over the training identities, or a pair loss)
    backbone = create_backbone(cfg.model, cfg.weights).to(device)
    data_cfg = timm.data.resolve_data_config({}, model=backbone)
    scale = PixelScale(tuple(data_cfg["mean"]), tuple(data_cfg["std"]))
    step_module, modules, groups = build_objective(cfg, backbone, len(task.classes), device)
    eval_tf = eval_transform(cfg.img_size, scale.mean, scale.std)

    # the embedding the matrices use; the per-epoch validation takes the identity view, uncached and uncompiled
    embedder = Embedder(backbone, eval_tf, scale, device, views=views, batch_size=cfg.embed_batch_size, workers=workers, amp=amp,
                        channels_last=is_cnn(backbone), compile_model=cfg.compile, cache_dir=run_dir / "cache")
    quick = embedder.but(views=(views[0],), compile_model=False)

    # training: the shared loop (best.pt/last.pt, --resume, eval every N epochs)
    trainer = Trainer(
        LoopSettings.from_config(cfg), run_dir=run_dir, modules=modules, step_module=step_module,
        optimizer=torch.optim.AdamW(groups, weight_decay=cfg.weight_decay), device=device, amp=amp,
        config=config_to_dict(cfg), classes=task.classes, resume_keys=("model", "weights", "img_size", "loss"),
        evaluate=lambda: val_score(task, quick.embed_set), data_key=files_key(task.train_paths, "train"),
    )
    train_set, loader, sampler = build_loader(cfg, task, scale.mean, scale.std, shuffle_gen, device, workers)

    def on_epoch(epoch: int) -> None:
        train_set.epoch = epoch
        shuffle_gen.manual_seed(cfg.seed * 1000 + epoch)  # per-epoch order: --resume replays it exactly
        if sampler is not None:
            sampler.set_epoch(epoch)

    trainer.fit(loader, on_epoch)
    timings["train"] = time.time() - t0 - timings["prepare"]

    # embed with the checkpoint the loop picked (best by validation; last with --full-train)
    final = trainer.final_checkpoint()
    tag = f"{cfg.model}|{cfg.weights}|{cfg.img_size}"
    if final is not None:
        trainer.restore(final)
        tag += "|" + file_sha(final)
        log.info("embedding with %s", final)
    emb = embed_task(task, embedder.but(key=tag).embed_set)
    timings["embed"] = time.time() - t0 - timings["prepare"] - timings["train"]
    extra = {"history": trainer.state.history, "checkpoint": str(final) if final else None}
    write_embedding_run(run_dir, cfg.run_name, config_to_dict(cfg), task, emb, timings, extra, form=cfg.run_form())
    return 0


if __name__ == "__main__":
    run_cli(main)
