"""infer_cnn_features.py and its parts: the all-faces box on real ORL faces, RMSE/SSIM of the
top-K on real image files, and the script end to end on generated data up to a real server."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import ensemble
import infer_cnn_features as script
import submit
from tests.helpers.paths import shared_data
from tests.helpers.serving import competition_server
from utils.embedding.stage_features import POOLS, StageFeatures
from utils.errors import KitError
from utils.faces.detect import DetectorParams, FaceDetector
from utils.faces.face_box import face_box_crops, union_box, widen
from utils.runs.pixel_agreement import grey_squares, topk_agreement
from utils.runs.similarity_io import load_run


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


def test_face_crop_gates_refuse_a_face_free_photo(tmp_path):
    """A real PACS guitar photo: MTCNN alone finds a small "face" in it, which --face-crop used to crop; the face
    cascade's gates (box side, MTCNN probability) refuse it, so it stays whole, while a real ORL face keeps its crop."""
    guitar = shared_data("pacs_mini") / "photo" / "guitar" / "n03272010_6737.jpg"
    face = shared_data("orl_faces") / "s1" / "1.pgm"
    paths = [tmp_path / "guitar.jpg", tmp_path / "face.png"]
    shutil.copyfile(guitar, paths[0])
    Image.open(face).convert("RGB").save(paths[1])
    cpu = torch.device("cpu")
    det = FaceDetector(DetectorParams(), cpu)
    ungated = face_box_crops(paths, det, "all", 0.2, tmp_path / "ungated")
    assert ungated.n_faces[0] >= 1 and ungated.paths[0] != paths[0]  # the crop taken before the gates
    cfg = script.Config(runs=tmp_path / "runs", face_crop="all", workers=0)
    out, counts = script.gated_face_crops(cfg, paths, det, cpu, "test")
    assert out[0] == paths[0] and out[1] != paths[1]
    assert counts == {"images": 2, "faces_found": 1, "whole_image": 1, "refused_by_gates": 1, "faces_total": 1}
    # the gates decide, not the detector: with both set to 0 the guitar is cropped again
    loose, counts = script.gated_face_crops(replace(cfg, min_face_frac=0.0, min_face_prob=0.0), paths, det, cpu, "test")
    assert loose[0] != paths[0] and counts["refused_by_gates"] == 0


def test_euclidean_metric_is_minus_the_distance():
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    emb = {k: unit(rng.normal(size=(n, 8))).astype(np.float32) for k, n in
           (("val_query", 3), ("val_gallery", 5), ("test_query", 4), ("test_gallery", 6))}
    cos, euc = script.similarity(emb, "cosine"), script.similarity(emb, "euclidean")
    for split, q, g in (("val", "val_query", "val_gallery"), ("test", "test_query", "test_gallery")):
        dist = np.linalg.norm(emb[q][:, None] - emb[g][None], axis=2)
        assert euc[split].dtype == np.float32 and np.allclose(euc[split], -dist, atol=1e-5)  # higher = more similar
        assert np.array_equal(np.argsort(-euc[split], axis=1), np.argsort(-cos[split], axis=1))
    with pytest.raises(KitError, match="--metric 'manhattan'"):
        script.similarity(emb, "manhattan")


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


# ----------------------------------------------------------------------------
# the script, end to end on generated data, into ensemble.py and submit.py

TINY = ["--model", "test_resnet", "--weights", "none", "--img-size", "32", "--workers", "0", "--pixel-px", "32"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread, no thrash


def test_script_end_to_end_then_ensemble_and_submit(rehearsal_data_session, tmp_path):
    data, runs = str(rehearsal_data_session), tmp_path / "runs"
    common = ["--data", data, "--runs", str(runs), *TINY]
    assert script.main([*common, "--stage", "2", "--pool", "gem", "--face-crop", "all"]) == 0
    run = load_run(runs / "cnn_features")
    meta = run.meta
    # generated shapes hold no faces: every image is embedded whole, and counted
    assert all(f["faces_found"] == 0 and f["whole_image"] == f["images"] for f in meta["faces"].values())
    assert meta["faces"]["test_query"]["images"] == len(run.splits["test"].query_names)
    assert meta["stage_index"] == 2 and meta["feature_dim"] > 0
    for split in ("val", "test"):  # RMSE and SSIM recorded for both splits
        pa = meta["pixel_agreement"][split]
        assert pa["k"] == 5 and 0.0 < pa["rmse"] < 1.0 and -1.0 <= pa["ssim"] <= 1.0
    first = np.load(runs / "cnn_features" / "test_sim.npy")
    # same command again (the embedding cache emptied): the same matrix
    shutil.rmtree(runs / "cnn_features" / "cache")
    assert script.main([*common, "--stage", "2", "--pool", "gem", "--face-crop", "all"]) == 0
    assert np.array_equal(first, np.load(runs / "cnn_features" / "test_sim.npy"))
    # another stage and pooling is another feature
    assert script.main([*common, "--stage", "-1", "--pool", "flatten", "--run-name", "flat", "--pixel-k", "0"]) == 0
    flat = load_run(runs / "flat")
    assert flat.meta["feature_dim"] > meta["feature_dim"] and "pixel_agreement" not in flat.meta

    assert ensemble.main(["--runs", str(runs), "--data", data, "--bootstrap", "10"]) == 0
    fused = load_run(runs / "ensemble")
    with competition_server(rehearsal_data_session) as url:
        assert submit.main(["--run", str(runs / "ensemble"), "--url", url, "--group", "cnn",
                            "--out", str(tmp_path / "subs"), "--data", data]) == 0
    reply = json.loads(next((tmp_path / "subs").glob("*.response.json")).read_text())
    assert np.isclose(reply["accuracy"], fused.meta["metrics"]["test"]["score"])


def test_bad_flags_are_one_clear_error(rehearsal_data_session, tmp_path):
    common = ["--data", str(rehearsal_data_session), "--runs", str(tmp_path / "runs"), *TINY]
    with pytest.raises(KitError, match="--stage 9"):
        script.main([*common, "--stage", "9"])
    with pytest.raises(KitError, match="not a timm model"):
        script.main([*common, "--model", "resnet_9000"])
    with pytest.raises(KitError, match="weights file not found"):
        script.main([*common, "--weights", str(tmp_path / "missing.pt")])
    with pytest.raises(SystemExit):
        script.main([*common, "--pool", "median"])


@pytest.mark.parametrize("margin", ["nan", "inf", "-0.1"])
def test_a_face_margin_no_box_can_take_stops_before_any_work(margin, rehearsal_data_session, tmp_path):
    """--face-margin nan passed the '< 0' check (NaN compares false), and the check ran only once the crops were
    made, after the detector had loaded; now any margin that is not a finite number >= 0 stops in check_config."""
    runs = tmp_path / "runs"
    with pytest.raises(KitError, match=rf"--face-margin {margin}: (a finite number, 0 or more|must be a finite number)$"):
        script.main(["--data", str(rehearsal_data_session), "--runs", str(runs), *TINY, "--face-crop", "all",
                     "--face-margin", margin])
    assert not runs.exists()


def test_stage_features_match_timm_features_only_and_pool_by_hand():
    torch.manual_seed(0)
    full = timm.create_model("test_resnet", pretrained=False, num_classes=0).eval()
    ref = timm.create_model("test_resnet", pretrained=False, features_only=True, out_indices=(2,)).eval()
    ref.load_state_dict({k: v for k, v in full.state_dict().items() if k in ref.state_dict()})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fmap = ref(x)[0]
        feats = {pool: StageFeatures(copy.deepcopy(full), stage=2, pool=pool)(x) for pool in POOLS}
    assert torch.allclose(feats["avg"], fmap.mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(feats["max"], fmap.flatten(2).max(dim=2).values, atol=1e-5)
    gem = (fmap.clamp(min=1e-6) ** 3).mean(dim=(2, 3)) ** (1 / 3)
    assert torch.allclose(feats["gem"], gem, atol=1e-5)
    assert torch.allclose(feats["flatten"], fmap.reshape(2, -1), atol=1e-5)
    with pytest.raises(KitError, match="--stage 7"):
        StageFeatures(copy.deepcopy(full), stage=7)
