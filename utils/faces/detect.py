"""Batched face detection with facenet-pytorch's MTCNN, one face per image.

MTCNN takes a batch only when every image has the same size, so each image is
letterboxed onto a square canvas of ``canvas_px`` pixels (scaled so that its
longer side fills the canvas, padded with black) and boxes are mapped back to
the image's own pixels. MTCNN's P/R/O-net weights ship inside the
facenet-pytorch wheel, so detection works offline.

One face is kept per image: ``largest`` (the biggest box) or ``center`` (box
area minus twice the squared distance of its centre from the image centre, in
image pixels: the face a portrait is about, not a bigger one at the edge).
An image without a face gets ``found=False``; what to do then is the
caller's choice (:mod:`utils.faces.crop` uses a centre crop), never ``None``
passed on silently.

Example:
    >>> det = FaceDetector(DetectorParams(), torch.device("cpu"))
    >>> faces = det.detect([Path("photo.jpg")])
    >>> faces.boxes[0], faces.found[0]
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from utils.data.images import ImageError, load_image
from utils.deps import require
from utils.errors import KitError
from utils.progress import ProgressBar

log = logging.getLogger(__name__)

SELECT_METHODS = ("largest", "center")
CENTER_WEIGHT = 2.0  # "center": area minus this x squared offset (facenet-pytorch's center_weighted_size)


@dataclass(frozen=True)
class DetectorParams:
    """MTCNN settings; any change gives other boxes (and another cache key)."""

    canvas_px: int = 320  # letterbox side; faces smaller than min_face_px on it are not searched
    min_face_px: int = 20  # smallest face side searched, in canvas pixels
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)  # P-, R-, O-net score thresholds
    select: str = "center"  # which face when there are several: largest or center

    def check(self) -> None:
        """Raise a KitError for settings MTCNN cannot use."""
        if self.select not in SELECT_METHODS:
            raise KitError(f"--face-select {self.select!r}: choose from {list(SELECT_METHODS)}")
        if self.canvas_px < 48:
            raise KitError(f"--detect-px {self.canvas_px}: at least 48 pixels")
        if not 12 <= self.min_face_px <= self.canvas_px:
            raise KitError(f"--min-face-px {self.min_face_px}: between 12 and --detect-px ({self.canvas_px})")
        if len(self.thresholds) != 3 or not all(0.0 < t < 1.0 for t in self.thresholds):
            raise KitError(f"--thresholds {list(self.thresholds)}: three values in (0, 1), e.g. 0.6 0.7 0.7")

    def tag(self) -> str:
        """A string that identifies these settings (cache keys)."""
        return "mtcnn|" + "|".join(f"{k}={v}" for k, v in sorted(asdict(self).items()))


@dataclass
class Faces:
    """One entry per image, in input order; boxes and landmarks in the image's own pixels."""

    boxes: np.ndarray  # (n, 4) float32 x0, y0, x1, y1; NaN where no face
    landmarks: np.ndarray  # (n, 5, 2) float32 eyes, nose, mouth corners; NaN where no face
    probs: np.ndarray  # (n,) float32 detection score; 0 where no face
    sizes: np.ndarray  # (n, 2) int image width, height (after loading, see utils.data.images)
    stage: np.ndarray | None = None  # (n,) int8 index into stage_names of the detector that found the face; -1 none
    stage_names: tuple[str, ...] = ()  # the detectors tried, in order (a cascade has several)

    @property
    def found(self) -> np.ndarray:
        """(n,) bool: a face was detected."""
        return ~np.isnan(self.boxes[:, 0])

    @classmethod
    def empty(cls, n: int, stage_names: tuple[str, ...]) -> "Faces":
        """``n`` images with no face yet (filled in as detectors find them)."""
        return cls(boxes=np.full((n, 4), np.nan, np.float32), landmarks=np.full((n, 5, 2), np.nan, np.float32),
                   probs=np.zeros(n, np.float32), sizes=np.zeros((n, 2), np.int64),
                   stage=np.full(n, -1, np.int8), stage_names=stage_names)


def letterbox(img: Image.Image, canvas_px: int) -> tuple[np.ndarray, float]:
    """``img`` scaled so its longer side is ``canvas_px``, pasted top-left on black.

    Returns:
        the (canvas_px, canvas_px, 3) uint8 canvas and the scale (canvas / image pixels).
    """
    scale = canvas_px / max(img.size)
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    canvas = np.zeros((canvas_px, canvas_px, 3), dtype=np.uint8)
    canvas[:h, :w] = np.asarray(img.resize((w, h), Image.Resampling.BILINEAR))
    return canvas, scale


class _CanvasDataset(Dataset):
    def __init__(self, paths: Sequence[Path], canvas_px: int):
        self.paths = list(paths)
        self.canvas_px = canvas_px

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = load_image(self.paths[i])
        except ImageError as err:
            return np.zeros((self.canvas_px, self.canvas_px, 3), np.uint8), 1.0, (0, 0), str(err)
        canvas, scale = letterbox(img, self.canvas_px)
        return canvas, scale, img.size, ""


def _collate(items):
    canvases, scales, sizes, errors = zip(*items)
    return np.stack(canvases), np.array(scales), np.array(sizes), list(errors)


def pick_face(boxes: np.ndarray, size: tuple[int, int], method: str) -> int:
    """Index of the face to keep among ``boxes`` (k, 4) of an image of ``size`` (w, h)."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    if method == "largest":
        return int(np.argmax(area))
    if method == "center":
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        offset2 = (cx - size[0] / 2) ** 2 + (cy - size[1] / 2) ** 2
        return int(np.argmax(area - CENTER_WEIGHT * offset2))
    raise KitError(f"face selection {method!r}: choose from {list(SELECT_METHODS)}")


class FaceDetector:
    """MTCNN over batches of letterboxed images."""

    def __init__(self, params: DetectorParams, device: torch.device):
        require("facenet_pytorch", "face detection (MTCNN)")
        from facenet_pytorch import MTCNN

        params.check()
        self.params = params
        self.device = device
        self.mtcnn = MTCNN(
            min_face_size=params.min_face_px, thresholds=list(params.thresholds), keep_all=True, device=device
        ).eval()

    @torch.no_grad()
    def detect_canvases(self, canvases: np.ndarray) -> tuple[list, list, list]:
        """MTCNN on a (B, S, S, 3) uint8 batch: per image all boxes, scores, landmarks (or None)."""
        boxes, probs, points = self.mtcnn.detect(canvases, landmarks=True)
        return list(boxes), list(probs), list(points)

    def detect(self, paths: Sequence[Path], batch_size: int = 32, workers: int = 2, desc: str = "detecting faces") -> Faces:
        """Detect one face per image of ``paths``.

        Raises:
            KitError: an image cannot be read (query and gallery need every one).
        """
        n = len(paths)
        out = Faces.empty(n, ("mtcnn",))
        loader = DataLoader(
            _CanvasDataset(paths, self.params.canvas_px), batch_size=batch_size, shuffle=False,
            num_workers=workers, collate_fn=_collate,
        )
        start = 0
        with ProgressBar(desc, total=n) as bar:
            for canvases, scales, sizes, errors in loader:
                bad = [e for e in errors if e]
                if bad:
                    raise KitError(bad[0])
                all_boxes, all_probs, all_points = self.detect_canvases(canvases)
                for j, (b, p, pts) in enumerate(zip(all_boxes, all_probs, all_points)):
                    i = start + j
                    out.sizes[i] = sizes[j]
                    if b is None or len(b) == 0:
                        continue
                    b = np.asarray(b, np.float32) / scales[j]
                    k = pick_face(b, tuple(sizes[j]), self.params.select)
                    out.boxes[i] = b[k]
                    out.landmarks[i] = np.asarray(pts, np.float32)[k] / scales[j]
                    out.probs[i] = float(np.asarray(p, np.float32)[k])
                    out.stage[i] = 0
                start += len(canvases)
                bar.advance(len(canvases))
        log.info("%s: a face in %d of %d images", desc, int(out.found.sum()), n)
        return out
