"""Face embeddings without training: detected, aligned face crops -> FaceNet or dlib, with TTA,
written as runs/<run-name>/{val,test}_sim.npy + meta.json for the ensemble.

    # FaceNet (InceptionResnetV1, VGGFace2 weights from the hub or the torch cache):
    python infer_facenet.py --data DATA
    # offline, FaceNet weights from a local facenet-pytorch state dict:
    python infer_facenet.py --data DATA --weights /path/to/20180402-114759-vggface2.pt
    # dlib's ResNet face model (weights ship in face-recognition-models, offline), run runs/dlib;
    # the defaults (detection cascade, grey crops, flip + blur TTA) are the best measured on the hard face benchmark:
    python infer_facenet.py --data DATA --embedder dlib
    # a gallery of false-colour images (colour maps, thermal looks): a second run on hue crops
    python infer_facenet.py --data DATA --embedder dlib --face-colour hue --run-name dlib_hue
    # tilted faces: every detector stage also searches rotated copies
    python infer_facenet.py --data DATA --embedder dlib --detector-rotations -20 20
    # MTCNN alone (faster; photos), other cascade stages, another fallback:
    python infer_facenet.py --data DATA --embedder dlib --detector mtcnn
    python infer_facenet.py --data DATA --embedder dlib --detector-stages mtcnn hog rotate --face-fallback best
    # other test-time views (flip rot brightness scale: 8 views), or none:
    python infer_facenet.py --data DATA --embedder dlib --tta flip rot brightness scale
    python infer_facenet.py --data DATA --embedder dlib --tta
    # gallery views (default: the detector stage's transform and a texture low-pass, fused per pair by the rule
    # validation picks; where rules tie, a harder validation of rendered styles; else zmax); the plain view only, or a fixed rule:
    python infer_facenet.py --data DATA --embedder dlib --gallery-views
    python infer_facenet.py --data DATA --embedder dlib --view-fusion max --texture-eye-frac 0.05 0.1
    # the matrices as cosines, without the two-way normalisation (dual-softmax by default):
    python infer_facenet.py --data DATA --embedder dlib --gallery-norm none
    # the floor: FaceNet with random weights
    python infer_facenet.py --data DATA --weights none --run-name facenet_random

Stages: read data and the shared validation split -> detect one face per image
(--detector cascade: the --detector-stages in turn, each only on the images
the earlier ones missed, the stage recorded per image; mtcnn: MTCNN alone,
batched on letterboxed canvases; of several faces the most central one with
--face-select center, the biggest with largest) -> cut aligned crops
(FaceNet: the square box plus margin, eyes levelled; dlib: dlib's 5-point
landmarks and chip geometry); an image without a face falls back to the centre
square of the whole image (--face-fallback), resized and normalised like every
crop, and is counted in meta.json -> crops and embeddings are cached under
runs/face_cache/, shared by every face run on this data (keyed by file
path/size/mtime, the detector, crop and embedder settings) -> the crops in
--face-colour (grey by default: a style's palette removed) -> embed every view
of every batch (identity + --tta views, on query and gallery alike), average
the L2-normalised embeddings, normalise -> cosine similarity matrices (gallery
views fused per pair) -> --gallery-norm: dual-softmax over the gallery and over
the queries of each split, so that a gallery image close to every query (often a
whole style) is discounted; full matrices only (the top-k form stays cosine).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

from utils.config import (
    EmbeddingConfig,
    FormConfig,
    RunConfig,
    add_config_args,
    check_at_least,
    check_groups,
    config_from_args,
    config_to_dict,
    override,
)
from utils.device import resolve_processes
from utils.distributed import refuse_torchrun
from utils.embedding.step import embed_task
from utils.errors import run_cli
from utils.faces.cascade import DEFAULT_ROTATED_STAGES, DEFAULT_ROTATIONS, DEFAULT_STAGES, MTCNN_STAGES, STAGES
from utils.faces.detect import SELECT_METHODS
from utils.faces.embedder import EMBEDDERS
from utils.faces.pipeline import FACE_COLOURS, FACE_FALLBACKS, FacePipeline
from utils.faces.tiebreak import face_harder_set
from utils.faces.views import FUSIONS, GALLERY_NORMS, GALLERY_VIEWS, fused_similarities, gallery_normalised
from utils.logs import setup_logging
from utils.runs.cosine import similarities
from utils.runs.gap import META_KEY as GAP_KEY
from utils.runs.gap import save_run_embeddings
from utils.runs.model_run import begin_inference_run, write_embedding_run, write_model_run
from utils.runs.topk_run import use_topk_form

log = logging.getLogger("infer_facenet")


# ----------------------------------------------------------------------------
# defaults: every field is a --flag (kebab-case); the resolved config goes to meta.json
@dataclass
class Config(EmbeddingConfig, FormConfig, RunConfig):
    # shared flags (utils/config.py): data, split and device (RunConfig), run form (FormConfig),
    # embedding (EmbeddingConfig: --tta, --embed-batch-size, --amp, --workers)
    run_name: str = field(default="", metadata={"help": "output folder under --runs ('' = the embedder's name: facenet or dlib)"})
    # embedder: run both (each writes its own run) and let ensemble.py fuse them
    embedder: str = field(default="facenet", metadata={"help": "facenet (InceptionResnetV1, 512-d) or dlib (ResNet, 128-d)", "choices": list(EMBEDDERS)})
    weights: str = field(default="default", metadata={
        "help": "backbone weights: 'default' (facenet: VGGFace2 from the hub/torch cache; dlib: the .dat of face-recognition-models), "
                "facenet: 'casia-webface' or 'none' (random init, the floor); or a local file (facenet: state dict; dlib: .dat)",
        "metavar": "TAG|none|PATH"})
    shape_predictor: str = field(default="", metadata={"help": "dlib only: 5-point landmarks .dat ('' = face-recognition-models')", "metavar": "PATH"})
    # detection: MTCNN on a letterboxed square canvas; 'none' = every image uses the centre-square fallback
    detector: str = field(default="cascade", metadata={"help": "face detector: mtcnn, cascade (--detector-stages in turn, each on what the earlier missed) or none", "choices": ["mtcnn", "cascade", "none"]})
    detector_stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES), metadata={"help": f"cascade only: stages tried in order, of {list(STAGES)}", "metavar": "STAGE"})
    detector_rotations: list[float] = field(default_factory=lambda: list(DEFAULT_ROTATIONS), metadata={"help": "cascade only: the --detector-rotated-stages also try copies rotated by these degrees where upright found nothing (the flag alone: upright only)", "metavar": "DEG"})
    detector_rotated_stages: list[str] = field(default_factory=lambda: list(DEFAULT_ROTATED_STAGES), metadata={"help": f"cascade only: the MTCNN stages that search --detector-rotations, of {list(MTCNN_STAGES)}", "metavar": "STAGE"})
    min_face_frac: float = field(default=0.15, metadata={"help": "cascade only: a box whose side is below this share of the image's shorter side is not a face"})
    face_fallback: str = field(default="center", metadata={"help": "no face found -> center (centre square), letterbox (the whole image) or best (cascade only: its best box below the gates)", "choices": list(FACE_FALLBACKS)})
    face_colour: str = field(default="grey", metadata={"help": "crops the embedder sees, query and gallery alike: grey (a style's colours removed), rgb, or hue (false colour read back to brightness; distorts some colour photos)", "choices": list(FACE_COLOURS)})
    detect_px: int = field(default=320, metadata={"help": "side of the detection canvas; raise it for small faces in big photos"})
    min_face_px: int = field(default=20, metadata={"help": "smallest face searched, in canvas pixels"})
    thresholds: tuple[float, float, float] = field(default=(0.6, 0.7, 0.7), metadata={"help": "MTCNN P/R/O-net thresholds; lower finds more painted faces (and more false ones)"})
    face_select: str = field(default="center", metadata={
        "help": "one face per image: center (area minus 2x squared offset from the image centre) or largest",
        "choices": list(SELECT_METHODS)})
    margin_px: int = field(default=20, metadata={"help": "facenet only: context around the box, pixels of the 160 px crop (dlib uses its chip padding)"})
    align_eyes: bool = field(default=True, metadata={"help": "facenet only: rotate crops so the eyes are level"})
    # test-time augmentation, on query and gallery alike; '--tta' alone = identity only
    tta: list[str] = override(["flip", "blur"])
    detect_batch_size: int = field(default=32, metadata={"help": "images per detection batch"})
    embed_batch_size: int = override(64, "crops per embedding batch")
    # machine
    amp: bool = override(True, "mixed precision on GPU for FaceNet")
    workers: int = override(-1, "DataLoader worker processes for loading and cropping (-1: half the usable cores, 1 to 8; 0: main process)")
    dlib_processes: int = field(default=-1, metadata={"help": "processes that run dlib's face model (--embedder dlib) and the cascade's mmod stage, one core each (-1: every usable core; 1: the main process); the results are the same"})
    # gallery views (utils/faces/views.py): reading aids for stylised gallery faces, fused per pair with each query
    gallery_views: list[str] = field(default_factory=lambda: list(GALLERY_VIEWS), metadata={"help": f"gallery images are also embedded through these views, of {list(GALLERY_VIEWS)} (detector: the transform of the cascade stage that read the face; texture: low-pass at --texture-eye-frac); the flag alone: none", "metavar": "VIEW"})
    texture_eye_frac: list[float] = field(default_factory=lambda: [0.05], metadata={"help": "texture views: Gaussian sigma as a fraction of the inter-eye distance (one view per value)", "metavar": "FRAC"})
    view_fusion: str = field(default="auto", metadata={"help": "how a pair's view similarities are fused: auto (validation chooses; where rules tie, a harder validation of rendered styles), zmax (closest view, z-scored per query), max, softmax, mean, plain (no views)", "choices": list(FUSIONS)})
    gallery_norm: str = field(default="dual_softmax", metadata={"help": "two-way normalisation of the run's matrices: dual_softmax (a gallery image close to every query is discounted; chosen by leave-one-style-out) or none", "choices": list(GALLERY_NORMS)})
    face_warn_share: float = field(default=0.2, metadata={"help": "warn when fewer than this share of the first --face-warn-after images hold a face (0: never)"})
    face_warn_after: int = field(default=64, metadata={"help": "images detected before the early face-count warning"})
# ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, Config)
    return parser


def check_config(cfg: Config) -> None:
    """Flags that argparse cannot check alone: the shared groups' checks, then this script's own."""
    check_groups(cfg)
    check_at_least(cfg, ("detect_batch_size",))
    resolve_processes(cfg.dlib_processes)


def use_views(cfg: Config, pipe: FacePipeline, task) -> bool:
    """Whether the gallery views are embedded and fused: asked for, and the run holds full matrices."""
    if not pipe.view_params.views or cfg.view_fusion == "plain":
        return False
    if use_topk_form(len(task.test_query), len(task.test_gallery), cfg.run_form().max_cells):
        log.warning("gallery views are fused only in full matrices; this run's top-k form uses the plain view")
        return False
    return True


def matrices_or_topk(cfg: Config, task, run_dir, run_name: str, emb, timings, extra) -> dict | None:
    """The plain view's matrices; None once the top-k form is written (too large for full matrices:
    no gallery normalisation there, said in one line)."""
    if not use_topk_form(len(task.test_query), len(task.test_gallery), cfg.run_form().max_cells):
        return similarities(emb)
    if cfg.gallery_norm != "none":
        log.warning("--gallery-norm %s works on full matrices; this run's top-k form is not normalised", cfg.gallery_norm)
    write_embedding_run(run_dir, run_name, config_to_dict(cfg), task, emb, timings, {**extra, "gallery_norm": {"norm": "none"}}, form=cfg.run_form())
    return None


def main(argv: Sequence[str] | None = None) -> int:
    cfg = config_from_args(Config, build_parser().parse_args(argv))
    setup_logging(cfg.verbose)
    check_config(cfg)
    refuse_torchrun("infer_facenet.py", "the face detector and the face cache are not sharded")
    # the old run invalidated, device, seed, data and the shared validation split
    run_name = cfg.run_name or cfg.embedder
    run = begin_inference_run(cfg, run_name)
    run_dir, device, task, t0, timings = run.run_dir, run.device, run.task, run.t0, run.timings

    # models: the embedder (weights checked before any long work), then the detector; crops and
    # embeddings are cached under runs/face_cache/, shared by every face run on this data
    pipe = FacePipeline(cfg, device, cache_dir=cfg.runs / "face_cache")

    # crops and embeddings of the four image sets, then the two matrices
    emb = embed_task(task, pipe.embed_set)
    views = use_views(cfg, pipe, task)
    view_emb = {w: pipe.embed_views(getattr(task, w), task.names(w), w.replace("_", " ")) for w in ("val_gallery", "test_gallery")} if views else {}
    timings["embed"] = time.time() - t0 - timings["prepare"]
    pipe.log_fallbacks()
    extra = {"faces": pipe.faces, "tta_views": len(pipe.views)}
    if views:
        harder = lambda: face_harder_set(pipe, task, emb, view_emb["val_gallery"], seed=cfg.seed)  # noqa: E731  (only where rules tie)
        sims, extra["view_fusion"] = fused_similarities(task, emb, view_emb, cfg.view_fusion, harder)
        extra["gallery_views"] = {"names": ["plain", *pipe.view_params.names()], "per_image": pipe.image_views}
    else:
        extra["view_fusion"] = {"rule": "plain", "chosen_by": "no gallery views" if pipe.view_params.views else "--gallery-views (none)"}
        sims = matrices_or_topk(cfg, task, run_dir, run_name, emb, timings, extra)
        if sims is None:
            return 0
    extra[GAP_KEY] = save_run_embeddings(run_dir, emb)  # the plain embeddings, for visualize.py --gap and the adapter
    sims, extra["gallery_norm"] = gallery_normalised(sims, cfg.gallery_norm)
    write_model_run(run_dir, run_name, config_to_dict(cfg), task, sims, timings, extra)
    return 0


if __name__ == "__main__":
    run_cli(main)
