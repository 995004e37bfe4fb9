"""Colour descriptors of whole images and the distances between them.

Every descriptor is a normalised histogram over fixed colour bins (so every
distance works on every descriptor), plus each bin's centre in a 3-D colour
space with a sensible Euclidean distance (the ground distance of EMD):

- ``hsv``: H x S x V bins (16 x 4 x 4); bin centres on the HSV cone
  (s*v*cos h, s*v*sin h, v), so red near 0 and red near 360 degrees are close;
- ``lab``: L x a x b bins (4 x 8 x 8) in CIE Lab; centres scaled to 0..1;
- ``dominant``: the ``k`` dominant colours (k-means in Lab, seeded), each
  colour's share put in its Lab bin: a coarse palette instead of a full histogram.

Distances between two histograms (0 = the same colours):

- ``chi2``: sum (a - b)^2 / (a + b), in [0, 2];
- ``bhattacharyya``: sqrt(1 - sum sqrt(a * b)), in [0, 1] (OpenCV's HISTCMP_BHATTACHARYYA
  for normalised histograms);
- ``emd``: earth mover's distance (OpenCV ``cv2.EMD``, L2 ground distance
  between bin centres), in [0, about 1.7]. It needs one solver call per pair,
  so :func:`colour_distances` computes it only for the pairs asked for.

Example:
    >>> desc = colour_descriptors([Path("a.jpg"), Path("b.jpg")], "lab")
    >>> colour_distances(desc, desc, "chi2")[0, 1]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from utils.data.images import load_image
from utils.errors import KitError
from utils.progress import track

DESCRIPTORS = ("hsv", "lab", "dominant")
DISTANCES = ("chi2", "emd", "bhattacharyya")
HSV_BINS = (16, 4, 4)
LAB_BINS = (4, 8, 8)
DESCRIPTOR_PX = 64  # images are shrunk to this side first: colour statistics need no detail
DOMINANT_K = 5


@dataclass
class ColourDescriptors:
    """Histograms of a set of images over the same bins."""

    kind: str
    hist: np.ndarray  # (n, bins) float32, each row sums to 1
    centres: np.ndarray  # (bins, 3) float32 bin centres, for EMD's ground distance


def _bin_centres(bins: tuple[int, int, int]) -> np.ndarray:
    """(prod(bins), 3) centres of a regular grid over [0, 1]^3, in C order."""
    axes = [(np.arange(b) + 0.5) / b for b in bins]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    return grid.reshape(-1, 3).astype(np.float32)


def bin_centres(kind: str) -> np.ndarray:
    """Bin centres of a descriptor kind in its ground-distance space."""
    if kind == "hsv":
        c = _bin_centres(HSV_BINS)
        h, s, v = c[:, 0] * 2 * np.pi, c[:, 1], c[:, 2]
        return np.stack([s * v * np.cos(h), s * v * np.sin(h), v], axis=1).astype(np.float32)
    if kind in ("lab", "dominant"):
        return _bin_centres(LAB_BINS)
    raise KitError(f"--colour {kind!r}: choose one of {DESCRIPTORS}")


def _small_rgb(path: Path) -> np.ndarray:
    img = load_image(path, max_side=4 * DESCRIPTOR_PX)
    img.thumbnail((DESCRIPTOR_PX, DESCRIPTOR_PX))
    return np.asarray(img.convert("RGB"))


def _histogram(rgb: np.ndarray, kind: str) -> np.ndarray:
    if kind == "hsv":
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)  # uint8: H in 0..179, S, V in 0..255
        hist = cv2.calcHist([hsv], [0, 1, 2], None, list(HSV_BINS), [0, 180, 0, 256, 0, 256])
    elif kind == "lab":
        lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)  # uint8: every channel in 0..255
        hist = cv2.calcHist([lab], [0, 1, 2], None, list(LAB_BINS), [0, 256, 0, 256, 0, 256])
    elif kind == "dominant":
        hist = _dominant(rgb)
    else:
        raise KitError(f"--colour {kind!r}: choose one of {DESCRIPTORS}")
    hist = hist.reshape(-1).astype(np.float64)
    return (hist / max(hist.sum(), 1e-12)).astype(np.float32)


def _dominant(rgb: np.ndarray) -> np.ndarray:
    """The k-means palette (Lab) as a Lab-bin histogram of the colours' shares."""
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float32)
    k = min(DOMINANT_K, len(np.unique(lab, axis=0)))
    cv2.setRNGSeed(0)  # same image, same palette
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 1.0)
    _, labels, centres = cv2.kmeans(lab, k, None, criteria, 3, cv2.KMEANS_PP_CENTERS)
    share = np.bincount(labels.reshape(-1), minlength=k).astype(np.float64)
    idx = np.clip((centres / 256.0 * np.array(LAB_BINS)).astype(int), 0, np.array(LAB_BINS) - 1)
    hist = np.zeros(LAB_BINS, dtype=np.float64)
    np.add.at(hist, (idx[:, 0], idx[:, 1], idx[:, 2]), share)
    return hist


def colour_descriptors(paths: Sequence[Path], kind: str, desc: str = "colour") -> ColourDescriptors:
    """One histogram per image of ``paths``.

    Raises:
        KitError: an unknown kind, or an image that cannot be read (naming it).
    """
    centres = bin_centres(kind)  # checks the kind before any image is read
    hist = np.zeros((len(paths), len(centres)), dtype=np.float32)
    for i, p in enumerate(track(list(paths), f"{desc}: {kind} histograms")):
        hist[i] = _histogram(_small_rgb(p), kind)
    return ColourDescriptors(kind, hist, centres)


def emd(a: np.ndarray, b: np.ndarray, centres: np.ndarray) -> float:
    """Earth mover's distance between two normalised histograms over ``centres``."""
    ia, ib = np.flatnonzero(a), np.flatnonzero(b)
    sig_a = np.column_stack([a[ia], centres[ia]]).astype(np.float32)
    sig_b = np.column_stack([b[ib], centres[ib]]).astype(np.float32)
    dist, _, _ = cv2.EMD(sig_a, sig_b, cv2.DIST_L2)
    return float(dist)


def colour_distances(
    query: ColourDescriptors, gallery: ColourDescriptors, metric: str, pairs: np.ndarray | None = None
) -> np.ndarray:
    """(n_query, n_gallery) float32 distances, 0 = the same colours.

    Args:
        metric: one of :data:`DISTANCES`.
        pairs: optional (n_query, m) gallery indices per query; only those
            pairs are computed and every other entry is ``inf`` (for ``emd``,
            whose solver is too slow for every pair of a large split).

    Raises:
        KitError: an unknown metric, or descriptors of different kinds.
    """
    if query.kind != gallery.kind:
        raise KitError(f"colour descriptors differ: {query.kind} vs {gallery.kind}")
    q, g = query.hist.astype(np.float64), gallery.hist.astype(np.float64)
    if metric == "bhattacharyya":
        bc = np.sqrt(q) @ np.sqrt(g).T
        full = np.sqrt(np.clip(1.0 - bc, 0.0, None))
    elif metric == "chi2":
        full = np.empty((len(q), len(g)))
        for i, row in enumerate(q):
            s = row + g
            full[i] = np.where(s > 0, (row - g) ** 2 / np.where(s > 0, s, 1.0), 0.0).sum(axis=1)
    elif metric == "emd":
        full = np.full((len(q), len(g)), np.inf)
        cols = pairs if pairs is not None else np.broadcast_to(np.arange(len(g)), (len(q), len(g)))
        for i in range(len(q)):
            for j in cols[i]:
                full[i, j] = emd(q[i], g[j], query.centres)
        return full.astype(np.float32)
    else:
        raise KitError(f"--distance {metric!r}: choose one of {DISTANCES}")
    if pairs is not None:
        keep = np.full(full.shape, np.inf)
        rows = np.arange(len(q))[:, None]
        keep[rows, pairs] = full[rows, pairs]
        full = keep
    return full.astype(np.float32)
