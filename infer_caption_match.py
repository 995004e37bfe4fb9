"""Caption matching without training (Iijima and Stathaki): a BLIP/BLIP-2 captioner writes a
caption for every gallery image, CLIP matches each query image against the captions;
written as runs/<run-name>/{val,test}_sim.npy + meta.json for the ensemble.

    # the paper's setup: BLIP-2 captions, CLIP ViT-L-14 (OpenAI weights) image-to-text
    python infer_caption_match.py --data DATA
    # offline: a captioner saved with save_pretrained and a local open_clip file
    python infer_caption_match.py --data DATA --captioner /models/blip2-opt-2.7b \\
        --weights /models/vit-l-14-openai.bin --file-tag openai
    # a smaller captioner (BLIP base), fewer beams; a second run reuses the first run's captions
    python infer_caption_match.py --data DATA --captioner Salesforce/blip-image-captioning-base --num-beams 1
    python infer_caption_match.py --data DATA --run-name caption_match_b16 --model ViT-B-16 \\
        --weights openai --captions runs/caption_match/captions.json
    # mix in image-to-image similarity: sim = (1 - B) * z(img2txt) + B * z(img2img)
    python infer_caption_match.py --data DATA --blend 0.3
    # the paper's ablation: class labels instead of captions (closed-set data such as PACS)
    python infer_caption_match.py --data DATA --captions-from labels --closed-set

Stages: read data and the shared validation split -> build the open_clip model
(both towers; --weights TAG|none|PATH, as in every script) -> caption every validation and test
gallery image (batched generation, float16/bfloat16 on GPU; cached in
runs/<run-name>/captions.json by file path/size/mtime and captioner settings,
so a second run never loads the captioner; --captions FILE adds the captions
of another run) -> embed the captions with the text tower and the query
images with the image tower (the shared embedding step, --tta views averaged,
cached), L2-normalise -> image-to-text cosine matrices;
with --blend B > 0 also gallery image embeddings, and each row of both
matrices is z-scored (minus its mean, over its standard deviation) before
they are mixed; with --blend 0 the matrix is the plain cosine.

--captions-from labels (the ablation): a gallery image's caption is its class
name put into --label-template. Validation gallery images take the name of
their training identity folder, which must be words (``dog``, ``giraffe``,
``art_painting``: letters, spaces, ``_`` and ``-``; ``id007`` is refused).
Test gallery images have no labels: with --closed-set (the test identities are
the training class names, as in PACS or DomainNet) each one is first given the
training class whose label prompt its image is closest to in CLIP space;
without --closed-set the mode stops with an error, since competition test
identities are new people and have no names.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from utils.atomic import atomic_write_json
from utils.clip.captions import CaptionParams, caption_images
from utils.clip.text import ClipModel, create_clip, encode_texts
from utils.config import (
    EmbeddingConfig,
    RunConfig,
    add_config_args,
    check_at_least,
    check_groups,
    config_from_args,
    config_to_dict,
    override,
)
from utils.data.split import identity_of
from utils.data.task import Task, prepare_task
from utils.device import amp_dtype, pick_device, resolve_workers
from utils.embedding.embed import cosine_similarity
from utils.embedding.embedder import Embedder
from utils.embedding.step import embed_task
from utils.embedding.views import TTA_GROUPS, PixelScale, tta_views
from utils.ensemble.fusion import row_zscore
from utils.errors import KitError, run_cli
from utils.logs import setup_logging
from utils.runs.model_run import write_model_run
from utils.runs.similarity_io import invalidate_run
from utils.seed import seed_everything
from utils.training.distributed import refuse_torchrun

log = logging.getLogger("infer_caption_match")

CAPTION_SOURCES = ("captioner", "labels")
WORD_LABEL = re.compile(r"^[A-Za-z][A-Za-z _'-]*$")


# ----------------------------------------------------------------------------
# defaults = the paper's setup; every field is a --flag (kebab-case); the resolved config goes to meta.json
@dataclass
class Config(EmbeddingConfig, RunConfig):
    # shared flags (utils/config.py): data, split and device (RunConfig), embedding (EmbeddingConfig: --tta, --embed-batch-size, --amp, --workers)
    run_name: str = field(default="caption_match", metadata={"help": "output folder under --runs"})
    # CLIP: any open_clip name or a config .json; text and image towers of the same model
    model: str = field(default="ViT-L-14", metadata={"help": "open_clip model name or a model config .json file", "metavar": "NAME"})
    weights: str = field(default="openai", metadata={"help": "open_clip tag, 'none' (random init) or a local .bin/.pt/.safetensors file of the whole model (both towers)", "metavar": "TAG|none|PATH"})
    file_tag: str = field(default="openai", metadata={"help": "for a local --weights file: the open_clip tag it is a copy of (sets QuickGELU, mean/std)", "metavar": "TAG"})
    img_size: int = field(default=0, metadata={"help": "CLIP input side in pixels; 0 keeps the model's own"})
    # what the gallery's texts are
    captions_from: str = field(default="captioner", metadata={"help": "captioner (generated captions) or labels (class names, the paper's ablation)", "choices": list(CAPTION_SOURCES)})
    captioner: str = field(default="Salesforce/blip2-opt-2.7b", metadata={"help": "BLIP or BLIP-2 hub name or a local save_pretrained folder", "metavar": "NAME|DIR"})
    captions: list[str] = field(default_factory=list, metadata={"help": "captions.json files of earlier runs to reuse (same captioner settings)", "metavar": "FILE"})
    max_new_tokens: int = field(default=30, metadata={"help": "longest caption, in tokens"})
    num_beams: int = field(default=3, metadata={"help": "beam search width (1: greedy, fastest)"})
    caption_prompt: str = field(default="", metadata={"help": "text each caption continues, e.g. 'a picture of' ('' = none)", "metavar": "TEXT"})
    caption_batch_size: int = field(default=16, metadata={"help": "images per generation batch"})
    label_template: str = field(default="{}", metadata={"help": "--captions-from labels: caption of a class, '{}' is its name", "metavar": "TEXT"})
    closed_set: bool = field(default=False, metadata={"help": "--captions-from labels: test identities are the training classes (PACS); label test gallery images by CLIP"})
    # matrix
    blend: float = field(default=0.0, metadata={"help": "B in (1-B)*z(img2txt) + B*z(img2img), rows z-scored when B > 0; 0 = image-to-text only", "metavar": "B"})
    tta: list[str] = override(["flip"], f"test-time view groups of the image embeddings, of {list(TTA_GROUPS)}; none: identity only")
    # machine
    embed_batch_size: int = override(64, "images per CLIP embedding batch")
    amp: bool = override(True, "mixed precision on GPU (CLIP and the captioner)")
# ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, Config)
    return parser


def check_config(cfg: Config) -> None:
    """Flags that argparse cannot check alone: the shared groups' checks, then this script's own."""
    check_groups(cfg)
    if not 0.0 <= cfg.blend <= 1.0:
        raise KitError(f"--blend {cfg.blend}: must be in [0, 1] (0 = image-to-text only, 1 = image-to-image only)")
    check_at_least(cfg, ("caption_batch_size", "max_new_tokens", "num_beams"))
    if "{}" not in cfg.label_template:
        raise KitError(f"--label-template {cfg.label_template!r}: must contain '{{}}' where the class name goes")
    if cfg.captions_from == "labels" and not cfg.closed_set:
        raise KitError(
            "--captions-from labels: test gallery images have no labels; pass --closed-set when the test identities "
            "are the training class names (e.g. PACS), otherwise use --captions-from captioner"
        )
    for f in cfg.captions:
        if not Path(f).is_file():
            raise KitError(f"--captions {f}: file not found; give a captions.json written by an earlier run")


def caption_params(cfg: Config) -> CaptionParams:
    return CaptionParams(cfg.captioner, cfg.max_new_tokens, cfg.num_beams, cfg.caption_prompt, cfg.caption_batch_size, cfg.amp)


def label_caption(identity: str, template: str) -> str:
    """``dog`` -> ``template.format('dog')``; ``art_painting`` -> ``art painting``.

    Raises:
        KitError: the identity name is not words (e.g. ``id007``), so it cannot be a caption.
    """
    if not WORD_LABEL.match(identity):
        raise KitError(
            f"train/{identity}: identity name is not words, so --captions-from labels cannot use it as a caption; "
            "use --captions-from captioner"
        )
    return template.replace("{}", identity.replace("_", " ").replace("-", " "))


def label_texts(task: Task, cfg: Config, clip: ClipModel, device: torch.device, test_gallery_emb: np.ndarray | None) -> dict[str, list[str]]:
    """Gallery texts of the ablation: identity names for val, CLIP-assigned class names for test.

    Raises:
        KitError: an identity is not words.
    """
    val = [label_caption(identity_of(n), cfg.label_template) for n in task.names("val_gallery")]
    if test_gallery_emb is None:
        raise KitError("--captions-from labels: the test gallery's image embeddings are needed (--closed-set)")
    classes = sorted({**task.split.train, **task.split.val})
    prompts = [label_caption(c, cfg.label_template) for c in classes]
    class_emb = encode_texts(clip, prompts, device)
    nearest = (test_gallery_emb @ class_emb.T).argmax(axis=1)
    log.info("closed set: test gallery labelled by CLIP with %d training class names", len(classes))
    return {"val": val, "test": [prompts[i] for i in nearest]}


def blend_similarity(img2txt: np.ndarray, img2img: np.ndarray | None, blend: float) -> np.ndarray:
    """``(1 - blend) * z(img2txt) + blend * z(img2img)`` with rows z-scored; plain img2txt when blend is 0."""
    if blend == 0.0 or img2img is None:
        return img2txt.astype(np.float32)
    return ((1.0 - blend) * row_zscore(img2txt) + blend * row_zscore(img2img)).astype(np.float32)


def gallery_captions(task, cfg: Config, device: torch.device, run_dir: Path) -> dict[str, list[str]]:
    """Each validation and test gallery image's generated caption, through the caption cache."""
    paths = task.val_gallery + task.test_gallery
    captions = caption_images(paths, caption_params(cfg), device, run_dir / "captions.json",
                              extra_caches=[Path(f) for f in cfg.captions], desc="captioning gallery")
    return {"val": captions[:len(task.val_gallery)], "test": captions[len(task.val_gallery):]}


def match(clip, emb: dict[str, np.ndarray], texts: dict[str, list[str]], cfg: Config, device: torch.device) -> dict[str, np.ndarray]:
    """Per split: query images against the gallery's texts, blended with image-to-image under --blend."""
    sims = {}
    for split in ("val", "test"):
        img2txt = cosine_similarity(emb[f"{split}_query"], encode_texts(clip, texts[split], device))
        img2img = cosine_similarity(emb[f"{split}_query"], emb[f"{split}_gallery"]) if cfg.blend > 0 else None
        sims[split] = blend_similarity(img2txt, img2img, cfg.blend)
    return sims


def main(argv: Sequence[str] | None = None) -> int:
    cfg = config_from_args(Config, build_parser().parse_args(argv))
    setup_logging(cfg.verbose)
    check_config(cfg)
    refuse_torchrun("infer_caption_match.py", "the captioner and its caption cache run in one process")
    t0 = time.time()
    run_dir = cfg.runs / cfg.run_name
    invalidate_run(run_dir)  # a killed or failed re-run must not leave the old run looking complete
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)

    # data and the shared validation split (no training: only its val queries/gallery are used)
    task = prepare_task(cfg.data, cfg.runs, cfg.split_params())
    timings = {"prepare": time.time() - t0}

    # CLIP, both towers (weights checked before any long work; on the device after captioning)
    clip = create_clip(cfg.model, cfg.weights, cfg.file_tag, cfg.img_size)
    cache_tag = f"{clip.weights_tag}|seed={cfg.seed}" if cfg.weights == "none" else clip.weights_tag
    scale = PixelScale(tuple(clip.preprocess["mean"]), tuple(clip.preprocess["std"]))

    # generated captions of the gallery (cached; the captioner is loaded only for images without one)
    t1 = time.time()
    texts = gallery_captions(task, cfg, device, run_dir) if cfg.captions_from == "captioner" else {}
    timings["captions"] = time.time() - t1

    embedder = Embedder(clip.model.encode_image, clip.eval_transform(), scale, device, key=cache_tag, views=tta_views(cfg.tta),
                        batch_size=cfg.embed_batch_size, workers=resolve_workers(cfg.workers), amp=amp_dtype(device, cfg.amp),
                        cache_dir=run_dir / "cache")

    # image embeddings (the shared step): queries always; galleries for --blend and the closed-set labels
    t2 = time.time()
    clip.model.to(device)
    sets = ["val_query", "test_query"]
    if cfg.blend > 0:
        sets += ["val_gallery", "test_gallery"]
    elif cfg.captions_from == "labels" and cfg.closed_set:
        sets += ["test_gallery"]
    emb = embed_task(task, embedder.embed_set, sets)
    timings["embed"] = time.time() - t2

    # the ablation's texts: class labels
    if cfg.captions_from == "labels":
        texts = label_texts(task, cfg, clip, device, emb.get("test_gallery"))
    elif cfg.captions_from != "captioner":
        raise KitError(f"--captions-from {cfg.captions_from!r}: choose one of {list(CAPTION_SOURCES)}")
    atomic_write_json(run_dir / "gallery_captions.json", {
        split: dict(zip(task.names(f"{split}_gallery"), texts[split])) for split in ("val", "test")})

    # matrices: query images against gallery captions (and gallery images with --blend)
    t3 = time.time()
    sims = match(clip, emb, texts, cfg, device)
    timings["match"] = time.time() - t3
    distinct = {split: len(set(t)) for split, t in texts.items()}
    log.info("distinct gallery texts: val %d of %d, test %d of %d", distinct["val"], len(texts["val"]), distinct["test"], len(texts["test"]))
    extra = {"captions": {"source": cfg.captions_from, "distinct": distinct,
                          "captioner": caption_params(cfg).tag() if cfg.captions_from == "captioner" else None}}
    write_model_run(run_dir, cfg.run_name, config_to_dict(cfg), task, sims, timings, extra)
    return 0


if __name__ == "__main__":
    run_cli(main)
