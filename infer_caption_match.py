"""Caption matching without training (Iijima and Stathaki): a BLIP/BLIP-2 captioner writes a
caption for every gallery image, CLIP matches each query image against the captions;
written as runs/<run-name>/{val,test}_sim.npy + meta.json for the ensemble.

    # the paper's setup: BLIP-2 OPT-2.7b captions, CLIP ViT-H-14 (LAION-2B, laion2b_s32b_b79k), no TTA
    python infer_caption_match.py --data DATA --preset paper
    # offline: the paper's CLIP from a local open_clip file (read as a copy of laion2b_s32b_b79k)
    python infer_caption_match.py --data DATA --preset paper --captioner /models/blip2-opt-2.7b \\
        --weights /models/vit-h-14-laion2b_s32b_b79k.bin
    # the kit's preset (the default): BLIP-2 OPT-2.7b captions, CLIP ViT-L-14 (OpenAI), flip TTA
    python infer_caption_match.py --data DATA
    # a smaller captioner (BLIP base), fewer beams; a second run reuses the first run's captions
    python infer_caption_match.py --data DATA --captioner Salesforce/blip-image-captioning-base --num-beams 1
    python infer_caption_match.py --data DATA --run-name caption_match_b16 --model ViT-B-16 \\
        --weights openai --captions runs/caption_match/captions.json
    # mix in image-to-image similarity: sim = (1 - B) * z(img2txt) + B * z(img2img)
    python infer_caption_match.py --data DATA --blend 0.3
    # the paper's ablation: the TRUE class labels instead of captions (test labels from a file)
    python infer_caption_match.py --data DATA --captions-from true-labels --test-labels gallery_labels.json
    # another experiment: every gallery image labelled with CLIP's nearest class name (closed set, e.g. PACS)
    python infer_caption_match.py --data DATA --captions-from clip-labels --closed-set

Presets (--preset): ``kit`` (the default) is ViT-L-14 with OpenAI's weights and
flip TTA on the queries; it differs from the paper in the CLIP model (ViT-L-14
OpenAI, not ViT-H-14 LAION-2B) and in the TTA (the paper uses none). ``paper``
sets --model ViT-H-14, --weights laion2b_s32b_b79k (or a local file of it:
--file-tag laion2b_s32b_b79k), --captioner Salesforce/blip2-opt-2.7b and no TTA;
flags that contradict it are refused. Both keep the kit's caption settings
(--max-new-tokens 30, --num-beams 3, no prompt): the paper does not state its own.

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

Class names instead of captions (each put into --label-template); the class
names must be words (``dog``, ``art_painting``: letters, spaces, ``_`` and
``-``; ``id007`` is refused):

- ``--captions-from true-labels`` (the paper's ablation): every gallery image's
  true class. Validation gallery images take the name of their training
  identity folder; test gallery images take theirs from --test-labels FILE
  (JSON ``{gallery name: class name}``, as rehearsal and benchmark data can
  write it); without it the mode stops with an error, since competition test
  identities are new people and have no names.
- ``--captions-from clip-labels --closed-set`` (not the paper's ablation): every
  validation and test gallery image gets the training or validation class
  whose label prompt its image is closest to in CLIP space, so validation
  measures what the test gets. Only for closed sets (the test identities are
  the training class names, as in PACS or DomainNet). Where CLIP gives every
  image one label, the matrix has constant rows and P@k depends on tie order.

The old spelling ``--captions-from labels`` is refused with a hint.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from dataclasses import dataclass, field, replace
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
from utils.distributed import refuse_torchrun
from utils.embedding.embedder import Embedder
from utils.embedding.step import embed_task
from utils.embedding.views import TTA_GROUPS, PixelScale, tta_views
from utils.ensemble.fusion import row_zscore
from utils.errors import KitError, run_cli
from utils.logs import setup_logging
from utils.runs.cosine import cosine_similarity
from utils.runs.model_run import write_model_run
from utils.runs.similarity_io import invalidate_run
from utils.seed import seed_everything

log = logging.getLogger("infer_caption_match")

CAPTION_SOURCES = ("captioner", "true-labels", "clip-labels")
LABEL_SOURCES = ("true-labels", "clip-labels")
# --preset paper: Iijima & Stathaki's models (BLIP-2 OPT-2.7b captions, CLIP ViT-H-14 trained on LAION-2B, no TTA)
PAPER_PRESET = {"model": "ViT-H-14", "weights": "laion2b_s32b_b79k", "file_tag": "laion2b_s32b_b79k",
                "captioner": "Salesforce/blip2-opt-2.7b", "tta": []}
PRESETS = ("kit", "paper")
WORD_LABEL = re.compile(r"^[A-Za-z][A-Za-z _'-]*$")


# ----------------------------------------------------------------------------
# defaults = the kit's preset (see --preset paper for the paper's); every field is a --flag (kebab-case); the resolved config goes to meta.json
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
    captions_from: str = field(default="captioner", metadata={"help": "captioner (generated captions), true-labels (true class names, the paper's ablation) or clip-labels (CLIP's nearest class name, needs --closed-set)", "choices": list(CAPTION_SOURCES)})
    captioner: str = field(default="Salesforce/blip2-opt-2.7b", metadata={"help": "BLIP or BLIP-2 hub name or a local save_pretrained folder", "metavar": "NAME|DIR"})
    captions: list[str] = field(default_factory=list, metadata={"help": "captions.json files of earlier runs to reuse (same captioner settings)", "metavar": "FILE"})
    max_new_tokens: int = field(default=30, metadata={"help": "longest caption, in tokens"})
    num_beams: int = field(default=3, metadata={"help": "beam search width (1: greedy, fastest)"})
    caption_prompt: str = field(default="", metadata={"help": "text each caption continues, e.g. 'a picture of' ('' = none)", "metavar": "TEXT"})
    caption_batch_size: int = field(default=16, metadata={"help": "images per generation batch"})
    label_template: str = field(default="{}", metadata={"help": "--captions-from true-labels|clip-labels: caption of a class, '{}' is its name", "metavar": "TEXT"})
    closed_set: bool = field(default=False, metadata={"help": "--captions-from clip-labels: the test identities are the training classes (PACS); label gallery images by CLIP"})
    # matrix
    blend: float = field(default=0.0, metadata={"help": "B in (1-B)*z(img2txt) + B*z(img2img), rows z-scored when B > 0; 0 = image-to-text only", "metavar": "B"})
    tta: list[str] = override(["flip"], f"test-time view groups of the image embeddings, of {list(TTA_GROUPS)}; none: identity only")
    # machine
    embed_batch_size: int = override(64, "images per CLIP embedding batch")
    amp: bool = override(True, "mixed precision on GPU (CLIP and the captioner)")
    # the paper's preset and the true-label ablation's test labels
    preset: str = field(default="kit", metadata={"help": "kit (ViT-L-14 openai, flip TTA) or paper (ViT-H-14 laion2b_s32b_b79k, BLIP-2 OPT-2.7b, no TTA)", "choices": list(PRESETS)})
    test_labels: str = field(default="", metadata={"help": "--captions-from true-labels: JSON {test gallery name: class name} ('' = none)", "metavar": "FILE"})
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
    if cfg.captions_from == "clip-labels" and not cfg.closed_set:
        raise KitError(
            "--captions-from clip-labels: pass --closed-set when the test identities are the training class names "
            "(e.g. PACS); otherwise use --captions-from captioner, or true-labels with --test-labels FILE"
        )
    if cfg.captions_from == "true-labels" and not cfg.test_labels:
        raise KitError("--captions-from true-labels: the test gallery's labels are needed; pass --test-labels FILE "
                       "({gallery name: class name}), or use --captions-from clip-labels --closed-set")
    if cfg.test_labels and not Path(cfg.test_labels).is_file():
        raise KitError(f"--test-labels {cfg.test_labels}: file not found; give a JSON {{gallery name: class name}}")
    for f in cfg.captions:
        if not Path(f).is_file():
            raise KitError(f"--captions {f}: file not found; give a captions.json written by an earlier run")


def refuse_old_spelling(argv: Sequence[str]) -> None:
    """``--captions-from labels`` named two experiments; it is refused with the two names that replaced it.

    Raises:
        KitError: the old spelling is on the command line.
    """
    args = list(argv)
    for i, a in enumerate(args):
        if a == "--captions-from=labels" or (a == "--captions-from" and args[i + 1:i + 2] == ["labels"]):
            raise KitError("--captions-from labels: renamed; use true-labels (true class names, the paper's ablation, "
                           "with --test-labels FILE) or clip-labels --closed-set (CLIP's nearest class name)")


def apply_preset(cfg: Config) -> Config:
    """The config with its --preset's models filled in (``kit``: unchanged).

    Raises:
        KitError: a flag contradicts --preset paper (another model, tag, captioner or TTA).
    """
    if cfg.preset == "kit":
        return cfg
    elif cfg.preset != "paper":
        raise KitError(f"--preset {cfg.preset!r}: choose one of {list(PRESETS)}")
    kit = Config()
    for name in ("model", "file_tag", "captioner", "tta"):
        given, want = getattr(cfg, name), PAPER_PRESET[name]
        if given not in (getattr(kit, name), want):
            flag = "--" + name.replace("_", "-")
            raise KitError(f"--preset paper: it sets {flag} {want or '(none)'}; drop {flag} {given}, or use --preset kit")
    weights = cfg.weights
    if weights == kit.weights:
        weights = PAPER_PRESET["weights"]
    elif weights != PAPER_PRESET["weights"] and not Path(weights).is_file():
        raise KitError(f"--preset paper: --weights {weights!r} is neither {PAPER_PRESET['weights']} nor a file of it; "
                       "drop --weights, or use --preset kit")
    return replace(cfg, **{**PAPER_PRESET, "weights": weights})


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


def read_test_labels(path: str, gallery_names: list[str]) -> dict[str, str]:
    """``{test gallery name: class name}`` from --test-labels, covering every test gallery image.

    Raises:
        KitError: the file is not such a JSON object, or misses a gallery image.
    """
    try:
        labels = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise KitError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise KitError(f"{path}: must be a JSON object {{gallery name: class name}}")
    missing = [n for n in gallery_names if n not in labels]
    if missing:
        raise KitError(f"{path}: no label for {len(missing)} test gallery images, e.g. {missing[0]}")
    return labels


def label_texts(task: Task, cfg: Config, clip: ClipModel, device: torch.device, emb: dict[str, np.ndarray]) -> dict[str, list[str]]:
    """Gallery texts from class names: true labels (val: identity folders; test: --test-labels),
    or CLIP's nearest class name for every gallery image (--captions-from clip-labels --closed-set).

    Raises:
        KitError: a class name is not words, a test label is missing, or an unknown mode.
    """
    if cfg.captions_from == "true-labels":
        val = [label_caption(identity_of(n), cfg.label_template) for n in task.names("val_gallery")]
        labels = read_test_labels(cfg.test_labels, task.names("test_gallery"))
        return {"val": val, "test": [label_caption(labels[n], cfg.label_template) for n in task.names("test_gallery")]}
    elif cfg.captions_from == "clip-labels":
        classes = sorted({**task.split.train, **task.split.val})
        prompts = [label_caption(c, cfg.label_template) for c in classes]
        class_emb = encode_texts(clip, prompts, device)
        log.info("closed set: val and test gallery labelled by CLIP with %d class names", len(classes))
        return {split: [prompts[i] for i in (emb[f"{split}_gallery"] @ class_emb.T).argmax(axis=1)] for split in ("val", "test")}
    else:
        raise KitError(f"--captions-from {cfg.captions_from!r}: choose one of {list(LABEL_SOURCES)}")


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
    refuse_old_spelling(sys.argv[1:] if argv is None else argv)
    cfg = apply_preset(config_from_args(Config, build_parser().parse_args(argv)))
    setup_logging(cfg.verbose)
    check_config(cfg)
    refuse_torchrun("infer_caption_match.py", "the captioner and its caption cache run in one process")
    log.info("preset %s: CLIP %s (%s), captioner %s, TTA %s", cfg.preset, cfg.model, cfg.weights, cfg.captioner, cfg.tta or "none")
    t0 = time.time()
    run_dir = cfg.runs / cfg.run_name
    invalidate_run(run_dir)  # a killed or failed re-run must not leave the old run looking complete
    device = pick_device(cfg.device)
    seed_everything(cfg.seed, cfg.deterministic, device)

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

    # image embeddings (the shared step): queries always; galleries for --blend and the CLIP labels
    t2 = time.time()
    clip.model.to(device)
    sets = ["val_query", "test_query"]
    if cfg.blend > 0 or cfg.captions_from == "clip-labels":
        sets += ["val_gallery", "test_gallery"]
    emb = embed_task(task, embedder.embed_set, sets)
    timings["embed"] = time.time() - t2

    # the texts from class names: true labels or CLIP's labels
    if cfg.captions_from in LABEL_SOURCES:
        texts = label_texts(task, cfg, clip, device, emb)
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
