"""infer_clip_colour.py and its colour term: descriptors and distances on real image files,
checked against OpenCV's own histogram comparison; the term's search on a handmade case."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from utils.clip.colour_term import apply_colour_term, search_colour_term, threshold_grid
from utils.data.colour import DESCRIPTORS, DISTANCES, colour_descriptors, colour_distances, emd
from utils.errors import KitError


@pytest.fixture
def colour_files(tmp_path):
    """Red, a darker red, blue, and a half red / half blue image, as PNG files."""
    specs = {"red": (220, 20, 20), "red2": (180, 30, 30), "blue": (20, 20, 220)}
    paths = []
    for name, rgb in specs.items():
        Image.new("RGB", (40, 30), rgb).save(tmp_path / f"{name}.png")
        paths.append(tmp_path / f"{name}.png")
    half = Image.new("RGB", (40, 30), specs["red"])
    half.paste(Image.new("RGB", (20, 30), specs["blue"]), (20, 0))
    half.save(tmp_path / "half.jpg", quality=95)
    return paths + [tmp_path / "half.jpg"]


@pytest.mark.parametrize("kind", DESCRIPTORS)
@pytest.mark.parametrize("metric", DISTANCES)
def test_red_is_closer_to_red_than_to_blue(colour_files, kind, metric):
    d = colour_descriptors(colour_files, kind)
    assert np.allclose(d.hist.sum(axis=1), 1.0, atol=1e-5)
    dist = colour_distances(d, d, metric)
    red, red2, blue, half = range(4)
    assert np.allclose(np.diag(dist), 0.0, atol=1e-3)  # sqrt(1 - bc) magnifies rounding
    assert dist[red, red2] <= dist[red, blue]
    assert dist[red, half] < dist[red, blue]  # half the colours shared
    assert np.allclose(dist, dist.T, atol=1e-4)


def test_distances_match_opencv(colour_files):
    d = colour_descriptors(colour_files, "hsv")
    a, b = d.hist[0], d.hist[3]
    chi2 = colour_distances(d, d, "chi2")[0, 3]
    # OpenCV's CHISQR_ALT is 2 x sum (a-b)^2/(a+b)
    assert np.isclose(chi2, cv2.compareHist(a, b, cv2.HISTCMP_CHISQR_ALT) / 2, atol=1e-5)
    bh = colour_distances(d, d, "bhattacharyya")[0, 3]
    assert np.isclose(bh, cv2.compareHist(a, b, cv2.HISTCMP_BHATTACHARYYA), atol=1e-4)
    # one-colour histograms: EMD is the ground distance between the two bins
    ia, ib = int(np.argmax(d.hist[0])), int(np.argmax(d.hist[2]))
    assert np.isclose(emd(d.hist[0], d.hist[2], d.centres), np.linalg.norm(d.centres[ia] - d.centres[ib]), atol=1e-4)


def test_emd_only_for_the_pairs_asked(colour_files):
    d = colour_descriptors(colour_files, "lab")
    pairs = np.array([[0, 1]] * 4)
    dist = colour_distances(d, d, "emd", pairs=pairs)
    assert np.isfinite(dist[:, :2]).all() and np.isinf(dist[:, 2:]).all()


def test_unknown_names_are_one_clear_error(colour_files):
    with pytest.raises(KitError, match="--colour 'rgb'"):
        colour_descriptors(colour_files, "rgb")
    d = colour_descriptors(colour_files, "lab")
    with pytest.raises(KitError, match="--distance 'l1'"):
        colour_distances(d, d, "l1")


def test_colour_term_search_finds_the_bonus_that_fixes_rank_one():
    # 2 queries x 3 gallery; query i's right answer is column i, a close second by cosine,
    # and the only one of close colour: a bonus of 0.1 under threshold 0.5 moves it to rank 1
    cosine = np.array([[0.80, 0.70, 0.85], [0.60, 0.70, 0.75]], dtype=np.float32)
    dist = np.array([[0.1, 0.9, 0.9], [0.9, 0.2, 0.9]], dtype=np.float32)
    rel = np.eye(2, 3, dtype=bool)
    assert np.allclose(apply_colour_term(cosine, dist, 0.0, 0.5), cosine)
    fused = apply_colour_term(cosine, dist, 0.2, 0.5)
    assert np.isclose(fused[0, 0], 0.80 + 0.2 * (1 - 0.1 / 0.5)) and fused[0, 1] == cosine[0, 1]
    best, table = search_colour_term(cosine, dist, rel, [0.0, 0.05, 0.2], threshold_grid(dist, [0.4, 1.0]))
    assert best.alpha > 0 and best.val_score == 1000.0
    assert min(t.val_score for t in table) < 1000.0  # alpha 0 keeps the wrong rank 1
