"""Fine-tune a timm backbone (ResNet-50 by default) on the training identities and
write its similarity matrices to runs/<run-name>/.

    # competition day, ImageNet weights from the hub:
    python train_resnet.py --data DATA
    # offline, weights from a local file (timm checkpoint or state dict):
    python train_resnet.py --data DATA --weights /path/to/resnet50.safetensors
    # any timm model, retrain on every identity for the final test matrix:
    python train_resnet.py --data DATA --model convnext_tiny --full-train
    # continue an interrupted run from runs/resnet/last.pt:
    python train_resnet.py --data DATA --resume

Stages: read data and the shared validation split -> build the model -> train
a classification head over the training identities (cross-entropy with label
smoothing, AdamW, warm-up + cosine, mixed precision on GPU, checkpoint every
epoch) -> embed validation and test images in batches (flip TTA), L2-normalise
-> cosine similarity matrices + meta.json.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader

from utils.config import RunConfig, add_config_args, config_from_args, config_to_dict
from utils.data.augment import eval_transform, train_transform
from utils.data.image_dataset import ImageDataset, log_unreadable
from utils.data.task import prepare_task
from utils.device import amp_dtype, pick_device
from utils.embedding.embed import TTA_VIEWS, cosine_similarity, embed_images
from utils.errors import KitError, run_cli
from utils.logs import setup_logging
from utils.progress import ProgressBar
from utils.runs.metrics import relevance_matrix, topk_scores
from utils.runs.model_run import write_model_run
from utils.runs.similarity_io import invalidate_run
from utils.seed import seed_everything, worker_init
from utils.training.checkpoint import file_sha, load_checkpoint, load_into, load_weights_file, save_checkpoint
from utils.training.schedule import warmup_cosine

log = logging.getLogger("train_resnet")


# ----------------------------------------------------------------------------
# defaults: every field is a --flag (kebab-case); the resolved config goes to meta.json
@dataclass
class Config(RunConfig):
    # --data, --runs, --seed, --val-fraction, --query-domain, --device, --verbose: utils.config.RunConfig
    run_name: str = field(default="resnet", metadata={"help": "output folder name under --runs"})
    # model: any timm name; change for a stronger backbone (convnext_tiny, vit_base_patch16_224, ...)
    model: str = field(default="resnet50", metadata={"help": "timm model name"})
    weights: str = field(default="hub", metadata={"help": "'hub' (download), 'none' (random init) or a local file", "metavar": "PATH"})
    img_size: int = field(default=224, metadata={"help": "square input side in pixels; lower it on CPU"})
    # training: epochs=0 skips training (pretrained features only)
    epochs: int = field(default=10, metadata={"help": "training epochs"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many steps in total (0: no limit); for smoke tests"})
    batch_size: int = field(default=32, metadata={"help": "training batch size"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate of the backbone (the head gets 10x)"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    warmup_epochs: float = field(default=1.0, metadata={"help": "linear warm-up length, then cosine decay"})
    label_smoothing: float = field(default=0.1, metadata={"help": "cross-entropy label smoothing"})
    aug_strength: float = field(default=1.0, metadata={"help": "scales colour/blur/rotation augmentation; 0 keeps crops and flips"})
    eval_every: int = field(default=1, metadata={"help": "score validation every N epochs and keep best.pt (0: never)"})
    resume: bool = field(default=False, metadata={"help": "continue from <run>/last.pt"})
    full_train: bool = field(default=False, metadata={"help": "train on the validation identities too (final test run)"})
    # embedding
    tta: list[str] = field(default_factory=lambda: ["id", "flip"], metadata={"help": f"test-time views, of {sorted(TTA_VIEWS)}"})
    embed_batch_size: int = field(default=64, metadata={"help": "batch size for embedding"})
    amp: bool = field(default=True, metadata={"help": "mixed precision on GPU (bf16 where supported)"})
    workers: int = field(default=2, metadata={"help": "DataLoader worker processes"})
# ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, Config)
    return parser


def build_model(cfg: Config) -> nn.Module:
    """A timm backbone with pooled features (no classifier), weights as ``--weights`` says."""
    if cfg.weights == "hub":
        try:
            return timm.create_model(cfg.model, pretrained=True, num_classes=0)
        except RuntimeError as err:
            raise KitError(f"--model {cfg.model!r}: {err}") from None
        except OSError as err:
            raise KitError(
                f"cannot download weights for {cfg.model!r} ({type(err).__name__}); "
                "pass --weights PATH to a local file, or --weights none"
            ) from None
    try:
        model = timm.create_model(cfg.model, pretrained=False, num_classes=0)
    except RuntimeError as err:
        raise KitError(f"--model {cfg.model!r}: {err}") from None
    if cfg.weights != "none":
        load_into(model, load_weights_file(cfg.weights), cfg.weights, strict=False)
    return model


def main(argv: Sequence[str] | None = None) -> int:
    cfg = config_from_args(Config, build_parser().parse_args(argv))
    setup_logging(cfg.verbose)
    if not timm.is_model(cfg.model):
        raise KitError(f"--model {cfg.model!r}: not a timm model; list them with timm.list_models('*resnet*')")
    t0 = time.time()
    run_dir = cfg.runs / cfg.run_name
    invalidate_run(run_dir)  # a killed or failed re-run must not leave the old run looking complete
    device = pick_device(cfg.device)
    amp = amp_dtype(device, cfg.amp)
    shuffle_gen = seed_everything(cfg.seed)

    # data and the shared validation split
    task = prepare_task(cfg.data, cfg.runs, cfg.split_params(), cfg.full_train)
    timings = {"prepare": time.time() - t0}

    # model: backbone + linear head over training identities
    backbone = build_model(cfg).to(device)
    data_cfg = timm.data.resolve_data_config({}, model=backbone)
    mean, std = data_cfg["mean"], data_cfg["std"]
    with torch.no_grad():  # the pooled output size (timm's num_features is not it for every model)
        backbone.eval()
        dim = backbone(torch.zeros(1, 3, cfg.img_size, cfg.img_size, device=device)).shape[1]
    head = nn.Linear(dim, len(task.classes)).to(device)
    params_groups = [
        {"params": backbone.parameters(), "lr": cfg.lr},
        {"params": head.parameters(), "lr": cfg.lr * 10},
    ]
    optimizer = torch.optim.AdamW(params_groups, weight_decay=cfg.weight_decay)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    scaler = torch.amp.GradScaler(enabled=amp == torch.float16)
    start_epoch, best_score = 0, -1.0
    if cfg.resume:
        ckpt = load_checkpoint(run_dir / "last.pt", device)
        if ckpt["config"]["model"] != cfg.model or ckpt["classes"] != task.classes:
            raise KitError(f"{run_dir / 'last.pt'}: made for another model or identity set; drop --resume")
        backbone.load_state_dict(ckpt["model"])
        head.load_state_dict(ckpt["head"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, best_score = ckpt["epoch"] + 1, ckpt["best_score"]
        log.info("resumed from %s at epoch %d", run_dir / "last.pt", start_epoch)

    # training
    train_set = ImageDataset(task.train_paths, train_transform(cfg.img_size, mean, std, cfg.aug_strength), task.train_labels, seed=cfg.seed)
    loader = DataLoader(
        train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=len(train_set) > cfg.batch_size,
        num_workers=cfg.workers, generator=shuffle_gen, worker_init_fn=worker_init,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )
    steps_per_epoch = len(loader)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    warmup_steps = max(1, int(cfg.warmup_epochs * steps_per_epoch))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    forward = lambda x: backbone(x)  # noqa: E731 - the embedding the matrices use
    val_rel = relevance_matrix(task.names("val_query"), task.names("val_gallery"), task.relevant("val"))
    eval_tf = eval_transform(cfg.img_size, mean, std)
    step = start_epoch * steps_per_epoch
    skipped: set[str] = set()
    history = []
    for epoch in range(start_epoch, cfg.epochs):
        if step >= total_steps:
            break
        backbone.train()
        head.train()
        train_set.epoch = epoch
        shuffle_gen.manual_seed(cfg.seed * 1000 + epoch)  # per-epoch order: --resume replays it exactly
        losses = []
        with ProgressBar(f"epoch {epoch + 1}/{cfg.epochs}", total=min(steps_per_epoch, total_steps - step)) as bar:
            for x, y, ok, err in loader:
                if step >= total_steps:
                    break
                log_unreadable(ok, err, skipped)
                if not bool(ok.any()):
                    continue
                x, y = x[ok].to(device, non_blocking=True), y[ok].to(device, non_blocking=True)
                for g, base in zip(optimizer.param_groups, base_lrs):
                    g["lr"] = base * warmup_cosine(step, total_steps, warmup_steps)
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    loss = criterion(head(backbone(x)).float(), y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(list(backbone.parameters()) + list(head.parameters()), 5.0)
                scaler.step(optimizer)
                scaler.update()
                losses.append(loss.item())
                step += 1
                bar.advance(info=f"loss {np.mean(losses[-20:]):.3f}")
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else float("nan")}
        if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            backbone.eval()
            q = embed_images(forward, task.val_query, eval_tf, device=device, batch_size=cfg.embed_batch_size, workers=cfg.workers, amp=amp, desc="val queries")
            g = embed_images(forward, task.val_gallery, eval_tf, device=device, batch_size=cfg.embed_batch_size, workers=cfg.workers, amp=amp, desc="val gallery")
            record["val_score"] = topk_scores(cosine_similarity(q, g), val_rel)["score"]
        history.append(record)
        log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"))
        state = dict(
            model=backbone.state_dict(), head=head.state_dict(), optimizer=optimizer.state_dict(),
            epoch=epoch, config=config_to_dict(cfg), classes=task.classes,
            best_score=max(best_score, record.get("val_score", -1.0)),
        )
        if record.get("val_score", -1.0) > best_score:  # best.pt first: last.pt never points past it
            best_score = record["val_score"]
            save_checkpoint(run_dir / "best.pt", **state)
        save_checkpoint(run_dir / "last.pt", **state)
    timings["train"] = time.time() - t0 - timings["prepare"]

    # embed with the best checkpoint (by validation score), else the last
    final = run_dir / "best.pt" if (run_dir / "best.pt").is_file() else run_dir / "last.pt"
    weights_tag = f"{cfg.model}|{cfg.weights}|{cfg.img_size}"
    if final.is_file():
        backbone.load_state_dict(load_checkpoint(final, device)["model"])
        weights_tag += "|" + file_sha(final)
        log.info("embedding with %s", final)
    backbone.eval()
    emb = {}
    for which in ("val_query", "val_gallery", "test_query", "test_gallery"):
        emb[which] = embed_images(
            forward, getattr(task, which), eval_tf, device=device, batch_size=cfg.embed_batch_size,
            workers=cfg.workers, views=cfg.tta, amp=amp, desc=which.replace("_", " "),
            cache_dir=run_dir / "cache", cache_tag=weights_tag,
        )
    timings["embed"] = time.time() - t0 - timings["prepare"] - timings["train"]
    sims = {
        "val": cosine_similarity(emb["val_query"], emb["val_gallery"]),
        "test": cosine_similarity(emb["test_query"], emb["test_gallery"]),
    }
    write_model_run(run_dir, cfg.run_name, config_to_dict(cfg), task, sims, timings, {"history": history, "checkpoint": str(final) if final.is_file() else None})
    return 0


if __name__ == "__main__":
    run_cli(main)
