"""Face embedders over batches of crops: FaceNet (InceptionResnetV1) and dlib's ResNet.

Both take (B, 3, S, S) float pixels in 0..255 (one test-time view of a batch of
crops) and return (B, d) embeddings; :func:`utils.embedding.embed.embed_arrays`
runs every view of every batch and averages the L2-normalised results.

Weights (``--weights``):
    FaceNet: ``vggface2`` / ``casia-webface`` (facenet-pytorch's release files,
        from the weights folder of ``python -m utils.weights fetch``, else the torch
        hub cache, else downloaded), ``none`` (random init: the
        floor), or a local facenet-pytorch state dict file.
    dlib: ``default`` (the .dat shipped by face_recognition_models, offline) or
        a local ``dlib_face_recognition_resnet_model_v1.dat``.
    ``default`` is FaceNet's ``vggface2`` and dlib's packaged file.

Example:
    >>> emb = build_embedder("facenet", "none", torch.device("cpu"))
    >>> e = embed_arrays(emb, crops.pixels, tta_views(["flip"]), device=torch.device("cpu"), out_px=emb.input_px)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from utils.deps import require
from utils.errors import KitError
from utils.faces.crop import face_models_file
from utils.faces.dlib_pool import DlibPool, describe
from utils.weights import fingerprint, load_into, load_weights_file, resolve_weights
from utils.weights.catalog import FACENET_RELEASES
from utils.weights.resolve import FETCH_HINT

log = logging.getLogger(__name__)

EMBEDDERS = ("facenet", "dlib")
DLIB_MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("KIT_OFFLINE", "") not in ("", "0")


def facenet_release_file(name: str) -> Path:
    """The release file of ``name``: the weights folder's copy, else the torch hub cache's, else downloaded (online).

    Raises:
        KitError: not cached and offline, or the download failed.
    """
    resolved = resolve_weights("facenet", "facenet", name)
    if resolved.mode == "folder":
        return resolved.path
    url = FACENET_RELEASES[name]
    path = Path(torch.hub.get_dir()).parent / "checkpoints" / Path(url).name
    if path.is_file():
        return path
    hint = f"pass --weights PATH to a copy of {Path(url).name} (from {url}), or --weights none (or run {FETCH_HINT} where there is internet)"
    if _offline():
        raise KitError(f"{path}: FaceNet {name} weights not cached and HF_HUB_OFFLINE is set; {hint}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=False)
    except (OSError, ValueError) as err:  # URLError is an OSError
        raise KitError(f"{path}: cannot download FaceNet {name} weights ({type(err).__name__}); {hint}") from None
    return path


class FaceNetEmbedder:
    """facenet-pytorch's InceptionResnetV1: 160 px box crops -> 512-d."""

    name = "facenet"
    input_px = 160
    aligner = "box"

    def __init__(self, weights: str, device: torch.device, amp: torch.dtype | None = None):
        from facenet_pytorch import InceptionResnetV1

        self.device, self.amp = device, amp
        self.model = InceptionResnetV1(pretrained=None, classify=False)
        if weights in FACENET_RELEASES:
            path = facenet_release_file(weights)
        elif weights == "none":
            path = None
            log.warning("FaceNet with random weights (--weights none): a floor, not a model")
        else:
            path = Path(weights)
        if path is not None:
            state = load_weights_file(path)
            state = {k: v for k, v in state.items() if not k.startswith("logits.")}  # the VGGFace2 classifier
            load_into(self.model, state, path, strict=True)
        self.tag = f"facenet|{weights}|" + (fingerprint(path) if path else "")
        self.model.eval().to(device)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 127.5) / 128.0  # facenet-pytorch's fixed_image_standardization
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            return self.model(x).float()


class DlibEmbedder:
    """dlib's ResNet face model: 150 px dlib chips -> 128-d (batched list call); with ``processes`` > 1 each
    batch is split across that many worker processes (:class:`~utils.faces.dlib_pool.DlibPool`: dlib runs
    on one core per process; the descriptors are the same)."""

    name = "dlib"
    input_px = 150
    aligner = "dlib"

    def __init__(self, weights: str, processes: int = 1):
        import dlib

        if weights == "none":
            raise KitError("--weights none: dlib's model has no random init; use --embedder facenet for the floor")
        path = face_models_file(DLIB_MODEL_FILE) if weights == "default" else Path(weights)
        if not path.is_file():
            raise KitError(f"{path}: dlib face model not found; pass --weights PATH to {DLIB_MODEL_FILE} (package face-recognition-models)")
        try:
            self.model = dlib.face_recognition_model_v1(str(path))
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise KitError(f"{path}: not a dlib face recognition model ({first}); pass {DLIB_MODEL_FILE}") from None
        self.tag = f"dlib|{path}|{fingerprint(path)}"  # not the processes: they do not change a descriptor
        self.pool = DlibPool(path, processes) if processes > 1 else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        chips = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return torch.from_numpy(self.pool.describe(chips) if self.pool is not None else describe(self.model, chips))

    def close(self) -> None:
        """Stops the worker processes, if any."""
        if self.pool is not None:
            self.pool.close()


def build_embedder(name: str, weights: str, device: torch.device, amp: torch.dtype | None = None, processes: int = 1):
    """The embedder ``name`` with ``weights`` ('default' = the usual pretrained weights); dlib runs in
    ``processes`` CPU processes (FaceNet, a torch model, uses torch's threads or the GPU).

    Raises:
        KitError: unknown name, or weights missing or not fitting.
    """
    if name == "facenet":
        require("facenet_pytorch", "--embedder facenet")
        return FaceNetEmbedder("vggface2" if weights == "default" else weights, device, amp)
    if name == "dlib":
        require("dlib", "--embedder dlib")
        return DlibEmbedder(weights, processes)
    raise KitError(f"--embedder {name!r}: choose from {list(EMBEDDERS)}")
