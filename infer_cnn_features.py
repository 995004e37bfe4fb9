"""Frozen ImageNet CNN features, optionally of the faces only: no training, cosine neighbours,
written as runs/<run-name>/{val,test}_sim.npy + meta.json for the ensemble.

    # ResNet-50's last stage, average-pooled, ImageNet weights from the hub:
    python infer_cnn_features.py --data DATA
    # the painting project's two set-ups: VGG16 / ResNet-50 truncated before the classifier
    python infer_cnn_features.py --data DATA --model vgg16 --pool flatten --img-size 224 --run-name vgg16
    python infer_cnn_features.py --data DATA --model resnet50 --stage 3 --pool gem --run-name resnet50_s3
    # its "facial similarity" mode: the box covering every face MTCNN finds (or the face path's one face),
    # only where the face cascade's gates keep a face (box side, MTCNN probability)
    python infer_cnn_features.py --data DATA --face-crop all --run-name cnn_faces
    python infer_cnn_features.py --data DATA --face-crop one --face-select largest --min-face-frac 0.2
    # PSY222's other distance: the matrix is minus the Euclidean distance (higher = more similar)
    python infer_cnn_features.py --data DATA --metric euclidean --run-name cnn_euclidean
    # offline: weights from a local file; or random weights (the floor)
    python infer_cnn_features.py --data DATA --weights /path/to/resnet50.safetensors
    python infer_cnn_features.py --data DATA --weights none --run-name cnn_random

Stages: read data and the shared validation split -> (--face-crop) detect
every face with MTCNN, crop each image to the box covering all of them
(``all``) or to the one face the face path would pick (``one``), but only
where the face cascade (utils.faces.cascade, its MTCNN stage, upright) keeps a
face through its gates: a box side of at least --min-face-frac of the image's
shorter side and an MTCNN probability of at least --min-face-prob; an image
without a kept face stays whole and is counted in meta.json (with the images
whose detections the gates refused); boxes, gates and crops are cached in
runs/face_cache/ -> a frozen timm backbone, pruned after ``--stage``, its
feature map pooled (``--pool avg|max|gem|flatten``) -> L2-normalised
embeddings (flip TTA), cached -> similarity matrices (``--metric cosine``, or
``euclidean``: minus the Euclidean distance of the L2-normalised embeddings,
sqrt(2 - 2 cos), which ranks as cosine does and changes only the matrix's
scale; PSY222's Euclidean on raw features would need un-normalised embeddings,
which the shared embedding step does not give). Printed beside
the usual metrics, and recorded in meta.json: the mean RMSE and SSIM between
each query and its top-``--pixel-k`` retrieved images (the painting
project's evaluation; grey, ``--pixel-px`` squares; on the images the model saw).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import timm
import torch
from rich.table import Table

from utils.cache import cached, files_key
from utils.config import (
    EmbeddingConfig,
    RunConfig,
    TimmModelConfig,
    add_config_args,
    check_at_least,
    check_groups,
    config_from_args,
    config_to_dict,
    override,
)
from utils.data.augment import eval_transform
from utils.device import amp_dtype, is_cnn, resolve_workers
from utils.distributed import master_first
from utils.embedding.backbone import create_backbone, weights_id
from utils.embedding.embedder import Embedder
from utils.embedding.stage_features import POOLS, StageFeatures
from utils.embedding.step import SETS, embed_task, similarities
from utils.embedding.views import PixelScale, tta_views
from utils.errors import KitError, run_cli
from utils.faces.cascade import CascadeParams, FaceCascade
from utils.faces.detect import SELECT_METHODS, DetectorParams, FaceDetector
from utils.faces.face_box import FACE_BOX_MODES, check_face_margin, face_box_crops
from utils.logs import console, setup_logging
from utils.runs.model_run import begin_inference_run, write_model_run
from utils.runs.pixel_agreement import grey_squares, topk_agreement

log = logging.getLogger("infer_cnn_features")

METRICS = ("cosine", "euclidean")

# ----------------------------------------------------------------------------
# defaults: every field is a --flag (kebab-case); the resolved config goes to meta.json
@dataclass
class Config(EmbeddingConfig, TimmModelConfig, RunConfig):
    # shared flags (utils/config.py): data, split and device (RunConfig), the timm model (TimmModelConfig: --model, --img-size),
    # embedding (EmbeddingConfig: --tta, --embed-batch-size, --amp, --workers)
    run_name: str = field(default="cnn_features", metadata={"help": "output folder name under --runs"})
    # backbone: any timm model with intermediate features (resnet50, vgg16, convnext_tiny, vit_base_patch16_224, ...)
    weights: str = field(default="default", metadata={"help": "backbone weights: 'default' (timm's pretrained, from the hub), 'none' (random init) or a local file", "metavar": "TAG|none|PATH"})
    stage: int = field(default=-1, metadata={"help": "feature stage (timm feature_info index; -1 = the last); earlier = more about texture and colour", "metavar": "N"})
    pool: str = field(default="avg", metadata={"help": "how the stage's map becomes a vector", "choices": list(POOLS)})
    # faces: crop before embedding; an image without a face stays whole (counted in meta.json)
    face_crop: str = field(default="none", metadata={"help": "none, all (box covering every face) or one (the face path's one face)", "choices": ["none", *FACE_BOX_MODES]})
    face_select: str = field(default="center", metadata={"help": "--face-crop one: which face", "choices": list(SELECT_METHODS)})
    face_margin: float = field(default=0.2, metadata={"help": "widen the face box by this share of its side on each side"})
    detect_px: int = field(default=320, metadata={"help": "side of MTCNN's detection canvas; raise it for small faces in big images"})
    detect_batch_size: int = field(default=16, metadata={"help": "images per detection batch"})
    # evaluation beside the usual metrics: how alike each query and its top-K look
    pixel_k: int = field(default=5, metadata={"help": "retrieved images per query compared by RMSE and SSIM (0: skip)", "metavar": "K"})
    pixel_px: int = field(default=64, metadata={"help": "side of the grey squares RMSE and SSIM compare"})
    # embedding
    embed_batch_size: int = override(64, "batch size for embedding")
    # the face cascade's gates for --face-crop, and the distance
    min_face_frac: float = field(default=0.15, metadata={"help": "--face-crop: a face's box side must be at least this share of the image's shorter side (the cascade's gate)"})
    min_face_prob: float = field(default=0.9, metadata={"help": "--face-crop: MTCNN's probability a face must reach (the cascade's gate)"})
    metric: str = field(default="cosine", metadata={"help": "similarity: cosine, or euclidean (minus the distance; higher = more similar)", "choices": list(METRICS)})
# ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, Config)
    return parser


def check_config(cfg: Config) -> None:
    """Flags that argparse cannot check alone: the shared groups' checks, then this script's own."""
    check_groups(cfg)
    check_at_least(cfg, ("detect_batch_size", "pixel_px"))
    if cfg.pixel_k < 0:
        raise KitError(f"--pixel-k {cfg.pixel_k}: 0 or more")
    if cfg.pixel_px < 7:
        raise KitError(f"--pixel-px {cfg.pixel_px}: SSIM needs at least 7 pixels")
    gate_params(cfg).check()
    check_face_margin(cfg.face_margin)


def gate_params(cfg: Config) -> CascadeParams:
    """The face cascade reduced to its upright MTCNN stage (the detector of the crops) with its gates."""
    return CascadeParams(stages=("mtcnn",), mtcnn=DetectorParams(canvas_px=cfg.detect_px, select=cfg.face_select),
                         stage_rotations=(), min_face_frac=cfg.min_face_frac, min_prob=cfg.min_face_prob)


def face_gates(cfg: Config, paths: list[Path], device: torch.device, desc: str) -> np.ndarray:
    """(n,) bool: the face cascade keeps a face in the image (cached in runs/face_cache/)."""
    params = gate_params(cfg)

    def detect() -> np.ndarray:
        faces = FaceCascade(params, device).detect(paths, workers=resolve_workers(cfg.workers), desc=f"{desc}: face gates")
        return (faces.stage >= 0).astype(np.int8)

    return cached(cfg.runs / "face_cache" / f"face_gates_{files_key(paths, params.tag())}.npy", detect, f"{desc}: face gates").astype(bool)


def gated_face_crops(cfg: Config, paths: list[Path], detector: FaceDetector, device: torch.device, desc: str) -> tuple[list[Path], dict[str, int]]:
    """Each image's face crop where the cascade's gates keep a face, else the image itself; and the counts."""
    crops = face_box_crops(paths, detector, cfg.face_crop, cfg.face_margin, cfg.runs / "face_cache",
                           batch_size=cfg.detect_batch_size, desc=desc)
    keep = face_gates(cfg, paths, device, desc)
    out = [c if k else p for p, c, k in zip(paths, crops.paths, keep)]
    cropped = sum(c != p for p, c in zip(paths, out))
    refused = sum(c != p and not k for p, c, k in zip(paths, crops.paths, keep))
    counts = {"images": len(paths), "faces_found": cropped, "whole_image": len(paths) - cropped,
              "refused_by_gates": refused, "faces_total": int(crops.n_faces[keep].sum())}
    if refused:
        log.info("%s: the gates refused the detections of %d images (kept whole)", desc, refused)
    return out, counts


def weights_tag(cfg: Config) -> str:
    """Identifies the features for the embedding cache."""
    return f"{cfg.model}|{weights_id(cfg.weights)}|stage={cfg.stage}|{cfg.pool}|{cfg.img_size}"


def model_inputs(cfg: Config, task, device: torch.device) -> tuple[dict[str, list[Path]], dict[str, dict[str, int]]]:
    """What each image set is embedded from: the images, or their face crops; and the face counts."""
    inputs = {which: list(getattr(task, which)) for which in SETS}
    if cfg.face_crop == "none":
        return inputs, {}
    if cfg.face_crop not in FACE_BOX_MODES:
        raise KitError(f"--face-crop {cfg.face_crop!r}: choose none or one of {FACE_BOX_MODES}")
    detector = FaceDetector(DetectorParams(canvas_px=cfg.detect_px, select=cfg.face_select), device)
    faces = {}
    for which in SETS:
        inputs[which], faces[which] = gated_face_crops(cfg, inputs[which], detector, device, which.replace("_", " "))
    return inputs, faces


def similarity(emb: dict[str, np.ndarray], metric: str) -> dict[str, np.ndarray]:
    """Query x gallery matrices per split, higher = more similar: cosine, or minus the Euclidean distance.

    Raises:
        KitError: an unknown metric.
    """
    sims = similarities(emb)
    if metric == "cosine":
        return sims
    elif metric == "euclidean":  # unit vectors: |a - b|^2 = 2 - 2 cos
        return {split: (-np.sqrt(np.clip(2.0 - 2.0 * s, 0.0, None))).astype(np.float32) for split, s in sims.items()}
    else:
        raise KitError(f"--metric {metric!r}: choose one of {list(METRICS)}")


def pixel_agreement(cfg: Config, inputs: dict[str, list[Path]], sims: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Mean RMSE and SSIM of each split's queries against their top-K, and a table of them."""
    out = {}
    for split in ("val", "test"):
        q = grey_squares(inputs[f"{split}_query"], cfg.pixel_px, f"{split} query")
        g = grey_squares(inputs[f"{split}_gallery"], cfg.pixel_px, f"{split} gallery")
        out[split] = topk_agreement(sims[split], q, g, cfg.pixel_k)
    table = Table(title=f"pixel agreement of each query with its top-{cfg.pixel_k} ({cfg.pixel_px} px grey)")
    for col in ("split", "RMSE (lower = closer)", "SSIM (higher = closer)"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for split, m in out.items():
        table.add_row(split, f"{m['rmse']:.4f}", f"{m['ssim']:.4f}")
    console.print(table)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    cfg = config_from_args(Config, build_parser().parse_args(argv))
    setup_logging(cfg.verbose)
    check_config(cfg)
    # the old run invalidated, device, seed, data and the shared validation split
    run = begin_inference_run(cfg)
    run_dir, device, task, t0, timings = run.run_dir, run.device, run.task, run.t0, run.timings
    amp, workers = amp_dtype(device, cfg.amp), resolve_workers(cfg.workers)

    # model first (a bad --model/--weights/--stage fails before any long work), then the face crops
    backbone = create_backbone(cfg.model, cfg.weights)
    data_cfg = timm.data.resolve_data_config({}, model=backbone)
    features = StageFeatures(backbone, cfg.stage, cfg.pool).to(device).eval()
    inputs, faces = master_first(run.dist_info, lambda: model_inputs(cfg, task, device))  # rank 0 writes the face cache
    timings["faces"] = time.time() - t0 - timings["prepare"]

    # embeddings (of the face crops, where asked) and cosine matrices
    scale = PixelScale(tuple(data_cfg["mean"]), tuple(data_cfg["std"]))
    transform = eval_transform(cfg.img_size, scale.mean, scale.std)
    model_input = {p: c for which in SETS for p, c in zip(getattr(task, which), inputs[which])}
    tag = weights_tag(cfg) + f"|faces={cfg.face_crop}:{cfg.face_select}:{cfg.face_margin}:{cfg.detect_px}"

    embedder = Embedder(features, transform, scale, device, key=tag, views=tta_views(cfg.tta), batch_size=cfg.embed_batch_size,
                        workers=workers, amp=amp, channels_last=is_cnn(features), cache_dir=run_dir / "cache", inputs=model_input,
                        dist_info=run.dist_info)
    emb = embed_task(task, embedder.embed_set)
    sims = similarity(emb, cfg.metric)
    timings["embed"] = time.time() - t0 - timings["prepare"] - timings["faces"]
    if not run.dist_info.master:
        return 0  # under torchrun every rank gets the whole embedding; rank 0 alone scores and writes
    if faces:
        n_whole = sum(f["whole_image"] for f in faces.values())
        log.info("no face found in %d of %d images (whole image used): %s", n_whole, sum(f["images"] for f in faces.values()),
                 ", ".join(f"{k} {v['whole_image']}/{v['images']}" for k, v in faces.items()))
    extra = {"feature_dim": int(emb["val_query"].shape[1]), "stage_index": features.index, "faces": faces}
    if cfg.pixel_k:
        t1 = time.time()
        extra["pixel_agreement"] = pixel_agreement(cfg, inputs, sims)
        timings["pixel_agreement"] = time.time() - t1
    write_model_run(run_dir, cfg.run_name, config_to_dict(cfg), task, sims, timings, extra)
    return 0


if __name__ == "__main__":
    run_cli(main)
