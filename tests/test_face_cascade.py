"""The detection cascade: every stage alone finds a real face drawn as a pencil sketch rolled 15 and
30 degrees (the MTCNN stages at 30 degrees with their rotation search),
none finds a face in a blank image, later stages run only on what earlier ones missed,
and rotated detections map back onto the face."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from utils.errors import KitError
from utils.faces.cascade import MTCNN_STAGES, STAGES, CascadeParams, FaceCascade, landmarks_from_shape, map_back, rotate_expand

CPU = torch.device("cpu")
ANGLE_DEG = 30.0
FACE_CENTER_XY = (222, 118)  # the astronaut's face in skimage's 512x512 image (tests/test_infer_facenet.py)


def rotated_centre(angle_deg: float) -> np.ndarray:
    m = cv2.getRotationMatrix2D((256, 256), angle_deg, 1.0)
    return m @ np.array([*FACE_CENTER_XY, 1.0])


def sketch(angle_deg: float) -> np.ndarray:
    from skimage import data

    m = cv2.getRotationMatrix2D((256, 256), angle_deg, 1.0)
    rotated = cv2.warpAffine(data.astronaut(), m, (512, 512), borderMode=cv2.BORDER_REFLECT101)
    return cv2.pencilSketch(rotated, sigma_s=40, sigma_r=0.08, shade_factor=0.04)[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """skimage's astronaut rotated by 15 and 30 degrees and drawn as a pencil sketch
    (and its negative, for the inverting stage); a blank image."""
    d = tmp_path_factory.mktemp("cascade")
    paths = {name: d / f"{name}.png" for name in ("sketch15", "negative15", "sketch30", "negative30", "blank")}
    Image.fromarray(sketch(15.0)).save(paths["sketch15"])
    Image.fromarray(255 - sketch(15.0)).save(paths["negative15"])
    Image.fromarray(sketch(ANGLE_DEG)).save(paths["sketch30"])
    Image.fromarray(255 - sketch(ANGLE_DEG)).save(paths["negative30"])
    Image.new("RGB", (200, 160), (255, 255, 255)).save(paths["blank"])
    return paths


def check_face(faces, i: int, angle_deg: float, stage: str) -> None:
    x0, y0, x1, y1 = faces.boxes[i]
    cx, cy = rotated_centre(angle_deg)
    assert abs((x0 + x1) / 2 - cx) < 30 and abs((y0 + y1) / 2 - cy) < 35, stage  # on the face ...
    assert 50 < x1 - x0 < 200, stage  # ... and face-sized
    eyes = faces.landmarks[i][:2]
    tilt = np.degrees(np.arctan2(eyes[1, 1] - eyes[0, 1], eyes[1, 0] - eyes[0, 0]))
    assert abs(tilt + angle_deg) < 15, (stage, tilt)  # the eyes follow the roll (image y points down)
    assert np.isfinite(faces.landmarks[i]).all() and faces.probs[i] > 0


def slow_for(*slow: str) -> list:
    """STAGES as parameters, those named marked slow (over 10 s on a loaded 2-core machine)."""
    return [pytest.param(s, marks=pytest.mark.slow) if s in slow else s for s in STAGES]


@pytest.mark.parametrize("stage", slow_for("mmod"))
def test_each_stage_finds_the_sketched_face_and_nothing_in_a_blank_image(images, stage):
    cascade = FaceCascade(CascadeParams(stages=(stage,)), CPU)
    face = images["negative15" if stage == "mtcnn_invert" else "sketch15"]  # the inverting stage sees the sketch
    faces = cascade.detect([face, images["blank"]], workers=0)
    assert faces.found.tolist() == [True, False], stage
    assert faces.stage.tolist() == [0, -1] and faces.stage_names == (stage,)
    check_face(faces, 0, 15.0, stage)


ROTATIONS = (-15.0, 15.0, -30.0, 30.0)


@pytest.mark.parametrize("stage", slow_for("mmod", "mtcnn_sketch"))
def test_each_stage_finds_the_sketch_rolled_30_degrees(images, stage):
    """hog, mmod and rotate as they are; every MTCNN stage with its rotation search (--detector-rotations)."""
    params = CascadeParams(stages=(stage,), stage_rotations=() if stage in ("hog", "mmod", "rotate") else ROTATIONS, rotated_stages=MTCNN_STAGES)
    faces = FaceCascade(params, CPU).detect([images["negative30" if stage == "mtcnn_invert" else "sketch30"]], workers=0)
    assert faces.found[0], stage
    check_face(faces, 0, ANGLE_DEG, stage)


@pytest.fixture
def rotated_angles(monkeypatch) -> list[float]:
    """The angle of every rotated copy the cascade makes, in order."""
    from utils.faces import cascade as cascade_module

    angles: list[float] = []
    real = cascade_module.rotate_expand
    monkeypatch.setattr(cascade_module, "rotate_expand", lambda img, a: angles.append(a) or real(img, a))
    return angles


def test_stage_rotations_run_only_where_upright_found_nothing(images, rotated_angles):
    cascade = FaceCascade(CascadeParams(stages=("mtcnn", "mtcnn_sketch"), stage_rotations=ROTATIONS, rotated_stages=MTCNN_STAGES), CPU)
    faces = cascade.detect([images["sketch15"], images["blank"]], workers=0)
    assert faces.stage.tolist() == [0, -1]
    # only the blank image is rotated: by mtcnn at each angle, then by mtcnn_sketch per angle and blur
    assert rotated_angles == list(ROTATIONS) + [a for a in ROTATIONS for _ in CascadeParams().sketch_blur]


def test_only_the_rotated_stages_search_rotated_copies(images, rotated_angles):
    params = CascadeParams(stages=("mtcnn_invert", "mtcnn_clahe"), stage_rotations=ROTATIONS, rotated_stages=("mtcnn_clahe",))
    faces = FaceCascade(params, CPU).detect([images["sketch30"]], workers=0)
    assert rotated_angles == [ROTATIONS[0]]  # mtcnn_invert upright only; mtcnn_clahe finds it on its first rotated copy
    assert faces.stage.tolist() == [1]
    check_face(faces, 0, ANGLE_DEG, "mtcnn_clahe")
    upright = FaceCascade(CascadeParams(stages=("mtcnn_invert", "mtcnn_clahe"), stage_rotations=()), CPU)
    assert upright.detect([images["sketch30"]], workers=0).stage.tolist() == [-1]  # the search is what finds it


def test_the_default_cascade_rotates_in_mtcnn_and_clahe_only():
    p = CascadeParams()
    assert p.stage_rotations == ROTATIONS and p.rotated_stages == ("mtcnn", "mtcnn_clahe")
    # the tag names the rotated stages only where they matter: upright settings keep their cache keys
    assert "rotated_stages" in p.tag()
    assert "rotated_stages" not in CascadeParams(stage_rotations=()).tag()
    assert CascadeParams(rotated_stages=MTCNN_STAGES).tag() != p.tag()


def test_plain_mtcnn_misses_the_30_degree_sketch_and_the_cascade_recovers_it(images):
    cascade = FaceCascade(CascadeParams(stages=("mtcnn", "rotate"), stage_rotations=()), CPU)
    faces = cascade.detect([images["sketch30"]], workers=0)
    assert faces.stage.tolist() == [1]  # found by the rotation search, not by MTCNN upright
    check_face(faces, 0, ANGLE_DEG, "rotate")


@pytest.mark.slow
def test_later_stages_run_only_on_what_earlier_ones_missed(images):
    cascade = FaceCascade(CascadeParams(stages=("mtcnn", "hog", "rotate")), CPU)
    faces = cascade.detect([images["sketch15"], images["blank"], images["sketch15"]], workers=0)
    assert faces.stage.tolist() == [0, -1, 0]
    assert cascade.tried == {"mtcnn": 3, "hog": 1, "rotate": 1}  # only the blank image went on
    assert cascade.stage_counts(faces) == {"mtcnn": 2, "hog": 0, "rotate": 0, "none": 1}


@pytest.mark.slow
def test_the_size_gate_rejects_small_boxes(images):
    cascade = FaceCascade(CascadeParams(stages=("mtcnn",), min_face_frac=0.6), CPU)  # a face is ~1/4 of this image
    assert not cascade.detect([images["sketch15"]], workers=0).found[0]


def test_rotated_detection_maps_back_exactly():
    img = np.zeros((100, 160, 3), np.uint8)
    rotated, back = rotate_expand(img, 30.0)
    assert rotated.shape[0] > 100 and rotated.shape[1] > 160  # nothing cut off
    fwd = cv2.invertAffineTransform(back)
    pts = np.array([[40.0, 30.0], [90.0, 70.0], [10.0, 90.0], [150.0, 5.0], [80.0, 50.0]])
    in_rot = np.c_[pts, np.ones(5)] @ fwd.T
    box = np.array([in_rot[4, 0] - 10, in_rot[4, 1] - 12, in_rot[4, 0] + 10, in_rot[4, 1] + 12])
    b, lm = map_back(box, in_rot, back)
    assert np.allclose(lm, pts, atol=1e-3)
    assert np.allclose([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2], pts[4], atol=1e-3) and np.isclose(b[2] - b[0], 20)


def test_dlib_points_become_mtcnn_order_landmarks():
    # dlib's 5 points: corners of the image-right eye, corners of the image-left eye, nose base
    pts = np.array([[70, 40], [60, 40], [30, 40], [40, 40], [50, 60]], np.float32)
    lm = landmarks_from_shape(pts)
    assert np.allclose(lm[0], [35, 40]) and np.allclose(lm[1], [65, 40]) and np.allclose(lm[2], [50, 60])
    assert lm[3, 1] > lm[2, 1] and lm[3, 0] < lm[2, 0] < lm[4, 0]  # mouth below the nose, left to right


@pytest.mark.parametrize("bad, match", [
    ({"stages": ()}, "at least one stage"),
    ({"stages": ("mtcnn", "yolo")}, "'yolo'"),
    ({"stages": ("hog", "hog")}, "each stage once"),
    ({"min_face_frac": 1.5}, "--min-face-frac"),
    ({"stage_rotations": (0.0, 15.0)}, "not 0"),
    ({"rotated_stages": ("mtcnn", "hog")}, "--detector-rotated-stages"),
    ({"sketch_blur": ()}, "sketch blur"),
])
def test_bad_settings_are_one_clear_line(bad, match):
    with pytest.raises(KitError, match=match) as err:
        CascadeParams(**bad).check()
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_the_crop_cache_records_the_stage_per_image(images, tmp_path):
    from utils.faces.crop import CropParams, face_crops

    cascade = FaceCascade(CascadeParams(stages=("mtcnn", "rotate"), stage_rotations=()), CPU)
    paths = [images["sketch30"], images["blank"], images["sketch15"]]
    crops = face_crops(paths, cascade, CropParams(size_px=150, aligner="dlib"), workers=0, cache_dir=tmp_path)
    assert crops.stage.tolist() == [1, -1, 0] and crops.stage_names == ("mtcnn", "rotate")
    assert crops.stage_counts() == {"mtcnn": 1, "rotate": 1, "none": 1} and crops.fallback.tolist() == [False, True, False]
    again = face_crops(paths, cascade, CropParams(size_px=150, aligner="dlib"), workers=0, cache_dir=tmp_path)
    assert again.stage.tolist() == [1, -1, 0] and again.stage_names == ("mtcnn", "rotate")
    assert cascade.tried == {"mtcnn": 3, "rotate": 2}  # the second call came from the cache


@pytest.mark.slow
def test_infer_facenet_cascade_writes_counts_per_stage(rehearsal_data, tmp_path):
    import json

    import infer_facenet

    runs = tmp_path / "runs"
    argv = ["--data", str(rehearsal_data), "--runs", str(runs), "--embedder", "dlib", "--detector", "cascade",
            "--detector-stages", "mtcnn", "hog", "--detect-px", "64", "--workers", "0", "--tta"]
    assert infer_facenet.main(argv) == 0
    faces = json.loads((runs / "dlib" / "meta.json").read_text())["faces"]
    for which, counts in faces.items():  # generated shapes: no stage finds a face, each image counted once
        assert set(counts["by_stage"]) == {"mtcnn", "hog", "none"}, which
        assert sum(counts["by_stage"].values()) == counts["images"] == counts["by_stage"]["none"] + counts["faces_found"]
    with pytest.raises(KitError, match="--detector-stages 'yolo'"):
        infer_facenet.main([*argv, "--detector-stages", "yolo"])
