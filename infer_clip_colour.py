"""Zero-shot CLIP with a colour term: no training; cosine of frozen CLIP image embeddings plus a
bonus for gallery images of close colour, written as runs/<run-name>/ for the ensemble.

    # open_clip ViT-B-32 with OpenAI's weights, HSV histograms, Bhattacharyya distance:
    python infer_clip_colour.py --data DATA
    # offline: the same weights from a file (--file-tag says which tag they are a copy of)
    python infer_clip_colour.py --data DATA --weights /models/vit-b-32-openai.bin --file-tag openai
    # FashionCLIP (the retail project's model) through transformers, by hub name or local folder:
    python infer_clip_colour.py --data DATA --model hf:patrickjohncyh/fashion-clip
    python infer_clip_colour.py --data DATA --model hf:/models/fashion-clip
    # references on plain backgrounds: crop every image to what differs from its border colour first
    python infer_clip_colour.py --data DATA --crop-object border
    # dominant colours compared by the earth mover's distance; a wider search grid
    python infer_clip_colour.py --data DATA --colour dominant --distance emd --alphas 0 0.05 0.1 0.2 0.4

    sim = cosine + alpha * (1 - d / threshold)   where the colour distance d < threshold

Stages: read data and the shared validation split -> (--crop-object border)
crop each image to the box of pixels unlike its border colour, kept whole
when that box is nearly all or nothing of the image (counted) -> embed the four image
sets with the frozen image tower (its own preprocessing, flip TTA; cached)
-> cosine matrices -> a colour histogram per image (``--colour hsv|lab|dominant``)
-> colour distances (``--distance chi2|emd|bhattacharyya``) for each query's
``--colour-top-m`` best gallery images by cosine (the others get no bonus) ->
``alpha`` x ``threshold`` searched on the validation split by the competition
score (thresholds: quantiles of the validation distances; a choice on the
grid's edge widens it once; a warning when it stays there or when several
options tie at the top validation score) -> the chosen term applied to val
and test -> matrices + meta.json (the choice, the grid, the warnings, and the
mean cosine of correct and of incorrect pairs per split: Tudo Bein's check of
the domain gap, also logged).
The object crop is a plain-background heuristic, not segmentation: background
removal or an open-vocabulary detector would need weights that cannot be
fetched offline here.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from rich.table import Table

from utils.atomic import atomic_save_npy
from utils.cache import files_key
from utils.clip.colour_term import ColourTerm, apply_colour_term, search_with_checks
from utils.clip.hf_clip import HF_PREFIX, create_hf_visual
from utils.clip.models import create_visual, is_weights_file
from utils.config import EmbeddingConfig, RunConfig, add_config_args, check_groups, config_from_args, config_to_dict, override
from utils.data.colour import DESCRIPTORS, DISTANCES, ColourDescriptors, bin_centres, colour_descriptors, colour_distances
from utils.data.object_crop import OBJECT_CROPS, object_crops
from utils.data.task import Task
from utils.device import amp_dtype, is_cnn, resolve_workers
from utils.distributed import master_first
from utils.embedding.embedder import Embedder
from utils.embedding.step import SETS, embed_task, similarities
from utils.embedding.views import PixelScale, tta_views
from utils.errors import KitError, run_cli
from utils.logs import console, setup_logging
from utils.runs.metrics import evaluate, mean_cosine_by_relevance, split_relevance
from utils.runs.model_run import begin_inference_run, write_model_run
from utils.runs.topk import topk
from utils.weights import fingerprint

log = logging.getLogger("infer_clip_colour")

# ----------------------------------------------------------------------------
# defaults: every field is a --flag (kebab-case); the resolved config goes to meta.json
@dataclass
class Config(EmbeddingConfig, RunConfig):
    # shared flags (utils/config.py): data, split and device (RunConfig), embedding (EmbeddingConfig: --tta, --embed-batch-size, --amp, --workers)
    run_name: str = field(default="clip_colour", metadata={"help": "output folder name under --runs"})
    # model: an open_clip name or config .json, or hf:<hub name or folder> (needs transformers)
    model: str = field(default="ViT-B-32", metadata={"help": "open_clip model name, a model config .json, or hf:NAME_OR_FOLDER", "metavar": "NAME"})
    weights: str = field(default="openai", metadata={"help": "backbone weights: an open_clip tag (hub), 'none' (random init) or a local .pt/.bin/.safetensors file (not for hf:)", "metavar": "TAG|none|PATH"})
    file_tag: str = field(default="openai", metadata={"help": "for a local --weights file: the open_clip tag it is a copy of (sets QuickGELU, mean/std)", "metavar": "TAG"})
    img_size: int = field(default=0, metadata={"help": "open_clip input side in pixels; 0 keeps the model's own"})
    # the colour term
    crop_object: str = field(default="none", metadata={"help": "none, or border: crop to what differs from the border colour (objects on plain backgrounds)", "choices": list(OBJECT_CROPS)})
    object_tolerance: int = field(default=30, metadata={"help": "--crop-object border: 0..255 difference from the border colour that counts as object"})
    colour: str = field(default="hsv", metadata={"help": "colour descriptor of each image", "choices": list(DESCRIPTORS)})
    distance: str = field(default="bhattacharyya", metadata={"help": "distance between two descriptors", "choices": list(DISTANCES)})
    colour_top_m: int = field(default=100, metadata={"help": "candidates of the colour bonus: each query's best M gallery images by cosine get a colour distance, the rest no bonus (0: all; emd is slow on all)", "metavar": "M"})
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.02, 0.05, 0.1, 0.2, 0.3], metadata={"help": "bonus weights searched on validation (one value: fixed)", "metavar": "A"})
    threshold_quantiles: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3, 0.5], metadata={"help": "thresholds searched, as quantiles of the validation distances", "metavar": "Q"})
    # embedding
    embed_batch_size: int = override(64, "batch size for embedding")
# ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, Config)
    return parser


def check_config(cfg: Config) -> None:
    """Flags that argparse cannot check alone: the shared groups' checks, then this script's own."""
    check_groups(cfg)
    for name in ("colour_top_m", "img_size"):
        if getattr(cfg, name) < 0:
            raise KitError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: 0 or more")
    if not cfg.alphas or not cfg.threshold_quantiles:
        raise KitError("--alphas and --threshold-quantiles need at least one value each")
    if cfg.model.startswith(HF_PREFIX) and cfg.img_size:
        raise KitError(f"--model {cfg.model}: a transformers model brings its own input size; drop --img-size")


def build_tower(cfg: Config) -> tuple[torch.nn.Module, object, PixelScale, str]:
    """The frozen image tower, its eval transform and pixel scale, and a tag of its weights for the cache."""
    if cfg.model.startswith(HF_PREFIX):
        source = cfg.model[len(HF_PREFIX):]
        tower = create_hf_visual(source)
        return tower, tower.transform, PixelScale(tower.mean, tower.std), f"hf|{source}"
    clip = create_visual(cfg.model, cfg.weights, cfg.file_tag, cfg.img_size)
    tag = f"{clip.name}|{cfg.weights}|{clip.image_size}"
    if is_weights_file(cfg.weights):
        tag += f"|{cfg.file_tag}:{fingerprint(cfg.weights)}"
    scale = PixelScale(tuple(clip.preprocess["mean"]), tuple(clip.preprocess["std"]))
    return clip.visual, clip.eval_transform(), scale, tag


def descriptors(inputs: dict[str, list[Path]], cfg: Config, cache_dir: Path) -> dict[str, ColourDescriptors]:
    """Colour histograms of the four image sets (cached by files and descriptor)."""
    out = {}
    for which in SETS:
        paths = inputs[which]
        cache = cache_dir / f"colour_{files_key(paths, cfg.colour)}.npy"
        if cache.is_file():
            out[which] = ColourDescriptors(cfg.colour, np.load(cache), bin_centres(cfg.colour))
            continue
        out[which] = colour_descriptors(paths, cfg.colour, which.replace("_", " "))
        atomic_save_npy(cache, out[which].hist)
    return out


def distances(cosine: np.ndarray, query: ColourDescriptors, gallery: ColourDescriptors, cfg: Config) -> np.ndarray:
    """Colour distances for each query's top-M gallery images by cosine (inf elsewhere)."""
    m = cfg.colour_top_m
    pairs = topk(cosine, m) if 0 < m < cosine.shape[1] else None
    return colour_distances(query, gallery, cfg.distance, pairs)


def report(task: Task, cosine: dict[str, np.ndarray], fused: dict[str, np.ndarray], best: ColourTerm) -> dict[str, dict[str, float]]:
    """A table of the score with and without the colour term, per split with a ground truth."""
    table = Table(title=f"colour term: alpha {best.alpha:g}, threshold {best.threshold:.4g}")
    for col in ("split", "cosine only", "with colour", "mAP@All cosine", "mAP@All colour"):
        table.add_column(col, justify="left" if col == "split" else "right")
    out = {}
    for split in ("val", "test"):
        rel = split_relevance(task, split)
        if rel is None:
            continue
        before, after = evaluate(cosine[split], rel), evaluate(fused[split], rel)
        out[split] = {"score_cosine": before["score"], "score_colour": after["score"], "map_cosine": before["map_all"], "map_colour": after["map_all"]}
        table.add_row(split, f"{before['score']:.2f}", f"{after['score']:.2f}", f"{before['map_all']:.3f}", f"{after['map_all']:.3f}")
    console.print(table)
    return out


def domain_gap(task: Task, cosine: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Mean cosine of correct and of incorrect pairs per split with a ground truth (logged)."""
    out = {}
    for split in ("val", "test"):
        rel = split_relevance(task, split)
        if rel is None:
            continue
        out[split] = mean_cosine_by_relevance(cosine[split], rel)
        log.info("%s: mean cosine of correct pairs %.4f, of incorrect pairs %.4f (gap %.4f)", split,
                 out[split]["correct"], out[split]["incorrect"], out[split]["gap"])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    cfg = config_from_args(Config, build_parser().parse_args(argv))
    setup_logging(cfg.verbose)
    check_config(cfg)
    # the old run invalidated, device, seed, data and the shared validation split
    run = begin_inference_run(cfg)
    run_dir, device, task, t0, timings = run.run_dir, run.device, run.task, run.t0, run.timings
    amp, workers = amp_dtype(device, cfg.amp), resolve_workers(cfg.workers)

    # frozen image tower first (bad flags fail before long work) -> object crops -> embeddings -> cosine
    tower, transform, scale, tag = build_tower(cfg)
    tower = tower.to(device).eval()
    # rank 0 writes the crops; under torchrun the other ranks wait, then read them
    crops = master_first(run.dist_info, lambda: {
        which: object_crops(getattr(task, which), cfg.crop_object, run_dir / "cache", cfg.object_tolerance, which.replace("_", " "))
        for which in SETS})
    inputs = {which: c.paths for which, c in crops.items()}
    model_input = {p: c for which in SETS for p, c in zip(getattr(task, which), inputs[which])}

    embedder = Embedder(tower, transform, scale, device, key=tag, views=tta_views(cfg.tta), batch_size=cfg.embed_batch_size,
                        workers=workers, amp=amp, channels_last=is_cnn(tower), cache_dir=run_dir / "cache", inputs=model_input,
                        dist_info=run.dist_info)
    emb = embed_task(task, embedder.embed_set)
    cosine = similarities(emb)
    timings["embed"] = time.time() - t0 - timings["prepare"]
    if not run.dist_info.master:
        return 0  # under torchrun every rank gets the whole embedding; rank 0 alone adds the colour term and writes

    # the colour term: distances, alpha x threshold searched on validation, applied to both splits
    t1 = time.time()
    desc = descriptors(inputs, cfg, run_dir / "cache")
    dist = {split: distances(cosine[split], desc[f"{split}_query"], desc[f"{split}_gallery"], cfg) for split in ("val", "test")}
    rel_val = split_relevance(task, "val")
    best, grid, warnings = search_with_checks(cosine["val"], dist["val"], rel_val, cfg.alphas, cfg.threshold_quantiles)
    fused = {split: apply_colour_term(cosine[split], dist[split], best.alpha, best.threshold) for split in ("val", "test")}
    timings["colour"] = time.time() - t1
    effect = report(task, cosine, fused, best)
    extra = {
        "colour_term": {
            "alpha": best.alpha, "threshold": best.threshold, "colour": cfg.colour, "distance": cfg.distance,
            "top_m": cfg.colour_top_m, "effect": effect, "warnings": warnings,
            "grid": [{"alpha": c.alpha, "threshold": c.threshold, "val_score": c.val_score, "val_map": c.val_map} for c in grid],
        },
        "embedding_dim": int(emb["val_query"].shape[1]),
        "mean_cosine": domain_gap(task, cosine),
    }
    if cfg.crop_object != "none":
        extra["object_crop"] = {w: {"images": len(c.paths), "whole_image": c.n_whole} for w, c in crops.items()}
    write_model_run(run_dir, cfg.run_name, config_to_dict(cfg), task, fused, timings, extra)
    return 0


if __name__ == "__main__":
    run_cli(main)
