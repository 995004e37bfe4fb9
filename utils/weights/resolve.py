"""Resolve a ``--weights`` value (a tag, a local file, ``none``) for each kind of model the kit loads.

    >>> r = resolve_weights("timm", "resnet50", "default")
    >>> r.mode, r.path          # ('folder', Path('weights/timm/timm/resnet50.a1_in1k/model.safetensors')) once fetched
    >>> resolve_weights("open_clip", "ViT-L-14", "openai").mode   # 'hub' when the folder lacks it
    >>> resolve_weights("facenet", "facenet", "/models/vggface2.pt").mode                      # 'file'
    >>> resolve_hf_source("Salesforce/blip2-opt-2.7b")  # the fetched folder, else the hub name

A tag resolves from the weights folder (:func:`utils.weights.store.weights_dir`)
first; only a tag the folder lacks goes to the hub, through the model's library.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from utils.errors import KitError
from utils.weights.catalog import FACENET_RELEASES, spec_of
from utils.weights.state import WEIGHT_SUFFIXES
from utils.weights.store import find_entry

log = logging.getLogger(__name__)

MODES = ("none", "file", "folder", "hub")
KIND_TAGS = {"timm": ("default",), "facenet": tuple(FACENET_RELEASES)}  # other values are files; open_clip: any tag
FETCH_HINT = "python -m utils.weights fetch"


def is_weights_file(value: str) -> bool:
    """Whether a ``--weights`` value names a file (a path or a weights suffix) rather than a tag."""
    return Path(value).suffix in WEIGHT_SUFFIXES or "/" in value or "\\" in value or Path(value).is_file()


@dataclass(frozen=True)
class Resolved:
    """Where a ``--weights`` value's tensors come from.

    Attributes:
        value: as given.
        mode: ``none`` (random init), ``file`` (the user's file), ``folder`` (the weights
            folder's copy of a tag) or ``hub`` (the library downloads the tag).
        path: the file for ``file`` and ``folder``.
    """

    value: str
    mode: str
    path: Path | None = None

    def describe(self) -> str:
        if self.mode == "none":
            return "random initialisation (--weights none)"
        elif self.mode == "file":
            return f"file {self.path}"
        elif self.mode == "folder":
            return f"{self.value} from the weights folder ({self.path})"
        elif self.mode == "hub":
            return f"{self.value} from the hub (not in the weights folder; {FETCH_HINT} puts it there)"
        else:
            raise ValueError(f"mode {self.mode!r}: one of {MODES}")


def resolve_weights(kind: str, model: str, weights: str) -> Resolved:
    """Where the tensors of ``--weights`` come from, for a model of ``kind`` (timm, open_clip, facenet).

    Raises:
        KitError: a value that looks like a file but is not one.
    """
    if weights == "none":
        return Resolved(weights, "none")
    if is_weights_file(weights) or weights not in KIND_TAGS.get(kind, (weights,)):
        if not Path(weights).is_file():
            raise KitError(f"{weights}: weights file not found (--weights PATH); give an existing "
                           f"{'/'.join(WEIGHT_SUFFIXES)} file, a tag, or none")
        return Resolved(weights, "file", Path(weights))
    try:
        spec = spec_of(kind, model, weights)
    except KitError:  # no hub copy the kit knows: the library decides (and says what is wrong)
        return Resolved(weights, "hub")
    entry = find_entry(spec.name)
    if entry is None:
        return Resolved(weights, "hub")
    log.info("%s %s: %s weights from %s", kind, model, weights, entry.path)
    return Resolved(weights, "folder", entry.path)


def resolve_hf_source(source: str) -> str:
    """A ``transformers`` source: a local folder as given, else the weights folder's copy, else the hub name."""
    if Path(source).exists():
        return source
    entry = find_entry(spec_of("hf", source, "").name)
    if entry is None:
        return source
    log.info("%s: from the weights folder (%s)", source, entry.path)
    return str(entry.path)
