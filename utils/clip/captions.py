"""Image captions from a BLIP or BLIP-2 captioner (``transformers``), with a JSON cache.

    >>> params = CaptionParams("Salesforce/blip2-opt-2.7b")              # hub name (the weights folder's copy when fetched)
    >>> params = CaptionParams("/models/blip-image-captioning-base")    # a save_pretrained folder
    >>> captions = caption_images(paths, params, device, cache=Path("runs/caption_match/captions.json"))

The captioner is loaded only when an image lacks a cached caption, so a second
run on the same gallery never builds the model. The cache is one JSON file:

    {"version": 1, "captions": {"<captioner tag>": {"<path>|<size>|<mtime_ns>": "a caption", ...}}}

keyed by the captioner and its generation settings (:meth:`CaptionParams.tag`)
and by each image's absolute path, size and modification time, so a changed
image or another captioner is captioned again and entries of several
captioners live side by side. It is rewritten atomically after every batch,
so an interrupted run keeps what it captioned.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from utils.atomic import atomic_write_json
from utils.data.images import load_image
from utils.deps import require
from utils.device import amp_dtype
from utils.errors import KitError
from utils.progress import ProgressBar
from utils.weights import resolve_hf_source

log = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass(frozen=True)
class CaptionParams:
    """Which captioner and how it generates; everything that changes a caption."""

    captioner: str  # hub name (Salesforce/blip2-opt-2.7b) or a local save_pretrained folder
    max_new_tokens: int = 30
    num_beams: int = 3
    prompt: str = ""  # text the caption continues, e.g. "a picture of" ('' = unconditional)
    batch_size: int = 16
    amp: bool = True  # float16/bfloat16 weights on GPU

    def tag(self) -> str:
        """The cache key of these settings (not the batch size or precision)."""
        name = str(Path(self.captioner).resolve()) if Path(self.captioner).is_dir() else self.captioner
        return f"{name}|tokens={self.max_new_tokens}|beams={self.num_beams}|prompt={self.prompt}"

    def check(self) -> None:
        for flag, value in (("--max-new-tokens", self.max_new_tokens), ("--num-beams", self.num_beams),
                            ("--caption-batch-size", self.batch_size)):
            if value < 1:
                raise KitError(f"{flag} {value}: at least 1")
        if not self.captioner:
            raise KitError("--captioner is empty: give a BLIP/BLIP-2 hub name or a local folder")


def file_key(path: Path) -> str:
    """``<absolute path>|<size>|<mtime_ns>`` of an image: its caption is reused while this holds."""
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


# ----------------------------------------------------------------------------
# the cache file


def read_cache(path: Path) -> dict[str, dict[str, str]]:
    """Captioner tag -> file key -> caption; empty when the file does not exist.

    Raises:
        KitError: the file is not a caption cache of this kit.
    """
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise KitError(f"{path}: not a readable caption cache ({err}); delete it or pass another --captions file") from None
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("captions"), dict):
        raise KitError(f"{path}: not a caption cache of this kit (needs version {CACHE_VERSION} and 'captions'); "
                       "delete it or pass another --captions file")
    return {tag: dict(entries) for tag, entries in data["captions"].items()}


def write_cache(path: Path, captions: dict[str, dict[str, str]]) -> None:
    atomic_write_json(path, {"version": CACHE_VERSION, "captions": {t: dict(sorted(e.items())) for t, e in sorted(captions.items())}})


# ----------------------------------------------------------------------------
# the captioner


def _model_class(model_type: str):
    """The generation class of a captioner config's ``model_type``."""
    from transformers import Blip2ForConditionalGeneration, BlipForConditionalGeneration

    if model_type == "blip":
        return BlipForConditionalGeneration
    elif model_type == "blip-2":
        return Blip2ForConditionalGeneration
    else:
        raise KitError(f"captioner type {model_type!r} is not supported; use a BLIP or BLIP-2 model (model_type blip or blip-2)")


class Captioner:
    """A BLIP/BLIP-2 model and its processor; ``caption`` runs one batched generation.

    Raises:
        KitError: transformers is not installed, the name or folder cannot be loaded
            (offline without a local copy), or it is not a BLIP/BLIP-2 model.
    """

    def __init__(self, params: CaptionParams, device: torch.device):
        require("transformers", "--captioner (BLIP/BLIP-2 captions)")
        from transformers import AutoConfig, AutoProcessor

        self.params, self.device = params, device
        source = resolve_hf_source(params.captioner)  # a fetched copy in the weights folder is used offline
        try:
            config = AutoConfig.from_pretrained(source)
            cls = _model_class(config.model_type)
            self.processor = AutoProcessor.from_pretrained(source)
            dtype = amp_dtype(device, params.amp) or torch.float32
            self.model = cls.from_pretrained(source, dtype=dtype).to(device).eval()
        except (OSError, ValueError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise KitError(
                f"--captioner {source}: cannot load it ({first}); offline, pass a local folder written by "
                "save_pretrained (config.json, weights, processor files)"
            ) from None
        self.dtype = dtype
        log.info("captioner %s (%s, %s) on %s", source, config.model_type, str(dtype).removeprefix("torch."), device)

    @torch.no_grad()
    def caption(self, images: Sequence[Any]) -> list[str]:
        """One caption per PIL image, generated as one batch."""
        p = self.params
        kwargs: dict[str, Any] = {"images": list(images), "return_tensors": "pt"}
        if p.prompt:
            kwargs["text"] = [p.prompt] * len(images)
        inputs = self.processor(**kwargs).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        out = self.model.generate(**inputs, max_new_tokens=p.max_new_tokens, num_beams=p.num_beams, do_sample=False)
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]


def caption_images(
    paths: Sequence[Path],
    params: CaptionParams,
    device: torch.device,
    cache: Path,
    extra_caches: Sequence[Path] = (),
    desc: str = "captioning",
    captioner_factory=Captioner,
) -> list[str]:
    """A caption per image: from ``cache`` or ``extra_caches`` when known, else generated.

    The captioner is built (by ``captioner_factory(params, device)``) only if
    some image has no cached caption; ``cache`` is then rewritten after each
    batch with every caption of this captioner seen so far.

    Raises:
        KitError: an image cannot be read, a cache file is damaged, or the captioner cannot be loaded.
    """
    params.check()
    tag = params.tag()
    own = read_cache(cache)
    known = dict(own.get(tag, {}))
    for extra in extra_caches:
        if not Path(extra).is_file():
            raise KitError(f"--captions {extra}: file not found; give a captions.json written by an earlier run")
        known = {**read_cache(Path(extra)).get(tag, {}), **known}
    keys = [file_key(Path(p)) for p in paths]
    todo = [i for i, k in enumerate(keys) if k not in known]
    log.info("%s: %d of %d captions cached", desc, len(paths) - len(todo), len(paths))
    if todo:
        captioner = captioner_factory(params, device)
        with ProgressBar(desc, total=len(todo)) as bar:
            for start in range(0, len(todo), params.batch_size):
                batch = todo[start:start + params.batch_size]
                texts = captioner.caption([load_image(paths[i]) for i in batch])
                for i, text in zip(batch, texts):
                    known[keys[i]] = text
                own[tag] = known
                write_cache(cache, own)
                bar.advance(len(batch))
        del captioner  # free its memory before CLIP runs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    elif tag not in own or any(k not in own[tag] for k in keys):  # captions came from --captions: keep them here too
        own[tag] = known
        write_cache(cache, own)
    out = [known[k] for k in keys]
    empty = sum(not c.strip() for c in out)
    if empty:
        log.warning("%s: %d of %d captions are empty (the captioner generated no words); check --captioner", desc, empty, len(out))
    return out
