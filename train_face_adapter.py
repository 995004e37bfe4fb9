"""Adapt a face run's frozen embeddings across the photo -> synthetic gap with the training
identities, and write the adapted run (runs/<source>_adapted/) for the ensemble.

    # after `python infer_facenet.py --data DATA --embedder dlib` (runs/dlib):
    python train_face_adapter.py --data DATA --source dlib
    # per-domain statistics only (no training), or a linear map on whitened embeddings:
    python train_face_adapter.py --data DATA --source dlib --adapter none --domain-stats center
    python train_face_adapter.py --data DATA --source dlib --adapter linear --domain-stats whiten --run-name dlib_linear
    # every training pair, not only real<->synthetic ones; another pytorch-metric-learning loss:
    python train_face_adapter.py --data DATA --source dlib --pairs all --loss contrastive

Stages: read runs/<source>/meta.json (a face run of infer_facenet.py: its
detector, crops, embedder and TTA views) -> embed the training images the same
way (val and test embeddings come from the shared face cache) -> per-domain
statistics of the training embeddings (--domain-stats; utils/faces/adapter.py)
-> train a residual adapter (--adapter linear|mlp, zero at the start: the
identity) with the shared loop (utils/training/loop.py: best.pt by validation,
--resume, reuse of a finished run) on M-per-class batches, a
pytorch-metric-learning loss over real<->synthetic pairs -> score the source,
the statistics alone and statistics + adapter on validation (the competition
score, ties broken by mAP@All), keep the best: a candidate replaces the source
only where it wins -> cosine matrices (or the top-k form) + meta.json, with
every candidate's validation score and the choice.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import numpy as np
import torch
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, Dataset

from utils.cache import files_key
from utils.config import (
    FormConfig,
    LoopConfig,
    RunConfig,
    add_config_args,
    check_at_least,
    check_groups,
    config_from_args,
    config_to_dict,
    override,
)
from utils.data.task import Task
from utils.embedding.embed import cosine_similarity
from utils.embedding.step import SETS, embed_task
from utils.embedding.views import View
from utils.errors import KitError, run_cli
from utils.faces.adapter import ADAPTERS, DOMAIN_STATS, Adapter, DomainStats, cross_domain_pairs
from utils.faces.cascade import MTCNN_STAGES
from utils.faces.finetune import FACENET_BLOCKS, CropPairStep, freeze_frozen_norms, unfreeze_last_blocks
from utils.faces.pipeline import FACE_FIELDS, FacePipeline
from utils.logs import console, setup_logging
from utils.runs.metrics import evaluate, relevance_matrix
from utils.runs.model_run import begin_inference_run, write_embedding_run
from utils.training.class_sampler import MPerClassShardSampler
from utils.training.distributed import refuse_torchrun
from utils.training.loop import LoopSettings, Trainer
from utils.training.pair_loss import PAIR_LOSSES, build_pair_loss

log = logging.getLogger("train_face_adapter")


# ----------------------------------------------------------------------------
# defaults: every field is a --flag (kebab-case); the resolved config goes to meta.json
@dataclass
class Config(LoopConfig, FormConfig, RunConfig):
    # shared flags (utils/config.py): data, split and device (RunConfig), run form (FormConfig),
    # the training loop (LoopConfig: --epochs, --batch-size, --lr, ...)
    source: str = field(default="dlib", metadata={"help": "the face run (infer_facenet.py) under --runs whose embeddings are adapted"})
    run_name: str = field(default="", metadata={"help": "output folder under --runs ('' = <source>_adapted)"})
    # what is learned from the training identities; each candidate is kept only if it wins on validation
    domain_stats: str = field(default="none", metadata={"help": "per-domain statistics applied first", "choices": list(DOMAIN_STATS)})
    shrinkage: float = field(default=0.5, metadata={"help": "whiten: covariance shrinkage towards the identity (0: none, 1: no whitening)"})
    adapter: str = field(default="mlp", metadata={"help": "residual adapter trained on the (centred) embeddings; finetune: FaceNet's last blocks instead (GPU); none: statistics only", "choices": [*ADAPTERS, "finetune"]})
    hidden: int = field(default=256, metadata={"help": "mlp: hidden width"})
    finetune_blocks: int = field(default=3, metadata={"help": f"finetune: FaceNet blocks trained, from the end of {list(FACENET_BLOCKS)}", "metavar": "N"})
    finetune_lr: float = field(default=1e-4, metadata={"help": "finetune: peak learning rate"})
    loss: str = field(default="multi-similarity", metadata={"help": "pytorch-metric-learning pair loss", "choices": list(PAIR_LOSSES)})
    pairs: str = field(default="cross", metadata={"help": "cross: only real<->synthetic pairs (what retrieval meets); all: every pair", "choices": ["cross", "all"]})
    # training (the shared loop)
    epochs: int = override(40)
    batch_size: int = override(64, "training batch size (capped at --m-per-class x the training identities)")
    weight_decay: float = override(1e-4)
    warmup_epochs: float = override(2.0)
    patience: int = override(10)
# ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, Config)
    return parser


def check_config(cfg: Config) -> None:
    """Flag mistakes, before any data is read: the shared groups' checks, then this script's own."""
    check_groups(cfg)
    check_at_least(cfg, ("hidden", "finetune_blocks"))
    if not 0.0 <= cfg.shrinkage <= 1.0:
        raise KitError(f"--shrinkage {cfg.shrinkage}: between 0 and 1")
    if cfg.finetune_lr < 0:
        raise KitError(f"--finetune-lr {cfg.finetune_lr}: must be >= 0 (AdamW refuses negative values)")


def source_settings(cfg: Config) -> SimpleNamespace:
    """The face settings of runs/<source>/meta.json, checked to be a face run on this data."""
    meta_path = cfg.runs / cfg.source / "meta.json"
    if not meta_path.is_file():
        raise KitError(f"{meta_path}: no finished run {cfg.source!r}; make it first, e.g. "
                       f"python infer_facenet.py --data {cfg.data} --runs {cfg.runs} --embedder dlib")
    # runs made before --detector-rotations / --detector-rotated-stages / --face-colour existed:
    # upright search (or the search of every MTCNN stage), colour crops
    src = {"detector_rotations": [], "detector_rotated_stages": list(MTCNN_STAGES), "face_colour": "rgb", **json.loads(meta_path.read_text()).get("config", {})}
    missing = [k for k in FACE_FIELDS if k not in src]
    if missing:
        raise KitError(f"{meta_path}: not a face run of infer_facenet.py (its config lacks {missing[:3]}); pass --source <face run>")
    if Path(src.get("data", "")).resolve() != Path(cfg.data).resolve():
        raise KitError(f"{meta_path}: made from --data {src.get('data')}, not {cfg.data}; use that data or re-run the face run on this one")
    if cfg.adapter == "finetune" and src["embedder"] != "facenet":
        raise KitError(f"--adapter finetune: the source {cfg.source!r} uses {src['embedder']}, which cannot be trained here; "
                       "use a facenet face run, or --adapter mlp")
    return SimpleNamespace(**{k: src[k] for k in FACE_FIELDS})


def training_sides(task: Task, query_domain: str) -> np.ndarray:
    """0 for each training image of the query domain, 1 for the others (all 0 without domains.csv)."""
    domains = task.layout.domains
    if not domains:
        log.warning("no domains.csv: every training image counts as one domain (per-domain statistics are one mean; "
                    "--pairs cross finds no pairs, so every pair is used)")
        return np.zeros(len(task.train_paths), np.int64)
    return np.array([int(domains.get(task.layout.rel(p), query_domain) != query_domain) for p in task.train_paths], np.int64)


class IndexSet(Dataset):
    """Training embeddings by index: ``(i, label, ok, error)``, the loop's batch contract."""

    def __init__(self, labels: Sequence[int]):
        self.labels = list(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[int, int, bool, str]:
        return i, self.labels[i], True, ""


class AdapterStep(nn.Module):
    """``forward(idx, labels)``: the pair loss of the adapted embeddings of training rows ``idx``."""

    def __init__(self, adapter: Adapter, emb: np.ndarray, side: np.ndarray, loss: str, pairs: str):
        super().__init__()
        self.adapter, self.loss, self.cross = adapter, build_pair_loss(loss), pairs == "cross" and len(set(side.tolist())) > 1
        self.register_buffer("emb", torch.from_numpy(emb))
        self.register_buffer("side", torch.from_numpy(side))

    def forward(self, idx: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = self.adapter(self.emb[idx])
        if not self.cross:
            return self.loss(out, labels)
        return self.loss.loss(out, labels, cross_domain_pairs(labels, self.side[idx]))


def val_relevance(task: Task) -> np.ndarray:
    """The validation split's (query, gallery) relevance matrix."""
    return relevance_matrix(task.names("val_query"), task.names("val_gallery"), task.relevant("val"))


def val_metrics(emb: dict[str, np.ndarray], rel: np.ndarray) -> dict[str, float]:
    """Every metric of the validation embeddings ``emb["val_query"]``, ``emb["val_gallery"]``."""
    return evaluate(cosine_similarity(emb["val_query"], emb["val_gallery"]), rel)


def rank_key(m: dict[str, float]) -> float:
    """Validation ranking: the competition score, ties broken by mAP@All (score steps exceed 1e-3)."""
    return m["score"] + 1e-3 * m["map_all"]


def fit_on_identities(cfg: Config, task: Task, run_dir: Path, module: tuple[str, nn.Module], step: nn.Module, lr: float,
                      device: torch.device, evaluate: Callable[[], float], data_key: str,
                      on_epoch: Callable[[int], None] = lambda epoch: None) -> list[dict]:
    """The shared loop over M-per-class batches of training rows; ``module`` restored from best.pt/last.pt. Returns the history."""
    n_classes = len(set(task.train_labels))
    if n_classes < 2:
        raise KitError(f"{n_classes} training identity: adaptation needs at least 2 (lower --val-fraction)")
    batch = min(cfg.batch_size, cfg.m_per_class * n_classes // cfg.m_per_class * cfg.m_per_class)
    if batch < cfg.batch_size:
        log.info("batch size %d (%d training identities x --m-per-class %d)", batch, n_classes, cfg.m_per_class)
    params = [p for p in module[1].parameters() if p.requires_grad]
    trainer = Trainer(
        LoopSettings.from_config(cfg), run_dir=run_dir, modules=dict([module]), step_module=step,
        optimizer=torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay), device=device, amp=None,
        config=config_to_dict(cfg), classes=task.classes, resume_keys=("source", "adapter", "hidden", "finetune_blocks"),
        evaluate=evaluate, data_key=data_key)
    sampler = MPerClassShardSampler(task.train_labels, cfg.m_per_class, batch, seed=cfg.seed)
    loader = DataLoader(IndexSet(task.train_labels), sampler=sampler, batch_size=batch, drop_last=True)
    trainer.fit(loader, on_epoch=lambda epoch: (sampler.set_epoch(epoch), on_epoch(epoch)))
    final = trainer.final_checkpoint()
    if final is not None:
        trainer.restore(final)
        log.info("%s from %s", module[0], final)
    return trainer.state.history


def train_adapter(cfg: Config, task: Task, run_dir: Path, train: tuple[np.ndarray, np.ndarray], adapted: Callable[[Adapter], dict],
                  val_rel: np.ndarray, data_key: str) -> tuple[Adapter, list[dict]]:
    """The adapter trained on the (transformed) training embeddings, on the CPU (a few thousand vectors)."""
    emb, side = train
    adapter = Adapter(emb.shape[1], cfg.adapter, cfg.hidden)
    step = AdapterStep(adapter, emb, side, cfg.loss, cfg.pairs)
    history = fit_on_identities(cfg, task, run_dir, ("adapter", adapter), step, cfg.lr, torch.device("cpu"),
                                lambda: rank_key(val_metrics(adapted(adapter), val_rel)), data_key)
    return adapter, history


def finetune(cfg: Config, task: Task, run_dir: Path, pipe: FacePipeline, side: np.ndarray, val_rel: np.ndarray,
             data_key: str) -> tuple[dict[str, np.ndarray], list[dict]]:
    """FaceNet's last --finetune-blocks trained on the training crops; every set embedded again (uncached)."""
    model = pipe.embedder.model
    names = unfreeze_last_blocks(model, cfg.finetune_blocks)
    crops = pipe.crops(task.train_paths, "training images").pixels
    step = CropPairStep(model, crops, side, cfg.loss, cfg.pairs == "cross" and len(set(side.tolist())) > 1,
                        input_px=pipe.embedder.input_px, seed=cfg.seed)
    val_crops = {w: pipe.crops(getattr(task, w), w.replace("_", " ")).pixels for w in ("val_query", "val_gallery")}

    def evaluate() -> float:
        model.eval()
        return rank_key(val_metrics({w: pipe.embed_pixels(c, w, views=[View()]) for w, c in val_crops.items()}, val_rel))

    history = fit_on_identities(cfg, task, run_dir, ("facenet", model), step, cfg.finetune_lr, pipe.device, evaluate, data_key,
                                on_epoch=lambda epoch: freeze_frozen_norms(model, names))
    model.eval()
    return {w: pipe.embed_set(getattr(task, w), w.replace("_", " "), use_cache=False) for w in SETS}, history


def choose(candidates: dict[str, dict[str, np.ndarray]], rel: np.ndarray) -> tuple[str, dict[str, dict[str, float]]]:
    """Each candidate's validation metrics, a table of them, and the winner: ``source`` unless another
    ranks strictly higher (:func:`rank_key`)."""
    scores = {name: val_metrics(emb, rel) for name, emb in candidates.items()}
    chosen = "source"
    for name, m in scores.items():
        if rank_key(m) > rank_key(scores[chosen]):
            chosen = name
    table = Table(title="validation: the source face run and what the training identities taught")
    for col in ("candidate", "score", "mAP@All", "top-1", "kept"):
        table.add_column(col, justify="left" if col == "candidate" else "right")
    for name, m in scores.items():
        table.add_row(name, f"{m['score']:.2f}", f"{m['map_all']:.4f}", f"{m['top1']:.3f}", "yes" if name == chosen else "")
    console.print(table)
    if chosen == "source":
        log.warning("nothing learned beat the source on validation: the run holds the source's embeddings unchanged")
    return chosen, scores


def main(argv: Sequence[str] | None = None) -> int:
    cfg = config_from_args(Config, build_parser().parse_args(argv))
    setup_logging(cfg.verbose)
    check_config(cfg)
    refuse_torchrun("train_face_adapter.py", "the adapter trains and embeds in one process")
    run_name = cfg.run_name or f"{cfg.source}_adapted"
    if run_name == cfg.source:
        raise KitError(f"--run-name {run_name}: that is the source run; choose another name")
    face = source_settings(cfg)
    # the old run invalidated, device, seed, data, the shared split; the source's embeddings of every set (from the face cache)
    run = begin_inference_run(cfg, run_name)
    run_dir, device, task, t0, timings = run.run_dir, run.device, run.task, run.t0, run.timings
    val_rel = val_relevance(task)
    pipe = FacePipeline(face, device, cache_dir=cfg.runs / "face_cache")
    source = embed_task(task, pipe.embed_set)
    train_emb, side = pipe.embed_set(task.train_paths, "training images"), training_sides(task, cfg.query_domain)
    timings["embed"] = time.time() - t0 - timings["prepare"]

    # per-domain statistics, then the adapter on top, each a candidate
    stats = DomainStats.fit(train_emb, side, cfg.domain_stats, cfg.shrinkage)
    centred = {w: stats.transform(e, int(w.endswith("gallery"))) for w, e in source.items()}
    candidates: dict[str, dict[str, np.ndarray]] = {"source": source}
    if cfg.domain_stats != "none":
        candidates[cfg.domain_stats] = centred
    history: list[dict] = []
    if cfg.adapter == "finetune":
        candidates[f"finetune {cfg.finetune_blocks} blocks"], history = finetune(cfg, task, run_dir, pipe, side, val_rel,
                                                                            files_key(task.train_paths, pipe.tag))
    elif cfg.adapter != "none":
        adapted = lambda a: {w: a.apply_np(e) for w, e in centred.items() if w.startswith("val")}  # noqa: E731
        adapter, history = train_adapter(cfg, task, run_dir, (stats.transform_sides(train_emb, side), side), adapted, val_rel,
                                         files_key(task.train_paths, pipe.tag))
        candidates[f"{cfg.domain_stats} + {cfg.adapter} adapter" if cfg.domain_stats != "none" else f"{cfg.adapter} adapter"] = {w: adapter.apply_np(e) for w, e in centred.items()}
    timings["train"] = time.time() - t0 - sum(timings.values())

    # validation picks what the run holds
    chosen, scores = choose(candidates, val_rel)
    truth = task.relevant("test")  # known in rehearsals and benchmarks only: recorded, never used to choose
    test_rel = None if truth is None else relevance_matrix(task.names("test_query"), task.names("test_gallery"), truth)
    test = {} if test_rel is None else {name: evaluate(cosine_similarity(e["test_query"], e["test_gallery"]), test_rel)
                                        for name, e in candidates.items()}
    extra = {"adaptation": {"source": cfg.source, "chosen": chosen, "val": scores, "test": test}, "history": history, "faces": pipe.faces,
             "source_config": vars(face)}
    write_embedding_run(run_dir, run_name, config_to_dict(cfg), task, {w: candidates[chosen][w] for w in SETS}, timings, extra, form=cfg.run_form())
    return 0


if __name__ == "__main__":
    run_cli(main)
