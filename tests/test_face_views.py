"""Gallery views (utils/faces/views.py): a face found only on the inverted copy is embedded through that
inversion, a texture view lets a textured face match its photo, the fusion rules and their choice,
meta.json's record of views and rule, and the early warning on a set without faces."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import infer_facenet
from utils.config import config_from_args
from utils.errors import KitError
from utils.faces.cascade import CascadeParams, FaceCascade, inverted_grey
from utils.faces.crop import DLIB_PADDING, SHAPE_PREDICTOR_FILE, CropParams, face_models_file
from utils.faces.pipeline import FacePipeline
from utils.faces.views import DLIB_EYE_FRAC, FUSION_RULES, choose_rule, eye_px, fuse, gallery_normalised
from utils.runs.similarity_io import load_run

CPU = torch.device("cpu")


def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def pencil_negative() -> np.ndarray:
    """The astronaut drawn as a pencil sketch, as a negative (light lines on black): plain MTCNN misses it."""
    grey = cv2.pencilSketch(astronaut(), sigma_s=40, sigma_r=0.08, shade_factor=0.04)[0]
    rolled = cv2.warpAffine(grey, cv2.getRotationMatrix2D((256, 256), 15.0, 1.0), (512, 512), borderMode=cv2.BORDER_REFLECT101)
    return 255 - rolled


def textured() -> np.ndarray:
    """The astronaut under a fine print pattern (a 3-pixel checkerboard of +-70), added with numpy."""
    yy, xx = np.mgrid[:512, :512]
    pattern = np.where(((yy // 3) + (xx // 3)) % 2 == 0, 70.0, -70.0)
    return np.clip(astronaut().astype(np.float32) + pattern[..., None], 0, 255).astype(np.uint8)


def pipeline(tmp_path: Path, *flags: str) -> FacePipeline:
    argv = ["--data", str(tmp_path), "--runs", str(tmp_path / "runs"), "--embedder", "dlib", "--workers", "0", "--tta", *flags]
    cfg = config_from_args(infer_facenet.Config, infer_facenet.build_parser().parse_args(argv))
    return FacePipeline(cfg, CPU, cache_dir=tmp_path / "runs" / "face_cache")


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("views")
    out = {"photo": d / "photo.png", "negative": d / "negative.png", "textured": d / "textured.png"}
    Image.fromarray(astronaut()).save(out["photo"])
    Image.fromarray(pencil_negative()).save(out["negative"])
    Image.fromarray(textured()).save(out["textured"])
    return out


def test_a_face_found_only_by_the_inverted_stage_is_embedded_through_that_inversion(files, tmp_path):
    stages = ["--detector-stages", "mtcnn", "mtcnn_invert", "--detector-rotations"]
    pipe = pipeline(tmp_path, *stages, "--gallery-views", "detector")
    assert pipe.crops([files["negative"]], "gallery").stage_counts() == {"mtcnn": 0, "mtcnn_invert": 1, "none": 0}
    photo = pipe.embed_set([files["photo"]], "query")[0]
    plain = pipe.embed_set([files["negative"]], "gallery")[0]
    (view,) = pipe.embed_views([files["negative"]], ["negative.png"], "gallery")
    assert pipe.image_views["gallery"] == {"negative.png": ["plain", "detector:mtcnn_invert"]}
    # the view is the inverted crop: the sketch's dark lines on white, closer to the photo than the negative is
    crop = pipe.crops([files["negative"]], "gallery").pixels  # as the embedder sees it (grey)
    inverted = inverted_grey(pipe._stored_crops([files["negative"]], "gallery").pixels[0])[None]
    assert np.allclose(view[0], pipe.embed_pixels(inverted, "x", views=pipe.view_tta)[0], atol=1e-5)
    assert not np.allclose(view[0], pipe.embed_pixels(crop, "x", views=pipe.view_tta)[0], atol=1e-3)
    assert cos(photo, view[0]) > cos(photo, plain) + 0.02  # measured: 0.906 against 0.873
    assert np.linalg.norm(photo - view[0]) < 0.6  # dlib's same-person distance
    # faces the plain stage found have no detector view: their "view" is the plain embedding
    (view_photo,) = pipe.embed_views([files["photo"]], ["photo.png"], "query side")
    assert np.array_equal(view_photo, pipe.embed_set([files["photo"]], "query side"))
    assert pipe.image_views["query_side"] == {"photo.png": ["plain"]}


def test_views_are_embedded_with_the_runs_tta_less_its_blur_group(tmp_path):
    """A view is a reading aid already: the blur pass cost a third of the views' time and no score."""
    pipe = pipeline(tmp_path, "flip", "blur")
    assert [v.blur_px > 0 for v in pipe.views] == [False, False, True]
    assert len(pipe.view_tta) == 2 and all(v.blur_px == 0 for v in pipe.view_tta) and pipe.view_tta == pipe.views[:2]
    assert pipeline(tmp_path / "b", "flip").view_tta == pipeline(tmp_path / "c", "flip").views


def test_the_texture_view_matches_a_textured_face_to_its_photo_better_than_the_plain_view(files, tmp_path):
    pipe = pipeline(tmp_path, "--gallery-views", "texture", "--texture-eye-frac", "0.1")
    assert pipe.crops([files["textured"]], "gallery").n_fallback == 0
    photo = pipe.embed_set([files["photo"]], "query")[0]
    plain = pipe.embed_set([files["textured"]], "gallery")[0]
    (view,) = pipe.embed_views([files["textured"]], ["textured.png"], "gallery")
    assert cos(photo, view[0]) > cos(photo, plain) + 0.02
    assert pipe.image_views["gallery"] == {"textured.png": ["plain", "texture0.1"]}


def test_the_eye_distance_of_dlib_chips_is_the_measured_constant():
    """DLIB_EYE_FRAC (the texture radius's unit) is what dlib's chip geometry gives a real face."""
    import dlib

    img = astronaut()
    shape = dlib.shape_predictor(str(face_models_file(SHAPE_PREDICTOR_FILE)))(img, dlib.get_frontal_face_detector()(img, 1)[0])
    pts = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], float)
    p = CropParams(size_px=150, aligner="dlib")
    padding = (p.context_px * (1 + 2 * DLIB_PADDING) / p.size_px - 1) / 2
    rect = dlib.get_face_chip_details(shape, p.context_px, padding).rect
    chip_eye = np.linalg.norm(pts[0:2].mean(0) - pts[2:4].mean(0)) * p.context_px / rect.width()
    assert chip_eye == pytest.approx(eye_px("dlib", 150, 0), rel=0.05)
    assert eye_px("dlib", 150, 0) == pytest.approx(DLIB_EYE_FRAC * 150)
    with pytest.raises(KitError, match="aligner 'x'"):
        eye_px("x", 150, 0)


def test_fusion_rules_per_pair():
    q = np.eye(3, dtype=np.float32)
    plain = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 0.6, 0.8]], np.float32)
    view = np.array([[0, 1, 0], [0, 0, 1], [0, 0.8, 0.6]], np.float32)
    assert np.array_equal(fuse(q, [plain, view], "plain"), q @ plain.T)
    assert np.allclose(fuse(q, [plain, view], "max"), np.maximum(q @ plain.T, q @ view.T))
    z = [(s - s.mean(1, keepdims=True)) / (s.std(1, keepdims=True) + 1e-6) for s in (q @ plain.T, q @ view.T)]
    assert np.allclose(fuse(q, [plain, view], "zmax"), np.maximum(*z), atol=1e-5)
    assert np.allclose(fuse(q, [plain, view], "mean"), (z[0] + z[1]) / 2, atol=1e-5)
    assert np.allclose(fuse(q, [plain, view], "softmax"), np.log(np.exp(z[0]) + np.exp(z[1])), atol=1e-4)
    with pytest.raises(KitError, match="--view-fusion 'median'"):
        fuse(q, [plain, view], "median")


def test_validation_chooses_the_rule_only_where_it_can_tell():
    ties = {r: {"score": 1000.0, "map_all": 0.5 + 0.01 * i} for i, r in enumerate((*FUSION_RULES, "plain"))}
    rule, how, metrics = choose_rule(lambda r: ties[r], "auto")
    assert rule == FUSION_RULES[0] and how.startswith("default") and set(metrics) == set(ties)
    better = dict(ties, softmax={"score": 1000.0, "map_all": 0.9}, zmax={"score": 990.0, "map_all": 0.99})
    assert choose_rule(lambda r: better[r], "auto")[:2] == ("softmax", "validation")
    assert choose_rule(lambda r: better[r], "max") == ("max", "--view-fusion", {"max": better["max"]})


def test_meta_json_records_each_images_views_and_the_rule_and_plain_caches_are_kept(rehearsal_data, tmp_path):
    runs = tmp_path / "runs"
    base = ["--data", str(rehearsal_data), "--runs", str(runs), "--embedder", "dlib", "--detector", "cascade",
            "--detector-stages", "mtcnn", "--detect-px", "64", "--workers", "0", "--tta", "--gallery-norm", "none"]
    assert infer_facenet.main([*base, "--gallery-views", "--run-name", "plain"]) == 0
    plain_meta = load_run(runs / "plain").meta
    assert plain_meta["view_fusion"]["rule"] == "plain" and "gallery_views" not in plain_meta
    cache = set((runs / "face_cache").iterdir())
    assert infer_facenet.main([*base, "--view-fusion", "max", "--texture-eye-frac", "0.1", "0.2"]) == 0
    run = load_run(runs / "dlib")
    meta = run.meta
    assert meta["view_fusion"]["rule"] == "max" and meta["view_fusion"]["chosen_by"] == "--view-fusion"
    assert meta["gallery_views"]["names"] == ["plain", "detector", "texture0.1", "texture0.2"]
    per_image = meta["gallery_views"]["per_image"]
    for split in ("val", "test"):  # generated shapes: no face, so no detector view; every texture view
        m = run.splits[split]
        assert list(per_image[f"{split}_gallery"]) == m.gallery_names
        assert all(v == ["plain", "texture0.1", "texture0.2"] for v in per_image[f"{split}_gallery"].values())
        assert np.all(m.sim >= load_run(runs / "plain").splits[split].sim - 1e-5)  # the closest view: never below the plain one
    # the plain crops and embeddings came from the cache; only the views' embeddings are new (3 views x 2 galleries)
    new = set((runs / "face_cache").iterdir()) - cache
    assert cache <= set((runs / "face_cache").iterdir()) and len(new) == 6 and all(p.name.startswith("emb_") for p in new)
    with pytest.raises(SystemExit):
        infer_facenet.main([*base, "--view-fusion", "median"])
    assert json.loads((runs / "plain" / "meta.json").read_text())["config"]["gallery_views"] == []


def test_the_gallery_norm_discounts_a_gallery_image_close_to_every_query():
    """A hub (nobody's image, second closest to every query) outranks each query's second right image;
    dual-softmax puts both right images first for every query; 'none' leaves the matrix as it is."""
    rng = np.random.default_rng(0)
    n_q, n_people = 30, 10
    person = np.arange(n_q) % n_people
    sim = rng.uniform(0.0, 0.4, (n_q, 2 * n_people + 1)).astype(np.float32)
    sim[np.arange(n_q), person] = 1.0
    sim[np.arange(n_q), person + n_people] = 0.8
    sim[:, -1] = 0.9  # the hub
    before = np.argsort(-sim, axis=1)[:, :2]
    assert np.all(before[:, 1] == 2 * n_people)  # the hub is every query's second
    out, record = gallery_normalised({"val": sim, "test": sim}, "dual_softmax")
    top2 = np.sort(np.argsort(-out["test"], axis=1)[:, :2], axis=1)
    assert np.array_equal(top2, np.stack([person, person + n_people], axis=1)) and record == {"norm": "dual_softmax", "temperature": 1.0}
    same, record = gallery_normalised({"test": sim}, "none")
    assert same["test"] is sim and record == {"norm": "none"}
    with pytest.raises(KitError, match="--gallery-norm 'median'"):
        gallery_normalised({"test": sim}, "median")


def test_a_face_run_normalises_its_matrices_and_records_it_but_not_in_the_top_k_form(rehearsal_data, tmp_path, caplog):
    runs = tmp_path / "runs"
    base = ["--data", str(rehearsal_data), "--runs", str(runs), "--embedder", "dlib", "--detector", "cascade",
            "--detector-stages", "mtcnn", "--detect-px", "64", "--workers", "0", "--tta", "--gallery-views"]
    assert infer_facenet.main([*base, "--gallery-norm", "none", "--run-name", "raw"]) == 0
    assert infer_facenet.main([*base, "--run-name", "dual"]) == 0  # the default: dual_softmax
    raw, dual = load_run(runs / "raw"), load_run(runs / "dual")
    assert raw.meta["gallery_norm"] == {"norm": "none"} and dual.meta["gallery_norm"]["norm"] == "dual_softmax"
    expected, _ = gallery_normalised({s: raw.splits[s].sim for s in ("val", "test")}, "dual_softmax")
    for split in ("val", "test"):
        assert np.allclose(dual.splits[split].sim, expected[split], atol=1e-5)
        assert not np.allclose(dual.splits[split].sim, raw.splits[split].sim)
    assert dual.meta["embeddings"] and dual.meta["embeddings"] == raw.meta["embeddings"]  # kept for visualize.py --gap, as without the norm
    with caplog.at_level(logging.WARNING):
        assert infer_facenet.main([*base, "--matrix-limit", "10", "--run-name", "topk"]) == 0
    assert json.loads((runs / "topk" / "meta.json").read_text())["gallery_norm"] == {"norm": "none"}
    assert "--gallery-norm dual_softmax works on full matrices" in caplog.text


def face_free(d: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        img = cv2.GaussianBlur(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8), (0, 0), 3)
        paths.append(d / f"noise{i}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


def test_the_early_warning_fires_after_the_first_images_of_a_face_free_set(tmp_path, files, caplog):
    paths = face_free(tmp_path, 6)
    cascade = FaceCascade(CascadeParams(stages=("mtcnn",), stage_rotations=()), CPU, warn_share=0.5, warn_after=4)
    with caplog.at_level(logging.WARNING, logger="utils.faces.cascade"):
        faces = cascade.detect(paths, workers=0, desc="gallery")
    assert not faces.found.any()
    warnings = [r.getMessage() for r in caplog.records if "is this a face data set" in r.getMessage()]
    assert warnings == ["gallery: a face in only 0 of the first 4 images (below 50 %): is this a face data set? "
                        "A face run on images without faces falls back to the centre square for each and takes minutes"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="utils.faces.cascade"):  # faces: no warning; 0 turns it off
        FaceCascade(CascadeParams(stages=("mtcnn",), stage_rotations=()), CPU, warn_share=0.5, warn_after=2).detect(
            [files["photo"], files["photo"], *paths[:1]], workers=0)
        FaceCascade(CascadeParams(stages=("mtcnn",), stage_rotations=()), CPU, warn_share=0.0).detect(paths[:2], workers=0)
    assert not [r for r in caplog.records if "is this a face data set" in r.getMessage()]
