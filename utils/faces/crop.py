"""Face crops for the embedders: aligned, with context for TTA, a counted fallback, cached.

Every image becomes one ``context_px`` x ``context_px`` uint8 crop whose central
``size_px`` square is what the embedder sees; the extra context lets test-time
views rotate, zoom out and shift without black corners (:mod:`utils.embedding.views`).

How the face square is found (``aligner``):
    ``box``: the MTCNN box made square, widened by ``margin_px`` (pixels of the
        ``size_px`` crop, as in facenet-pytorch: the box fills ``size_px -
        margin_px``), rotated so that the eyes (MTCNN landmarks) are level.
        What FaceNet (InceptionResnetV1) expects.
    ``dlib``: dlib's 5-point shape predictor inside the MTCNN box, then
        dlib's own chip geometry (``get_face_chip``, padding 0.25 at 150 px):
        what dlib's ResNet face model was trained on.
An image without a detected face falls back to the centre square of the whole
image (side = the shorter side), cut, resized and later normalised exactly like
a face crop; ``Crops.fallback`` marks and counts those images.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from torch.utils.data import DataLoader, Dataset

from utils.cache import cached, files_key
from utils.data.images import ImageError, load_image
from utils.errors import KitError
from utils.faces.detect import FaceDetector, Faces
from utils.progress import ProgressBar

log = logging.getLogger(__name__)

ALIGNERS = ("box", "dlib")
CONTEXT = 1.25  # context crop side / face crop side
DLIB_PADDING = 0.25  # dlib's chip padding for its face model (150 px chips)
SHAPE_PREDICTOR_FILE = "shape_predictor_5_face_landmarks.dat"


def face_models_file(name: str) -> Path:
    """A model file shipped by the face_recognition_models package.

    Its ``__init__`` imports pkg_resources, which may be missing, so the
    package folder is found without importing it.

    Raises:
        KitError: the package is not installed.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise KitError(f"{name}: package face_recognition_models not installed; pip install face-recognition-models or pass the file's path")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / name


def load_shape_predictor(path: str | Path):
    """dlib's shape predictor from ``path``.

    Raises:
        KitError: missing or not a dlib shape predictor file.
    """
    import dlib

    path = Path(path)
    if not path.is_file():
        raise KitError(f"{path}: shape predictor not found; pass --shape-predictor PATH to {SHAPE_PREDICTOR_FILE}")
    try:
        return dlib.shape_predictor(str(path))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise KitError(f"{path}: not a dlib shape predictor ({first}); pass {SHAPE_PREDICTOR_FILE} from face_recognition_models") from None


CROP_FALLBACKS = ("center", "letterbox")


@dataclass(frozen=True)
class CropParams:
    """Crop geometry; any change gives other crops (and another cache key)."""

    size_px: int = 160  # what the embedder sees (160 FaceNet, 150 dlib)
    aligner: str = "box"  # box (FaceNet) or dlib (dlib's chips)
    margin_px: int = 20  # "box" only: context around the box, pixels of the size_px crop
    align_eyes: bool = True  # "box" only: rotate so the eyes are level
    shape_predictor: str = ""  # "dlib" only: .dat file ('' = the one in face_recognition_models)
    fallback: str = "center"  # no face: center (the centre square) or letterbox (the whole image, padded square)

    @property
    def context_px(self) -> int:
        """Side of the stored crop: size_px x CONTEXT, rounded so the centre crop is pixel-exact."""
        c = round(self.size_px * CONTEXT)
        return c + (c - self.size_px) % 2

    def check(self) -> None:
        if self.aligner not in ALIGNERS:
            raise KitError(f"aligner {self.aligner!r}: choose from {list(ALIGNERS)}")
        if not 0 <= self.margin_px < self.size_px // 2:
            raise KitError(f"--margin-px {self.margin_px}: between 0 and {self.size_px // 2 - 1}")
        if self.fallback not in CROP_FALLBACKS:
            raise KitError(f"--face-fallback {self.fallback!r}: choose from {list(CROP_FALLBACKS)}")

    def tag(self) -> str:
        tail = "" if self.fallback == "center" else f"|{self.fallback}"  # old cache keys stay valid
        return f"crop|{self.size_px}|{self.aligner}|{self.margin_px}|{self.align_eyes}|{self.shape_predictor}|{CONTEXT}{tail}"


@dataclass
class Crops:
    """Context crops of a set of images, in input order."""

    pixels: np.ndarray  # (n, C, C, 3) uint8 RGB
    fallback: np.ndarray  # (n,) bool: no face found, centre square used
    boxes: np.ndarray  # (n, 4) float32 detected boxes in image pixels, NaN on fallback
    probs: np.ndarray  # (n,) float32 detection scores, 0 on fallback
    stage: np.ndarray | None = None  # (n,) int8 index into stage_names of the detector that found the face; -1 none
    stage_names: tuple[str, ...] = ()  # the detectors tried, in order (utils.faces.cascade)

    def stage_counts(self) -> dict[str, int]:
        """Images whose face each detector stage found, and ``none`` for the fallbacks."""
        stage = self.stage if self.stage is not None else np.full(len(self.fallback), -1, np.int8)
        counts = {name: int((stage == s).sum()) for s, name in enumerate(self.stage_names)}
        counts["none"] = int((stage < 0).sum())
        return counts

    @property
    def n_fallback(self) -> int:
        return int(self.fallback.sum())


def square_affine(center: tuple[float, float], side: float, angle_deg: float, out_px: int) -> np.ndarray:
    """2x3 matrix taking the square of ``side`` around ``center`` (tilted by ``angle_deg``) onto ``out_px`` pixels."""
    m = cv2.getRotationMatrix2D((float(center[0]), float(center[1])), float(angle_deg), out_px / side)
    m[0, 2] += (out_px - 1) / 2 - center[0]
    m[1, 2] += (out_px - 1) / 2 - center[1]
    return m


def warp_square(img: np.ndarray, center: tuple[float, float], side: float, angle_deg: float, out_px: int) -> np.ndarray:
    """Cut the (possibly tilted) square and resize it to ``out_px``; the border is replicated."""
    m = square_affine(center, side, angle_deg, out_px)
    interp = cv2.INTER_AREA if side > out_px else cv2.INTER_LINEAR
    return cv2.warpAffine(img, m, (out_px, out_px), flags=interp, borderMode=cv2.BORDER_REPLICATE)


def fallback_crop(img: np.ndarray, params: CropParams) -> np.ndarray:
    """The centre square of the whole image (side = shorter side; ``letterbox``: the longer
    side, edges replicated) as a context crop: the embedder's view is that square."""
    h, w = img.shape[:2]
    side = (max(w, h) if params.fallback == "letterbox" else min(w, h)) * params.context_px / params.size_px
    return warp_square(img, ((w - 1) / 2, (h - 1) / 2), side, 0.0, params.context_px)


def box_crop(img: np.ndarray, box: np.ndarray, landmarks: np.ndarray, params: CropParams) -> np.ndarray:
    """The square MTCNN box with margin, eyes levelled, as a context crop."""
    x0, y0, x1, y1 = box
    center = ((x0 + x1) / 2, (y0 + y1) / 2)
    face = max(x1 - x0, y1 - y0) * params.size_px / (params.size_px - params.margin_px)
    angle = 0.0
    if params.align_eyes and np.isfinite(landmarks).all():
        (lx, ly), (rx, ry) = landmarks[0], landmarks[1]
        angle = math.degrees(math.atan2(ry - ly, rx - lx))
    return warp_square(img, center, face * params.context_px / params.size_px, angle, params.context_px)


class _CropDataset(Dataset):
    """Loads each image and cuts its crop (in DataLoader workers)."""

    def __init__(self, paths: Sequence[Path], faces: Faces, params: CropParams):
        self.paths, self.faces, self.params = list(paths), faces, params
        self._sp = None

    def __len__(self) -> int:
        return len(self.paths)

    def _dlib_crop(self, img: np.ndarray, box: np.ndarray) -> np.ndarray:
        import dlib

        if self._sp is None:
            self._sp = load_shape_predictor(self.params.shape_predictor or face_models_file(SHAPE_PREDICTOR_FILE))
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        shape = self._sp(img, dlib.rectangle(x0, y0, x1, y1))
        c, s = self.params.context_px, self.params.size_px
        padding = (c * (1 + 2 * DLIB_PADDING) / s - 1) / 2  # same pixels per face unit as a 150 px chip
        return dlib.get_face_chip(img, shape, size=c, padding=padding)

    def __getitem__(self, i: int):
        try:
            img = np.ascontiguousarray(np.asarray(load_image(self.paths[i])))
        except ImageError as err:  # handed back, not raised: a worker's traceback is not one line
            c = self.params.context_px
            return np.zeros((c, c, 3), np.uint8), True, str(err)
        box = self.faces.boxes[i]
        if np.isnan(box[0]):
            return fallback_crop(img, self.params), True, ""
        if self.params.aligner == "box":
            return box_crop(img, box, self.faces.landmarks[i], self.params), False, ""
        if self.params.aligner == "dlib":
            return self._dlib_crop(img, box), False, ""
        raise ValueError(f"aligner {self.params.aligner!r}")  # CropParams.check() ran first


def _collate(items):
    pixels, fallback, errors = zip(*items)
    return np.stack(pixels), np.array(fallback, dtype=bool), list(errors)


def cut_crops(paths: Sequence[Path], faces: Faces, params: CropParams, workers: int = 2, desc: str = "cropping faces") -> Crops:
    """One context crop per image from its detected face, or the centre-square fallback."""
    params.check()
    dataset = _CropDataset(paths, faces, params)
    if params.aligner == "dlib":  # fail here, in one line, not in a worker
        sp = load_shape_predictor(params.shape_predictor or face_models_file(SHAPE_PREDICTOR_FILE))
        dataset._sp = sp if workers == 0 else None
    loader = DataLoader(dataset, batch_size=32, shuffle=False, num_workers=workers, collate_fn=_collate)
    pixels, fallback = [], []
    with ProgressBar(desc, total=len(paths)) as bar:
        for px, fb, errors in loader:
            bad = [e for e in errors if e]
            if bad:
                raise KitError(bad[0])
            pixels.append(px)
            fallback.append(fb)
            bar.advance(len(px))
    c = params.context_px
    return Crops(
        pixels=np.concatenate(pixels) if pixels else np.zeros((0, c, c, 3), np.uint8),
        fallback=np.concatenate(fallback) if fallback else np.zeros(0, bool),
        boxes=faces.boxes.copy(),
        probs=faces.probs.copy(),
        stage=faces.stage.copy() if faces.stage is not None else np.full(len(paths), -1, np.int8),
        stage_names=tuple(faces.stage_names),
    )


def face_crops(
    paths: Sequence[Path],
    detector: FaceDetector | None,
    params: CropParams,
    *,
    batch_size: int = 32,
    workers: int = 2,
    cache_dir: Path | None = None,
    desc: str = "images",
) -> Crops:
    """Detect (unless ``detector`` is None: every image falls back) and crop ``paths``, cached.

    The cache key covers each file's path, size and mtime, the detector
    settings and the crop geometry, so a changed file or flag recomputes.
    """
    paths = [Path(p) for p in paths]
    det_tag = detector.params.tag() if detector is not None else "no-detector"
    cache = Path(cache_dir) / f"crops_{files_key(paths, det_tag + '|' + params.tag() + '|stage')}.npz" if cache_dir is not None else None

    def compute() -> dict[str, np.ndarray]:
        n = len(paths)
        if detector is not None:
            faces = detector.detect(paths, batch_size=batch_size, workers=workers, desc=f"{desc}: detecting")
        else:
            faces = Faces(np.full((n, 4), np.nan, np.float32), np.full((n, 5, 2), np.nan, np.float32), np.zeros(n, np.float32), np.zeros((n, 2), np.int64))
        crops = cut_crops(paths, faces, params, workers=workers, desc=f"{desc}: cropping")
        if crops.n_fallback:
            log.warning("%s: no face found in %d of %d images; used the centre square", desc, crops.n_fallback, n)
        return {"pixels": crops.pixels, "fallback": crops.fallback, "boxes": crops.boxes, "probs": crops.probs,
                "stage": crops.stage, "stage_names": np.array(crops.stage_names, dtype=str)}

    z = cached(cache, compute, f"{desc}: face crops", finite_keys=("probs",))
    return Crops(z["pixels"], z["fallback"], z["boxes"], z["probs"], z["stage"], tuple(str(n) for n in z["stage_names"]))
