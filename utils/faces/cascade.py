"""A face detection cascade: stages tried in order, each only on the images the earlier ones missed.

Stages (names for ``--detector-stages``):
    ``mtcnn``         MTCNN at the configured thresholds (:mod:`utils.faces.detect`)
    ``mtcnn_clahe``   MTCNN on a contrast-normalised (CLAHE) greyscale copy
    ``mtcnn_invert``  MTCNN on the inverted greyscale copy (dark-on-light sketches)
    ``mtcnn_hue``     MTCNN on a false-colour image read back to brightness (hue as intensity;
                      rainbow colour maps such as jet, turbo, thermal-camera looks)
    ``mtcnn_sketch``  MTCNN on blurred, equalised copies (pencil hatching smoothed into shading;
                      blur sigmas ``sketch_blur``, as fractions of the shorter side)
    ``mtcnn_low``     MTCNN with lower thresholds (``low_thresholds``)
    ``hog``           dlib's HOG frontal face detector on the greyscale image (upsampled once)
    ``mmod``          dlib's CNN (mmod) face detector from face_recognition_models
    ``rotate``        MTCNN on copies rotated by ``rotations_deg``; box and landmarks mapped back

Each MTCNN stage in ``rotated_stages`` (``--detector-rotated-stages``; by default
``mtcnn`` and ``mtcnn_clahe``) also searches rotated copies (``stage_rotations``,
by default +-15 and +-30 degrees: ``--detector-rotations``) of its view of the
images it missed upright, the way ``rotate`` does for the plain image; boxes and
landmarks are mapped back. It costs the stage one MTCNN pass per angle on
face-free images.

A detection is kept only when its box side is at least ``min_face_frac`` of
the image's shorter side and its score reaches the stage's gate (MTCNN: its
O-net probability >= ``min_prob``; hog/mmod: the detector's score >=
``hog_min_score`` / ``mmod_min_score``). A false face is worse than a fallback.

Landmarks (eyes, nose, mouth corners, as MTCNN gives them) come from MTCNN,
or for hog/mmod from dlib's 5-point shape predictor on the found box (mouth
corners estimated from the eyes and nose).

The result is a :class:`~utils.faces.detect.Faces` with ``stage`` (index into
``params.stages``, -1 where none found) and ``stage_names``; ``seconds``
holds each stage's time and ``tried`` how many images it ran on.

Example:
    >>> cascade = FaceCascade(CascadeParams(stages=("mtcnn", "hog")), torch.device("cpu"))
    >>> faces = cascade.detect(paths)
    >>> faces.stage_names, faces.stage
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from utils.data.images import ImageError, load_image
from utils.errors import KitError
from utils.faces.detect import DetectorParams, FaceDetector, Faces, letterbox, pick_face
from utils.faces.dlib_pool import DlibPool, mmod_fork_safe, mmod_in_process, rect_boxes
from utils.progress import ProgressBar

log = logging.getLogger(__name__)

STAGES = ("mtcnn", "mtcnn_clahe", "mtcnn_invert", "mtcnn_hue", "mtcnn_sketch", "mtcnn_low", "hog", "mmod", "rotate")
MTCNN_STAGES = tuple(s for s in STAGES if s.startswith("mtcnn"))  # the stages a rotation search can extend
# measured over 15 draws (benchmarks/results/bench_faces_rotations.md): rotating in these two stages finds 4.0
# more of a draw's 280 stylised faces for 2 more false faces in 240; all five default MTCNN stages 6.5 for 6; +-45 ~0
DEFAULT_ROTATIONS = (-15.0, 15.0, -30.0, 30.0)
DEFAULT_ROTATED_STAGES = ("mtcnn", "mtcnn_clahe")
DEFAULT_STAGES = ("mtcnn", "mtcnn_clahe", "mtcnn_invert", "mtcnn_hue", "mmod", "mtcnn_sketch")  # measured: benchmarks/results/bench_faces_hard.md
MMOD_FILE = "mmod_human_face_detector.dat"
FALLBACKS = ("center", "best")
CHUNK = 256  # images decoded and held at once


@dataclass(frozen=True)
class CascadeParams:
    """Cascade settings; any change gives other boxes (and another cache key)."""

    stages: tuple[str, ...] = DEFAULT_STAGES  # tried in this order
    mtcnn: DetectorParams = field(default_factory=DetectorParams)  # canvas, thresholds, face selection
    low_thresholds: tuple[float, float, float] = (0.5, 0.6, 0.6)  # mtcnn_low's P/R/O-net thresholds
    rotations_deg: tuple[float, ...] = (-15.0, 15.0, -30.0, 30.0)  # rotate: copies tried, first hit wins
    stage_rotations: tuple[float, ...] = DEFAULT_ROTATIONS  # the rotated_stages: copies also tried where upright found nothing
    rotated_stages: tuple[str, ...] = DEFAULT_ROTATED_STAGES  # the MTCNN stages that search stage_rotations (others: upright only)
    min_face_frac: float = 0.15  # box side / shorter image side below this: not a face
    min_prob: float = 0.9  # MTCNN stages: O-net probability gate
    hog_min_score: float = 0.0  # dlib HOG score gate (its own threshold is 0)
    mmod_min_score: float = 0.3  # dlib mmod confidence gate
    clahe_clip: float = 3.0  # CLAHE clip limit (8x8 tiles)
    sketch_blur: tuple[float, ...] = (0.006, 0.02)  # mtcnn_sketch: Gaussian sigmas / shorter side, tried in order (small, then portrait-sized faces)
    fallback: str = "center"  # no face: center (the crop's centre square) or best (the best MTCNN box below the gates)

    def check(self) -> None:
        """Raise a KitError for settings the cascade cannot use."""
        if not self.stages:
            raise KitError("--detector-stages: name at least one stage, e.g. mtcnn hog")
        for s in self.stages:
            if s not in STAGES:
                raise KitError(f"--detector-stages {s!r}: choose from {list(STAGES)}")
        if len(set(self.stages)) != len(self.stages):
            raise KitError(f"--detector-stages {list(self.stages)}: each stage once")
        if not 0.0 <= self.min_face_frac < 1.0:
            raise KitError(f"--min-face-frac {self.min_face_frac}: in [0, 1)")
        if not 0.0 <= self.min_prob < 1.0:
            raise KitError(f"--min-face-prob {self.min_prob}: in [0, 1)")
        if len(self.low_thresholds) != 3 or not all(0.0 < t < 1.0 for t in self.low_thresholds):
            raise KitError(f"low thresholds {list(self.low_thresholds)}: three values in (0, 1)")
        if any(not -90.0 <= a <= 90.0 or a == 0.0 for a in (*self.rotations_deg, *self.stage_rotations)):
            raise KitError(f"rotations {[*self.rotations_deg, *self.stage_rotations]}: degrees in [-90, 90], not 0 (upright is always tried)")
        if any(s not in MTCNN_STAGES for s in self.rotated_stages):
            raise KitError(f"--detector-rotated-stages {list(self.rotated_stages)}: choose from {list(MTCNN_STAGES)} "
                           "(hog and mmod search upright; the rotate stage has its own angles)")
        if not self.sketch_blur or not all(0.0 < f < 0.2 for f in self.sketch_blur):
            raise KitError(f"sketch blur {list(self.sketch_blur)}: one or more fractions of the shorter side in (0, 0.2)")
        if self.fallback not in FALLBACKS:
            raise KitError(f"--face-fallback {self.fallback!r}: choose from {list(FALLBACKS)}")
        self.mtcnn.check()

    def tag(self) -> str:
        """A string that identifies these settings (cache keys)."""
        d = asdict(self)
        d["mtcnn"] = self.mtcnn.tag()
        if not self.stage_rotations or set(self.rotated_stages) >= set(MTCNN_STAGES):
            del d["rotated_stages"]  # no effect, or the search of every stage (as before the field existed): keys stay
        return "cascade|" + "|".join(f"{k}={v}" for k, v in sorted(d.items()))


# ---------------------------------------------------------------- image transforms of the stages
def grey3(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


def clahe_grey(img: np.ndarray, clip: float = 3.0) -> np.ndarray:
    """Greyscale with contrast-limited adaptive histogram equalisation, as RGB."""
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    return cv2.cvtColor(cv2.createCLAHE(clipLimit=clip, tileGridSize=(8, 8)).apply(grey), cv2.COLOR_GRAY2RGB)


def inverted_grey(img: np.ndarray) -> np.ndarray:
    return 255 - grey3(img)


def hue_grey(img: np.ndarray) -> np.ndarray:
    """A false-colour image read back to brightness, as RGB: rainbow colour maps run from blue
    (hue 120 in OpenCV's 0-180) through green and yellow to red (0), so ``(120 - hue) mod 180``
    orders the colours the way the grey values they stand for were ordered. Weighted by
    saturation: grey pixels keep their own brightness (a grey image passes unchanged)."""
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    level = np.clip((120.0 - hsv[..., 0].astype(np.float32)) % 180.0, 0.0, 150.0) * (255.0 / 150.0)
    sat = hsv[..., 1].astype(np.float32) / 255.0
    grey = sat * level + (1.0 - sat) * cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
    return cv2.cvtColor(np.clip(grey, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2RGB)


def sketch_shading(img: np.ndarray, sigma_frac: float) -> np.ndarray:
    """Greyscale blurred by a Gaussian of ``sigma_frac`` x the shorter side, then histogram-equalised,
    as RGB: a pencil drawing's hatching becomes the dark eye, brow and mouth regions a detector
    looks for in a photograph."""
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    blurred = cv2.GaussianBlur(grey, (0, 0), sigma_frac * min(grey.shape))
    return cv2.cvtColor(cv2.equalizeHist(blurred), cv2.COLOR_GRAY2RGB)


def rotate_expand(img: np.ndarray, angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """``img`` rotated by ``angle_deg`` (counter-clockwise) on a canvas that holds it all,
    and the 2x3 matrix taking rotated pixels back to ``img``'s."""
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle_deg, 1.0)
    cos, sin = abs(m[0, 0]), abs(m[0, 1])
    nw, nh = int(np.ceil(h * sin + w * cos)), int(np.ceil(h * cos + w * sin))
    m[0, 2] += nw / 2 - w / 2
    m[1, 2] += nh / 2 - h / 2
    out = cv2.warpAffine(img, m, (nw, nh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out, cv2.invertAffineTransform(m)


def map_back(box: np.ndarray, landmarks: np.ndarray, back: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A box and landmarks found on a rotated copy, in the original image: the box keeps
    its size around its mapped centre (the face's own frame), landmarks map exactly."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    w, h = box[2] - box[0], box[3] - box[1]
    ncx, ncy = back @ np.array([cx, cy, 1.0])
    lm = np.c_[landmarks, np.ones(len(landmarks))] @ back.T
    return np.array([ncx - w / 2, ncy - h / 2, ncx + w / 2, ncy + h / 2], np.float32), lm.astype(np.float32)


def landmarks_from_shape(points: np.ndarray) -> np.ndarray:
    """MTCNN-order landmarks (left eye, right eye, nose, mouth left, mouth right; image left/right)
    from dlib's 5 points (two corners per eye, nose base); the mouth is estimated below the nose."""
    eyes = sorted([points[0:2].mean(0), points[2:4].mean(0)], key=lambda p: p[0])
    nose = points[4]
    mid = (eyes[0] + eyes[1]) / 2
    down = nose - mid
    mouth_mid = nose + 0.6 * down
    half = (eyes[1] - eyes[0]) * 0.4
    return np.array([eyes[0], eyes[1], nose, mouth_mid - half, mouth_mid + half], np.float32)


# ---------------------------------------------------------------- loading
class _ImageDataset(Dataset):
    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return np.ascontiguousarray(np.asarray(load_image(self.paths[i]))), ""
        except ImageError as err:  # handed back, not raised: a worker's traceback is not one line
            return np.zeros((1, 1, 3), np.uint8), str(err)


class FaceCascade:
    """Detectors tried in order; ``detect`` returns Faces with the stage per image."""

    def __init__(self, params: CascadeParams, device: torch.device, warn_share: float = 0.0, warn_after: int = 64, processes: int = 1):
        params.check()
        self.params = params
        self.processes = processes  # worker processes for the mmod stage (not part of the cache key: the same boxes)
        # early word on a set with few faces: after the first ``warn_after`` images (not part of the cache key)
        self.warn_share, self.warn_after = warn_share, max(1, warn_after)
        self.device = device
        self._mtcnn: dict[tuple, FaceDetector] = {}
        self._hog = None
        self._mmod = None
        self._sp = None
        self.seconds = {s: 0.0 for s in params.stages}
        self.tried = {s: 0 for s in params.stages}
        self.found = {s: 0 for s in params.stages}

    # ------------------------------------------------------------ detectors
    def _mtcnn_det(self, thresholds: tuple[float, float, float]) -> FaceDetector:
        if thresholds not in self._mtcnn:
            p = self.params.mtcnn
            self._mtcnn[thresholds] = FaceDetector(DetectorParams(p.canvas_px, p.min_face_px, thresholds, p.select), self.device)
        return self._mtcnn[thresholds]

    def _shape_predictor(self):
        if self._sp is None:
            from utils.faces.crop import SHAPE_PREDICTOR_FILE, face_models_file, load_shape_predictor

            self._sp = load_shape_predictor(face_models_file(SHAPE_PREDICTOR_FILE))
        return self._sp

    def _gate(self, box: np.ndarray, score: float, min_score: float, size: tuple[int, int]) -> bool:
        side = min(box[2] - box[0], box[3] - box[1])
        return score >= min_score and side >= self.params.min_face_frac * min(size)

    def _mtcnn_on(self, images: list[np.ndarray], thresholds):
        """MTCNN on images: per image (box, landmarks, prob, passed the gates) of the kept face, or None."""
        det = self._mtcnn_det(tuple(thresholds))
        s = self.params.mtcnn.canvas_px
        out = []
        for start in range(0, len(images), 32):
            batch = images[start : start + 32]
            canvases, scales = zip(*(letterbox_array(im, s) for im in batch))
            boxes, probs, points = det.detect_canvases(np.stack(canvases))
            for im, sc, b, p, pts in zip(batch, scales, boxes, probs, points):
                out.append(self._keep(im, b, p, pts, sc))
        return out

    def _keep(self, im: np.ndarray, b, p, pts, scale: float):
        if b is None or len(b) == 0:
            return None
        size = (im.shape[1], im.shape[0])
        b = np.asarray(b, np.float32) / scale
        p = np.asarray(p, np.float32)
        pts = np.asarray(pts, np.float32) / scale
        ok = [k for k in range(len(b)) if self._gate(b[k], float(p[k]), self.params.min_prob, size)]
        if not ok:  # the best box below the gates: a fallback candidate, not a face
            k = int(np.argmax(p))
            return b[k], pts[k], float(p[k]), False
        k = ok[pick_face(b[ok], size, self.params.mtcnn.select)]
        return b[k], pts[k], float(p[k]), True

    def _dlib_found(self, images: list[np.ndarray], which: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """dlib's HOG or CNN (mmod) detector on each image, upsampled once: per image, boxes (k, 4) and scores (k,).
        mmod (about a second an image) runs in ``processes`` worker processes where there are more than one and
        this process may still fork them (:func:`~utils.faces.dlib_pool.mmod_fork_safe`), else here."""
        import dlib

        if which == "hog":
            if self._hog is None:
                self._hog = dlib.get_frontal_face_detector()
            out = []
            for im in images:
                rects, scores, _ = self._hog.run(cv2.cvtColor(im, cv2.COLOR_RGB2GRAY), 1, min(0.0, self.params.hog_min_score))
                out.append((rect_boxes(rects), np.array(scores, np.float64)))  # float64: dlib's own scores, gated as they are
            return out
        if which != "mmod":
            raise KitError(f"dlib detector {which!r}: choose hog or mmod")
        from utils.faces.crop import face_models_file

        if self._mmod is None:
            if self.processes > 1 and mmod_fork_safe():
                self._mmod = DlibPool(face_models_file(MMOD_FILE), self.processes, kind="mmod")
            else:
                if self.processes > 1:
                    log.info("mmod stage in this process: it ran dlib's CNN detector before, so no worker can fork for it")
                self._mmod = dlib.cnn_face_detection_model_v1(str(face_models_file(MMOD_FILE)))
        if isinstance(self._mmod, DlibPool):
            return self._mmod.mmod(images)
        return [mmod_in_process(self._mmod, im) for im in images]

    def _dlib_on(self, images: list[np.ndarray], which: str):
        import dlib

        out = []
        min_score = self.params.hog_min_score if which == "hog" else self.params.mmod_min_score
        for im, (boxes, scores) in zip(images, self._dlib_found(images, which)):
            size = (im.shape[1], im.shape[0])
            ok = [k for k in range(len(boxes)) if self._gate(boxes[k], float(scores[k]), min_score, size)]
            if not ok:  # hog/mmod scores are not probabilities: no fallback candidate from them
                out.append(None)
                continue
            k = ok[pick_face(boxes[ok], size, self.params.mtcnn.select)]
            x0, y0, x1, y1 = (int(round(v)) for v in boxes[k])
            shape = self._shape_predictor()(im, dlib.rectangle(x0, y0, x1 - 1, y1 - 1))
            pts = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], np.float32)
            out.append((boxes[k], landmarks_from_shape(pts), float(scores[k]), True))
        return out

    def _search(self, images: list[np.ndarray], thresholds, transforms: list[Callable[[np.ndarray], np.ndarray] | None],
                angles: Sequence[float]):
        """MTCNN on each (angle, transform) in turn, each only on the images without a face yet.
        A face found on a rotated copy is mapped back and gated again on the image's own size."""
        out: list = [None] * len(images)
        for angle in angles:
            for transform in transforms:
                todo = [i for i in range(len(images)) if out[i] is None or not out[i][3]]
                if not todo:
                    return out
                views = [transform(images[i]) if transform else images[i] for i in todo]
                rotated = [rotate_expand(v, angle) for v in views] if angle else [(v, None) for v in views]
                hits = self._mtcnn_on([r for r, _ in rotated], thresholds)
                for i, (_, back), hit in zip(todo, rotated, hits):
                    if hit is None:
                        continue
                    if back is not None:
                        box, lm = map_back(hit[0], hit[1], back)
                        hit = (box, lm, hit[2], self._gate(box, hit[2], self.params.min_prob, (images[i].shape[1], images[i].shape[0])))
                    if out[i] is None or hit[3] or hit[2] > out[i][2]:
                        out[i] = hit
        return out

    def run_stage(self, stage: str, images: list[np.ndarray], angles: Sequence[float] | None = None):
        """One stage on ``images``: per image (box, landmarks, score, passed the gates) or None.
        ``angles``: for an MTCNN stage, the rotations searched in turn (0: upright); by default
        upright, then ``stage_rotations`` where the stage is one of ``rotated_stages``."""
        p = self.params
        if stage in ("hog", "mmod"):
            return self._dlib_on(images, stage)
        if stage == "rotate":
            return self._search(images, p.mtcnn.thresholds, [None], p.rotations_deg)
        transforms = {
            "mtcnn": [None],
            "mtcnn_low": [None],
            "mtcnn_clahe": [partial(clahe_grey, clip=p.clahe_clip)],
            "mtcnn_invert": [inverted_grey],
            "mtcnn_hue": [hue_grey],
            "mtcnn_sketch": [partial(sketch_shading, sigma_frac=f) for f in p.sketch_blur],
        }
        if stage not in transforms:
            raise KitError(f"--detector-stages {stage!r}: choose from {list(STAGES)}")
        thresholds = p.low_thresholds if stage == "mtcnn_low" else p.mtcnn.thresholds
        if angles is None:
            angles = (0.0, *p.stage_rotations) if stage in p.rotated_stages else (0.0,)
        return self._search(images, thresholds, transforms[stage], angles)

    # ------------------------------------------------------------ the cascade
    def detect(self, paths: Sequence[Path], batch_size: int = 32, workers: int = 2, desc: str = "detecting faces") -> Faces:
        """Run the stages in order on ``paths``; later stages only on the images still without a face.

        Raises:
            KitError: an image cannot be read (query and gallery need every one).
        """
        del batch_size  # MTCNN batches are fixed at 32 canvases; kept for FaceDetector's signature
        n = len(paths)
        out = Faces.empty(n, tuple(self.params.stages))
        best = np.zeros(n, np.float32)  # score of the best box below the gates (fallback "best")
        cand_boxes = np.full((n, 4), np.nan, np.float32)
        cand_landmarks = np.full((n, 5, 2), np.nan, np.float32)
        first = min(self.warn_after, CHUNK) if self.warn_share > 0 else CHUNK  # a short first chunk: the early count comes early
        chunks = [list(range(a, min(n, b))) for a, b in chunk_bounds(n, first, CHUNK)]
        loader = DataLoader(_ImageDataset(paths), batch_sampler=chunks, num_workers=workers, collate_fn=list)
        start, warned = 0, self.warn_share <= 0
        with ProgressBar(desc, total=n) as bar:
            for items in loader:
                bad = [e for _, e in items if e]
                if bad:
                    raise KitError(bad[0])
                images = [im for im, _ in items]
                for i, im in enumerate(images):
                    out.sizes[start + i] = (im.shape[1], im.shape[0])
                todo = list(range(len(images)))
                for s, stage in enumerate(self.params.stages):
                    if not todo:
                        break
                    t = time.perf_counter()
                    hits = self.run_stage(stage, [images[i] for i in todo])
                    self.seconds[stage] += time.perf_counter() - t
                    self.tried[stage] += len(todo)
                    left = []
                    for i, hit in zip(todo, hits):
                        if hit is None or not hit[3]:
                            left.append(i)
                            if hit is not None and hit[2] > best[start + i]:
                                best[start + i] = hit[2]
                                cand_boxes[start + i], cand_landmarks[start + i] = hit[0], hit[1]
                            continue
                        out.boxes[start + i], out.landmarks[start + i], out.probs[start + i] = hit[:3]
                        out.stage[start + i] = s
                        self.found[stage] += 1
                    todo = left
                start += len(images)
                bar.advance(len(images))
                if not warned and start >= min(n, self.warn_after):
                    warned = self._warn_few_faces(out.stage[:start], desc)
        if self.params.fallback == "best":  # stage stays -1: no detector passed its gates
            use = (out.stage < 0) & np.isfinite(cand_boxes[:, 0])
            out.boxes[use], out.landmarks[use], out.probs[use] = cand_boxes[use], cand_landmarks[use], best[use]
        counts = ", ".join(f"{name} {int((out.stage == s).sum())}" for s, name in enumerate(self.params.stages))
        log.info("%s: a face in %d of %d images (%s)", desc, int((out.stage >= 0).sum()), n, counts)
        return out

    def _warn_few_faces(self, stage: np.ndarray, desc: str) -> bool:
        """Warn (once) when fewer than ``warn_share`` of the images detected so far hold a face."""
        found = int((stage >= 0).sum())
        if found < self.warn_share * len(stage):
            log.warning("%s: a face in only %d of the first %d images (below %.0f %%): is this a face data set? "
                        "A face run on images without faces falls back to the centre square for each and takes minutes",
                        desc, found, len(stage), 100 * self.warn_share)
        return True

    def stage_counts(self, faces: Faces) -> dict[str, int]:
        """Images per stage that found their face, and ``none`` for the rest."""
        counts = {name: int((faces.stage == s).sum()) for s, name in enumerate(self.params.stages)}
        counts["none"] = int((faces.stage < 0).sum())
        return counts


def chunk_bounds(n: int, first: int, size: int) -> list[tuple[int, int]]:
    """[start, end) of the chunks of ``n`` images: ``first`` images, then ``size`` at a time."""
    bounds = [(0, min(n, first))] if n else []
    bounds += [(a, min(n, a + size)) for a in range(first, n, size)]
    return bounds


def letterbox_array(img: np.ndarray, canvas_px: int) -> tuple[np.ndarray, float]:
    """:func:`utils.faces.detect.letterbox` for an RGB array."""
    from PIL import Image

    return letterbox(Image.fromarray(img), canvas_px)
