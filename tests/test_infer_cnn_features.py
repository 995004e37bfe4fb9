"""infer_cnn_features.py and its parts: the all-faces box on real ORL faces, RMSE/SSIM of the
top-K on real image files."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from tests.conftest import shared_data
from utils.faces.detect import DetectorParams, FaceDetector
from utils.faces.face_box import face_box_crops, union_box, widen
from utils.runs.pixel_agreement import grey_squares, topk_agreement


def test_union_box_and_widen():
    boxes = np.array([[10, 20, 30, 40], [50, 5, 60, 25]], dtype=np.float32)
    assert union_box(boxes).tolist() == [10, 5, 60, 40]
    assert widen(np.array([10, 10, 30, 30]), 0.5, (100, 100)) == (0, 0, 40, 40)
    assert widen(np.array([10, 10, 30, 30]), 0.5, (35, 100)) == (0, 0, 35, 40)  # clipped to the image


def test_all_faces_box_covers_both_faces_one_face_only_one(tmp_path):
    orl = shared_data("orl_faces")
    a = Image.open(orl / "s1" / "1.pgm").convert("RGB")
    b = Image.open(orl / "s2" / "1.pgm").convert("RGB")
    two = Image.new("RGB", (3 * a.width, a.height), (128, 128, 128))
    two.paste(a, (0, 0))
    two.paste(b, (2 * a.width, 0))
    paths = [tmp_path / "two.png", tmp_path / "one.png", tmp_path / "none.png"]
    two.save(paths[0])
    a.save(paths[1])
    Image.new("RGB", (80, 80), (10, 200, 10)).save(paths[2])
    det = FaceDetector(DetectorParams(), torch.device("cpu"))
    every = face_box_crops(paths, det, "all", 0.1, tmp_path / "cache")
    one = face_box_crops(paths, det, "one", 0.1, tmp_path / "cache")
    assert every.n_faces.tolist() == [2, 1, 0] and every.n_whole == one.n_whole == 1
    assert every.paths[2] == paths[2] and one.paths[2] == paths[2]  # no face: the whole image
    w_all, w_one = Image.open(every.paths[0]).width, Image.open(one.paths[0]).width
    assert w_all > 2 * a.width and w_one < 1.2 * a.width  # both faces, or one
    cached = face_box_crops(paths, det, "all", 0.1, tmp_path / "cache")  # boxes and crops reused
    assert cached.paths == every.paths


def test_pixel_agreement_prefers_the_same_picture(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        arr = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    grey = grey_squares(paths, 32)
    assert grey.shape == (4, 32, 32) and 0.0 <= grey.min() and grey.max() <= 1.0
    same = topk_agreement(np.eye(4, dtype=np.float32), grey, grey, k=1)  # each query retrieves itself
    other = topk_agreement(np.roll(np.eye(4, dtype=np.float32), 1, axis=1), grey, grey, k=1)
    assert same["rmse"] == 0.0 and np.isclose(same["ssim"], 1.0)
    assert other["rmse"] > 0.05 and other["ssim"] < 0.2
