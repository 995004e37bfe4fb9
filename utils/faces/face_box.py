"""Crop images to their faces for a general-purpose backbone: every face, or the one face.

The painting face-similarity project compared paintings by the region that
holds their faces: the box covering **all** faces MTCNN finds (``all``). The
face path's choice, one face per image (``one``: the most central or the
largest, as :mod:`utils.faces.detect` picks it), is the other mode. Either box
is widened by ``margin`` (a share of its side on each side), clipped to the
image, and cut out; an image without a face keeps the whole image and is
counted. Crops are PNG files in a cache folder keyed by the files and the
settings, so a re-run (or the other mode) detects nothing again.

Example:
    >>> det = FaceDetector(DetectorParams(), torch.device("cpu"))
    >>> crops = face_box_crops(paths, det, "all", margin=0.2, cache_dir=Path("runs/face_cache"))
    >>> crops.paths[0], crops.n_whole
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from utils.atomic import atomic_write_bytes
from utils.cache import cached, files_key
from utils.data.images import load_image
from utils.errors import KitError
from utils.faces.detect import FaceDetector, letterbox, pick_face
from utils.progress import ProgressBar

log = logging.getLogger(__name__)

FACE_BOX_MODES = ("all", "one")


@dataclass
class FaceBoxes:
    """Per image, in input order, in the image's own pixels (x0, y0, x1, y1); NaN where no face."""

    all_faces: np.ndarray  # (n, 4) the box covering every detected face
    one_face: np.ndarray  # (n, 4) the face the detector's --face-select picks
    n_faces: np.ndarray  # (n,) faces found

    def boxes(self, mode: str) -> np.ndarray:
        """The (n, 4) boxes of a mode."""
        if mode == "all":
            return self.all_faces
        if mode == "one":
            return self.one_face
        raise KitError(f"--face-crop {mode!r}: choose none or one of {FACE_BOX_MODES}")


def union_box(boxes: np.ndarray) -> np.ndarray:
    """The smallest box (x0, y0, x1, y1) covering every box of ``boxes`` (k, 4)."""
    return np.array([boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max()], dtype=np.float32)


def detect_face_boxes(detector: FaceDetector, paths: Sequence[Path], batch_size: int = 16, desc: str = "faces") -> FaceBoxes:
    """Every face of every image (MTCNN on letterboxed batches), as both boxes.

    Raises:
        KitError: an image cannot be read (naming it).
    """
    n = len(paths)
    out = FaceBoxes(np.full((n, 4), np.nan, np.float32), np.full((n, 4), np.nan, np.float32), np.zeros(n, np.int64))
    with ProgressBar(f"{desc}: detecting faces", total=n) as bar:
        for start in range(0, n, batch_size):
            imgs = [load_image(p) for p in paths[start : start + batch_size]]
            boxed = [letterbox(img, detector.params.canvas_px) for img in imgs]
            all_boxes, _, _ = detector.detect_canvases(np.stack([c for c, _ in boxed]))
            for j, (b, (_, scale)) in enumerate(zip(all_boxes, boxed)):
                if b is None or len(b) == 0:
                    continue
                b = np.asarray(b, np.float32) / scale
                i = start + j
                out.n_faces[i] = len(b)
                out.all_faces[i] = union_box(b)
                out.one_face[i] = b[pick_face(b, imgs[j].size, detector.params.select)]
            bar.advance(len(imgs))
    return out


def widen(box: np.ndarray, margin: float, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """``box`` grown by ``margin`` x its side on each side, clipped to an image of ``size`` (w, h)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    w, h = size
    left, top = max(0, int(round(x0 - dx))), max(0, int(round(y0 - dy)))
    right, bottom = min(w, int(round(x1 + dx))), min(h, int(round(y1 + dy)))
    if right - left < 2 or bottom - top < 2:
        return 0, 0, w, h  # a degenerate box: keep the whole image
    return left, top, right, bottom


@dataclass
class FaceCrops:
    """What to embed instead of each image: its face crop, or the image itself when no face was found."""

    paths: list[Path]
    n_faces: np.ndarray  # (n,) faces found per image
    n_whole: int  # images kept whole (no face)


def check_face_margin(margin: float) -> None:
    """Raise a KitError for a margin no box can be widened by (negative, NaN or infinite: NaN passed ``< 0``)."""
    if not (np.isfinite(margin) and margin >= 0):
        raise KitError(f"--face-margin {margin}: a finite number, 0 or more")


def face_box_crops(
    paths: Sequence[Path], detector: FaceDetector, mode: str, margin: float, cache_dir: Path,
    batch_size: int = 16, desc: str = "faces",
) -> FaceCrops:
    """Face crops of ``paths`` (cached as PNG files under ``cache_dir``).

    Raises:
        KitError: an unknown mode, a negative margin, or an unreadable image.
    """
    if mode not in FACE_BOX_MODES:
        raise KitError(f"--face-crop {mode!r}: choose none or one of {FACE_BOX_MODES}")
    check_face_margin(margin)
    paths = [Path(p) for p in paths]
    key = files_key(paths, f"face_box|{detector.params.tag()}")
    def detect() -> dict[str, np.ndarray]:
        found = detect_face_boxes(detector, paths, batch_size, desc)
        return {"all_faces": found.all_faces, "one_face": found.one_face, "n_faces": found.n_faces}

    # NaN marks "no face" in the boxes, so only the counts must be finite
    saved = cached(cache_dir / f"face_boxes_{key}.npz", detect, f"{desc}: face boxes", finite_keys=("n_faces",))
    boxes = FaceBoxes(saved["all_faces"], saved["one_face"], saved["n_faces"].astype(np.int64))
    crop_dir = cache_dir / f"face_crops_{files_key(paths, f'{key}|{mode}|{margin}')}"
    chosen = boxes.boxes(mode)
    out: list[Path] = []
    for i, p in enumerate(paths):
        if np.isnan(chosen[i, 0]):
            out.append(p)
            continue
        crop = crop_dir / f"{i:06d}.png"
        if not crop.is_file():
            img = load_image(p)
            buf = io.BytesIO()
            img.crop(widen(chosen[i], margin, img.size)).save(buf, format="PNG")
            atomic_write_bytes(crop, buf.getvalue())
        out.append(crop)
    n_whole = int(np.isnan(chosen[:, 0]).sum())
    log.info("%s: %s face crop for %d of %d images (the rest whole)", desc, mode, len(paths) - n_whole, len(paths))
    return FaceCrops(out, boxes.n_faces, n_whole)
