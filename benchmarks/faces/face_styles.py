"""Styles, pose changes and detail loss for the hard face benchmark (RGB uint8 in, RGB uint8 out).

Each style stands for a kind of generated image the competition's gallery
holds; the renderers live in the kit's style library (utils/faces/styles.py, one copy
for the benchmark and the kit's training), built from OpenCV pieces:

    pencil      cv2.pencilSketch (grey, dark lines on white)
    stylise     cv2.stylization (watercolour-like)
    colour_map  cv2.applyColorMap on the grey image (a false-colour print)
    cartoon     k-means colour quantisation (6 colours) + adaptive-threshold edges
    oil         cv2.edgePreservingFilter + a coarse colour cast (oil-like smoothing)

``degrade`` changes pose (rotation up to +-25 degrees, rescale 0.8-1.2x,
shift up to 8 %), then loses detail (downsample by 2-4 and back, JPEG at
quality 25-60). ``styled`` applies pose, detail loss and a style in that order.
"""

from __future__ import annotations

import random

import cv2
import numpy as np

from utils.faces.styles import cartoon, colour_map, oil, pencil, stylise

MAX_ROTATION_DEG = 25.0


STYLES = {"pencil": pencil, "stylise": stylise, "colour_map": colour_map, "cartoon": cartoon, "oil": oil}


def pose(img: np.ndarray, rng: random.Random) -> np.ndarray:
    """Rotated by up to +-25 degrees, rescaled 0.8-1.2x, shifted up to 8 %, mirrored half the time."""
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG), rng.uniform(0.8, 1.2))
    m[:, 2] += (rng.uniform(-0.08, 0.08) * w, rng.uniform(-0.08, 0.08) * h)
    out = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
    return out[:, ::-1].copy() if rng.random() < 0.5 else out


def detail_loss(img: np.ndarray, rng: random.Random) -> np.ndarray:
    """Downsampled by 2-4 and back up, then JPEG artefacts at quality 25-60."""
    h, w = img.shape[:2]
    f = rng.uniform(2.0, 4.0)
    small = cv2.resize(img, (max(8, round(w / f)), max(8, round(h / f))), interpolation=cv2.INTER_AREA)
    out = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(out, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, rng.randint(25, 60)])
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def styled(img: np.ndarray, style: str, rng: random.Random) -> np.ndarray:
    """Pose change, detail loss, then ``style`` (a key of STYLES)."""
    return STYLES[style](detail_loss(pose(img, rng), rng))
