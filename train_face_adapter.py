"""Adapt a face run's frozen embeddings across the photo -> synthetic gap with the training
identities, and write the adapted run (runs/<source>_adapted/) for the ensemble.

    # after `python infer_facenet.py --data DATA --embedder dlib` (runs/dlib):
    python train_face_adapter.py --data DATA --source dlib
    # per-domain statistics only (no training), or a linear map on whitened embeddings:
    python train_face_adapter.py --data DATA --source dlib --adapter none --domain-stats center
    python train_face_adapter.py --data DATA --source dlib --adapter linear --domain-stats whiten --run-name dlib_linear
    # every training pair, not only real<->synthetic ones; another pytorch-metric-learning loss:
    python train_face_adapter.py --data DATA --source dlib --pairs all --loss contrastive
    # style invariance from generated styles: 4 renders of each real training photo (utils/faces/styles.py)
    python train_face_adapter.py --data DATA --source dlib --rendered-pairs 4
    # FaceNet's own blocks (GPU; after `infer_facenet.py --embedder facenet`): its first 4 blocks, with renders each step
    python train_face_adapter.py --data DATA --source facenet --adapter finetune --finetune-part early --finetune-blocks 4 --rendered-pairs 2

Stages: read runs/<source>/meta.json (a face run of infer_facenet.py: its
detector, crops, embedder and TTA views) -> embed the training images the same
way (val and test embeddings come from the shared face cache) -> per-domain
statistics of the training embeddings (--domain-stats; utils/faces/adapter.py)
-> train a residual adapter (--adapter linear|mlp, zero at the start: the
identity), or FaceNet's own first or last blocks on the training crops (--adapter
finetune --finetune-part early|late; utils/faces/finetune.py), with the shared loop
(utils/training/loop.py: best.pt by validation, --resume, reuse of a finished run)
on M-per-class batches, a pytorch-metric-learning loss over real<->synthetic pairs
(with --rendered-pairs N, also N renders of each real training photo in random
styles of utils/faces/styles.py; the fine-tune renders each batch's real photos
afresh every step)
-> score the source, the statistics alone and statistics + adapter on validation
(the competition score, ties broken by mAP@All; where candidates tie at the top
score, the harder validation of utils/faces/tiebreak.py decides), keep the best: a
candidate replaces the source only where it wins -> cosine matrices (or the top-k
form; a source with gallery views: every view adapted, fused by the source's rule)
+ meta.json, with every candidate's validation score and the choice.
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
from utils.data.task import Task, require_identities
from utils.distributed import refuse_torchrun
from utils.embedding.step import SETS, embed_task
from utils.embedding.views import View
from utils.errors import KitError, run_cli
from utils.faces.adapter import ADAPTERS, DOMAIN_STATS, Adapter, DomainStats, cross_domain_pairs
from utils.faces.cascade import MTCNN_STAGES
from utils.faces.finetune import (
    EARLY_BLOCKS,
    FACENET_BLOCKS,
    FINETUNE_PARTS,
    CropPairStep,
    StepRenders,
    finetune_block_names,
    freeze_frozen_norms,
    norm_train_blocks,
    unfreeze_blocks,
)
from utils.faces.pipeline import FACE_FIELDS, OPTIONAL_FACE_FIELDS, FacePipeline, colour_transform
from utils.faces.styles import StyleLibrary
from utils.faces.tiebreak import TieBreak, break_tie, face_harder_set, mapped, tied_at_top
from utils.faces.views import fuse, gallery_normalised
from utils.logs import console, setup_logging
from utils.runs.cosine import cosine_similarity
from utils.runs.gap import META_KEY as GAP_KEY
from utils.runs.gap import save_run_embeddings
from utils.runs.metrics import evaluate, split_relevance
from utils.runs.model_run import begin_inference_run, write_embedding_run, write_model_run
from utils.runs.topk_run import use_topk_form
from utils.training.class_sampler import MPerClassShardSampler
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
    adapter: str = field(default="mlp", metadata={"help": "residual adapter trained on the (centred) embeddings; finetune: FaceNet's own blocks instead (GPU); none: statistics only", "choices": [*ADAPTERS, "finetune"]})
    hidden: int = field(default=256, metadata={"help": "mlp: hidden width"})
    finetune_part: str = field(default="late", metadata={"help": "finetune: late trains FaceNet's last blocks, early its first ones (where strokes and texture are read), the rest frozen", "choices": list(FINETUNE_PARTS)})
    finetune_blocks: int = field(default=3, metadata={"help": f"finetune: FaceNet blocks trained, from the end of {list(FACENET_BLOCKS)} (late) or the start of {list(EARLY_BLOCKS)} (early)", "metavar": "N"})
    finetune_lr: float = field(default=1e-4, metadata={"help": "finetune: peak learning rate"})
    loss: str = field(default="multi-similarity", metadata={"help": "pytorch-metric-learning pair loss", "choices": list(PAIR_LOSSES)})
    pairs: str = field(default="cross", metadata={"help": "cross: only real<->synthetic pairs (what retrieval meets); all: every pair", "choices": ["cross", "all"]})
    # style invariance from generated styles (utils/faces/styles.py): each real training photo's face crop rendered
    # N times into random styles of the library, each render a synthetic-side image of the photo's identity
    rendered_pairs: int = field(default=0, metadata={"help": "renders per real training photo (0: none; measured: benchmarks/results/bench_faces_loso.md); finetune: per real photo of each batch, rendered afresh every step", "metavar": "N"})
    rendered_exclude: list[str] = field(default_factory=list, metadata={"help": "styles of the library (utils/faces/styles.py TRAIN_STYLES) never rendered", "metavar": "STYLE"})
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
    if cfg.rendered_pairs < 0:
        raise KitError(f"--rendered-pairs {cfg.rendered_pairs}: renders per real training photo, 0 or more")
    if cfg.rendered_pairs:
        StyleLibrary(exclude=tuple(cfg.rendered_exclude))  # an unknown style, or every style excluded, fails here
    if cfg.adapter == "finetune":
        finetune_block_names(cfg.finetune_part, cfg.finetune_blocks)  # --finetune-blocks out of range for the part fails here
    elif cfg.finetune_part != "late":
        raise KitError(f"--finetune-part {cfg.finetune_part}: chooses FaceNet's blocks for --adapter finetune, not --adapter {cfg.adapter}")
    if cfg.rendered_pairs and cfg.adapter == "none":
        raise KitError("--rendered-pairs trains the adapter or the fine-tune: use --adapter mlp, linear or finetune, not none")
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
    face = SimpleNamespace(**{k: src[k] for k in (*FACE_FIELDS, *OPTIONAL_FACE_FIELDS) if k in src})
    # the source's gallery views and their fusion rule are kept: the adapter maps every view, and the pairs are fused as the source did
    face.view_rule = json.loads(meta_path.read_text()).get("view_fusion", {}).get("rule", "plain")
    face.gallery_norm = src.get("gallery_norm", "none")  # the source's two-way normalisation, applied to this run's matrices too
    if face.view_rule == "plain":
        face.gallery_views = []
    return face


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


def split_sims(emb: dict[str, np.ndarray], split: str, rule: str = "plain", norm: str = "none") -> np.ndarray:
    """``split``'s query x gallery similarities: cosine, or with the gallery's views (keys
    ``<split>_gallery.<view>``) fused per pair by ``rule`` (utils/faces/views.py), then the
    two-way normalisation ``norm`` (``--gallery-norm``), as the source run did."""
    views = [k for k in emb if k.startswith(f"{split}_gallery.")]
    if not views or rule == "plain":
        sim = cosine_similarity(emb[f"{split}_query"], emb[f"{split}_gallery"])
    else:
        unit = lambda e: e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)  # noqa: E731
        sim = fuse(unit(emb[f"{split}_query"]), [unit(emb[f"{split}_gallery"]), *[unit(emb[k]) for k in views]], rule)
    return gallery_normalised({split: sim}, norm)[0][split]


def val_metrics(emb: dict[str, np.ndarray], rel: np.ndarray, rule: str = "plain", norm: str = "none") -> dict[str, float]:
    """Every metric of the validation embeddings ``emb["val_query"]``, ``emb["val_gallery"]`` (and its views, fused by ``rule``,
    normalised by ``norm``)."""
    return evaluate(split_sims(emb, "val", rule, norm), rel)


def rank_key(m: dict[str, float]) -> float:
    """Validation ranking: the competition score, ties broken by mAP@All (score steps exceed 1e-3)."""
    return m["score"] + 1e-3 * m["map_all"]


def fit_on_identities(cfg: Config, task: Task, run_dir: Path, module: tuple[str, nn.Module], step: nn.Module, lr: float,
                      device: torch.device, evaluate: Callable[[], float], data_key: str,
                      on_epoch: Callable[[int], None] = lambda epoch: None, labels: Sequence[int] | None = None) -> list[dict]:
    """The shared loop over M-per-class batches of training rows (``labels``: each row's identity; None: the
    training images'); ``module`` restored from best.pt/last.pt. Returns the history."""
    labels = list(task.train_labels if labels is None else labels)
    n_classes = len(set(labels))
    require_identities(task, n_classes, "adaptation")
    batch = min(cfg.batch_size, cfg.m_per_class * n_classes // cfg.m_per_class * cfg.m_per_class)
    if batch < cfg.batch_size:
        log.info("batch size %d (%d training identities x --m-per-class %d)", batch, n_classes, cfg.m_per_class)
    params = [p for p in module[1].parameters() if p.requires_grad]
    trainer = Trainer(
        LoopSettings.from_config(cfg), run_dir=run_dir, modules=dict([module]), step_module=step,
        optimizer=torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay), device=device, amp=None,
        config=config_to_dict(cfg), classes=task.classes, resume_keys=("source", "adapter", "hidden", "finetune_part", "finetune_blocks", "rendered_pairs"),
        evaluate=evaluate, data_key=data_key)
    sampler = MPerClassShardSampler(labels, cfg.m_per_class, batch, seed=cfg.seed)
    loader = DataLoader(IndexSet(labels), sampler=sampler, batch_size=batch, drop_last=True)
    trainer.fit(loader, on_epoch=lambda epoch: (sampler.set_epoch(epoch), on_epoch(epoch)))
    final = trainer.final_checkpoint()
    if final is not None:
        trainer.restore(final)
        log.info("%s from %s", module[0], final)
    return trainer.state.history


def train_adapter(cfg: Config, task: Task, run_dir: Path, train: tuple[np.ndarray, np.ndarray, np.ndarray], adapted: Callable[[Adapter], dict],
                  val_metric: Callable[[dict], float], data_key: str) -> tuple[Adapter, list[dict]]:
    """The adapter trained on the (transformed) training embeddings (rows, side, identity), on the CPU (a few thousand vectors)."""
    emb, side, labels = train
    adapter = Adapter(emb.shape[1], cfg.adapter, cfg.hidden)
    step = AdapterStep(adapter, emb, side, cfg.loss, cfg.pairs)
    history = fit_on_identities(cfg, task, run_dir, ("adapter", adapter), step, cfg.lr, torch.device("cpu"),
                                lambda: val_metric(adapted(adapter)), data_key, labels=labels.tolist())
    return adapter, history


def rendered_training(cfg: Config, task: Task, pipe: FacePipeline, side: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """--rendered-pairs renders of each real training photo's crop (utils/faces/styles.py), embedded: (embeddings, identities)."""
    real = np.flatnonzero(side == 0)
    if not len(real):
        raise KitError("--rendered-pairs: no real training photo to render (domains.csv names none of the query domain)")
    library = StyleLibrary(exclude=tuple(cfg.rendered_exclude))
    emb, src, _, _ = pipe.embed_rendered(task.train_paths, real, library, cfg.rendered_pairs, cfg.seed, "training images")
    log.info("rendered pairs: %d renders of %d training photos in %d styles", len(emb), len(real), len(library.names()))
    return emb, np.asarray(task.train_labels, np.int64)[src]


def step_renders(cfg: Config, task: Task, pipe: FacePipeline, side: np.ndarray) -> StepRenders | None:
    """--rendered-pairs for the fine-tune: renders of each batch's real photos, made afresh every step from the stored crops."""
    if not cfg.rendered_pairs:
        return None
    real = side == 0
    if not real.any():
        raise KitError("--rendered-pairs: no real training photo to render (domains.csv names none of the query domain)")
    library = StyleLibrary(exclude=tuple(cfg.rendered_exclude))
    log.info("rendered pairs: %d renders of each real photo in every batch, afresh each step, in %d styles", cfg.rendered_pairs, len(library.names()))
    return StepRenders(pipe.stored_crops(task.train_paths, "training images").pixels, real, library, cfg.rendered_pairs,
                       colour_transform(pipe.cfg.face_colour), seed=cfg.seed + 1)


def finetune_record(cfg: Config, names: list[str], renders: StepRenders | None, step: CropPairStep) -> dict:
    """meta.json's account of the fine-tune: the blocks trained, their BatchNorm, what this process rendered."""
    record = {"part": cfg.finetune_part, "blocks": names, "norm_stats_updated": norm_train_blocks(cfg.finetune_part, names),
              "steps_this_run": len(step.batch_sizes), "images_this_run": sum(step.batch_sizes)}
    if renders is not None:
        record["rendered"] = {"per_real_photo": cfg.rendered_pairs, "styles": len(renders.library.names()),
                              "style_names": list(renders.library.names()), "renders_this_run": renders.rendered,
                              "styles_used_this_run": dict(sorted(renders.styles_used.items()))}
        log.info("rendered pairs: %d renders entered %d training steps (%d images in all)", renders.rendered, len(step.batch_sizes), sum(step.batch_sizes))
    return record


def finetune(cfg: Config, task: Task, run_dir: Path, pipe: FacePipeline, side: np.ndarray, val_rel: np.ndarray,
             data_key: str, norm: str = "none") -> tuple[dict[str, np.ndarray], list[dict], dict]:
    """FaceNet's first or last --finetune-blocks trained on the training crops (and, with --rendered-pairs, renders of the
    real ones); every set embedded again (uncached); each epoch scored on validation normalised by ``norm``, as the run's
    matrices are. Returns the embeddings, the history and :func:`finetune_record`."""
    model = pipe.embedder.model
    names = unfreeze_blocks(model, cfg.finetune_part, cfg.finetune_blocks)
    norm_blocks = norm_train_blocks(cfg.finetune_part, names)
    crops = pipe.crops(task.train_paths, "training images").pixels
    renders = step_renders(cfg, task, pipe, side)
    cross = cfg.pairs == "cross" and (len(set(side.tolist())) > 1 or renders is not None)
    step = CropPairStep(model, crops, side, cfg.loss, cross, input_px=pipe.embedder.input_px, seed=cfg.seed, renders=renders)
    val_crops = {w: pipe.crops(getattr(task, w), w.replace("_", " ")).pixels for w in ("val_query", "val_gallery")}

    def evaluate() -> float:
        model.eval()
        return rank_key(val_metrics({w: pipe.embed_pixels(c, w, views=[View()]) for w, c in val_crops.items()}, val_rel, norm=norm))

    history = fit_on_identities(cfg, task, run_dir, ("facenet", model), step, cfg.finetune_lr, pipe.device, evaluate, data_key,
                                on_epoch=lambda epoch: freeze_frozen_norms(model, norm_blocks))
    model.eval()
    record = finetune_record(cfg, names, renders, step)
    return {w: pipe.embed_set(getattr(task, w), w.replace("_", " "), use_cache=False) for w in SETS}, history, record


def source_views(cfg: Config, task: Task, pipe: FacePipeline, face: SimpleNamespace) -> dict[str, np.ndarray]:
    """The source run's gallery views (keys ``<set>.<view>``; from the face cache), or none where the source fused
    none or this run writes the top-k form (views are fused in full matrices only, as infer_facenet.py does)."""
    if not pipe.view_params.views:
        return {}
    if use_topk_form(len(task.test_query), len(task.test_gallery), cfg.run_form().max_cells):
        log.warning("the source's gallery views are fused only in full matrices; this top-k run adapts the plain view")
        return {}
    out = {}
    for w in ("val_gallery", "test_gallery"):
        for name, e in zip(pipe.view_params.names(), pipe.embed_views(getattr(task, w), task.names(w), w.replace("_", " "))):
            out[f"{w}.{name}"] = e
    log.info("the source's gallery views %s, fused by %s, are adapted with the plain view", pipe.view_params.names(), face.view_rule)
    return out


def choose(candidates: dict[str, dict[str, np.ndarray]], rel: np.ndarray, rule: str = "plain",
           harder: Callable[[list[str]], TieBreak | None] | None = None, norm: str = "none") -> tuple[str, dict[str, dict[str, float]], dict | None]:
    """Each candidate's validation metrics (views fused by ``rule``, normalised by ``norm``: the matrices
    the run would hold), a table of them, and the winner: ``source`` unless another
    ranks strictly higher (:func:`rank_key`); where two or more tie at the top score, ``harder(tied)``
    (the harder validation, utils/faces/tiebreak.py) decides. Returns the winner, the metrics and the tie-break's record."""
    scores = {name: val_metrics(emb, rel, rule, norm) for name, emb in candidates.items()}
    chosen, tie = "source", None
    for name, m in scores.items():
        if rank_key(m) > rank_key(scores[chosen]):
            chosen = name
    tied = sorted(tied_at_top(scores), key=lambda n: (n != chosen, -rank_key(scores[n])))  # the plain validation's choice first
    if len(tied) > 1 and harder is not None:
        tie = harder(tied)
        chosen = chosen if tie is None else tie.chosen
    table = Table(title="validation: the source face run and what the training identities taught")
    for col in ("candidate", "score", "mAP@All", "top-1", *(["harder val score", "harder val mAP"] if tie else []), "kept"):
        table.add_column(col, justify="left" if col == "candidate" else "right")
    for name, m in scores.items():
        hard = [f"{tie.metrics[name]['score']:.2f}", f"{tie.metrics[name]['map_all']:.4f}"] if tie and name in tie.metrics else ([""] * 2 if tie else [])
        table.add_row(name, f"{m['score']:.2f}", f"{m['map_all']:.4f}", f"{m['top1']:.3f}", *hard, "yes" if name == chosen else "")
    console.print(table)
    if chosen == "source":
        log.warning("nothing learned beat the source on validation: the run holds the source's embeddings unchanged")
    return chosen, scores, None if tie is None else tie.record()


Maps = dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]]


def learn(cfg: Config, task: Task, run_dir: Path, pipe: FacePipeline, source: dict[str, np.ndarray], rule: str, val_rel: np.ndarray,
          train: tuple[np.ndarray, np.ndarray], norm: str = "none") -> tuple[dict[str, dict[str, np.ndarray]], Maps, list[dict], dict]:
    """The candidates (every set's embeddings): the source, the per-domain statistics, the adapter on top (or the fine-tune);
    each one's maps of a query and a gallery embedding (not for the fine-tune); the training history; the fine-tune's record.
    The epoch kept is the one whose validation, normalised by ``norm`` (the run's ``gallery_norm``), ranks first."""
    train_emb, side = train
    labels = np.asarray(task.train_labels, np.int64)
    stats = DomainStats.fit(train_emb, side, cfg.domain_stats, cfg.shrinkage)
    centred = {w: stats.transform(e, int("gallery" in w)) for w, e in source.items()}
    candidates, maps = {"source": source}, {"source": (lambda e: e, lambda e: e)}
    if cfg.domain_stats != "none":
        candidates[cfg.domain_stats] = centred
        maps[cfg.domain_stats] = (lambda e: stats.transform(e, 0), lambda e: stats.transform(e, 1))
    history: list[dict] = []
    record: dict = {}
    if cfg.adapter == "finetune":
        name = f"finetune {cfg.finetune_blocks} blocks" if cfg.finetune_part == "late" else f"finetune first {cfg.finetune_blocks} blocks"
        candidates[name], history, record = finetune(cfg, task, run_dir, pipe, side, val_rel, files_key(task.train_paths, pipe.tag), norm)
    elif cfg.adapter != "none":
        adapted = lambda a: {w: a.apply_np(e) for w, e in centred.items() if w.startswith("val")}  # noqa: E731
        rows, row_side = stats.transform_sides(train_emb, side), side
        if cfg.rendered_pairs:
            r_emb, r_labels = rendered_training(cfg, task, pipe, side)
            rows, row_side = np.concatenate([rows, stats.transform(r_emb, 1)]), np.concatenate([side, np.ones(len(r_emb), np.int64)])
            labels = np.concatenate([labels, r_labels])
        key = files_key(task.train_paths, f"{pipe.tag}|rendered={cfg.rendered_pairs}|{','.join(cfg.rendered_exclude)}")
        adapter, history = train_adapter(cfg, task, run_dir, (rows.astype(np.float32), row_side, labels), adapted,
                                         lambda emb: rank_key(val_metrics(emb, val_rel, rule, norm)), key)
        name = f"{cfg.domain_stats} + {cfg.adapter} adapter" if cfg.domain_stats != "none" else f"{cfg.adapter} adapter"
        candidates[name] = {w: adapter.apply_np(e) for w, e in centred.items()}
        maps[name] = (lambda e: adapter.apply_np(stats.transform(e, 0)), lambda e: adapter.apply_np(stats.transform(e, 1)))
    return candidates, maps, history, record


def harder_gate(cfg: Config, task: Task, pipe: FacePipeline, source: dict[str, np.ndarray], rule: str, maps: Maps,
                distractors: np.ndarray) -> Callable[[list[str]], TieBreak | None]:
    """The adapter gate's tie-break: the tied candidates (those with maps) on the harder validation of the source's
    validation split, every training image a distractor."""
    def decide(tied: list[str]) -> TieBreak | None:
        names = [n for n in tied if n in maps]
        if len(names) < 2:  # the fine-tune re-embeds: it has no map for the renders
            return None
        hard = face_harder_set(pipe, task, source, [source[k] for k in source if k.startswith("val_gallery.")], seed=cfg.seed, distractors=distractors)
        return break_tie(names, lambda n: mapped(hard, *maps[n]).sim(lambda q, g: fuse(q, g, rule)), hard.rel, "adapter gate")
    return decide


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
    val_rel = split_relevance(task, "val")
    pipe = FacePipeline(face, device, cache_dir=cfg.runs / "face_cache")
    source = {**embed_task(task, pipe.embed_set), **source_views(cfg, task, pipe, face)}
    rule = face.view_rule if any("." in k for k in source) else "plain"
    train_emb, side = pipe.embed_set(task.train_paths, "training images"), training_sides(task, cfg.query_domain)
    timings["embed"] = time.time() - t0 - timings["prepare"]
    # per-domain statistics, then the adapter on top, each a candidate; epochs and candidates are scored on the matrices
    # the run would hold: normalised as the source's (not in the top-k form)
    norm = "none" if use_topk_form(len(task.test_query), len(task.test_gallery), cfg.run_form().max_cells) else face.gallery_norm
    candidates, maps, history, record = learn(cfg, task, run_dir, pipe, source, rule, val_rel, (train_emb, side), norm)
    timings["train"] = time.time() - t0 - sum(timings.values())

    # validation picks what the run holds (a harder validation where candidates tie)
    chosen, scores, tie = choose(candidates, val_rel, rule, harder_gate(cfg, task, pipe, source, rule, maps, train_emb), norm)
    test_rel = split_relevance(task, "test")  # known in rehearsals and benchmarks only: recorded, never used to choose
    test = {} if test_rel is None else {name: evaluate(split_sims(e, "test", rule, norm), test_rel) for name, e in candidates.items()}
    adaptation = {"source": cfg.source, "chosen": chosen, "val": scores, "test": test, "tie_break": tie, **({"finetune": record} if record else {})}
    extra = {"adaptation": adaptation, "history": history,
             "faces": pipe.faces, "source_config": vars(face), "view_fusion": {"rule": rule, "chosen_by": f"the source run {cfg.source}"}}
    if rule != "plain":
        extra["gallery_views"] = {"names": ["plain", *pipe.view_params.names()], "per_image": pipe.image_views}
    write_adapted(cfg, task, run_dir, run_name, candidates[chosen], rule, norm, timings, extra)
    return 0


def write_adapted(cfg: Config, task: Task, run_dir: Path, run_name: str, emb: dict[str, np.ndarray], rule: str, norm: str,
                  timings: dict[str, float], extra: dict) -> None:
    """The chosen embeddings as a run: matrices fused by the source's view rule and normalised by its
    ``gallery_norm`` (utils/faces/views.py), or the top-k form for a plain run too large for matrices."""
    if rule == "plain" and norm == "none":
        extra["gallery_norm"] = {"norm": "none"}
        write_embedding_run(run_dir, run_name, config_to_dict(cfg), task, {w: emb[w] for w in SETS}, timings, extra, form=cfg.run_form())
        return
    if rule == "plain":
        extra[GAP_KEY] = save_run_embeddings(run_dir, {w: emb[w] for w in SETS})
    sims, extra["gallery_norm"] = gallery_normalised({sp: split_sims(emb, sp, rule) for sp in ("val", "test")}, norm)  # the gate's matrices
    write_model_run(run_dir, run_name, config_to_dict(cfg), task, sims, timings, extra)

if __name__ == "__main__":
    run_cli(main)
