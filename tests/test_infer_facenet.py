"""infer_facenet.py and its face modules: detection on a real face, the no-face
fallback, TTA on both sides, weights files, errors, and main() end to end."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import infer_facenet
from utils.embedding.embed import embed_arrays
from utils.embedding.views import View, tta_views
from utils.errors import KitError
from utils.faces import pipeline as face_pipeline
from utils.faces.crop import CropParams, face_crops, square_affine
from utils.faces.detect import DetectorParams, FaceDetector
from utils.faces.embedder import FaceNetEmbedder, build_embedder
from utils.faces.pipeline import colour_view
from utils.runs.similarity_io import load_run
from utils.seed import seed_everything

CPU = torch.device("cpu")
# the astronaut's face in skimage's 512x512 astronaut.png (by eye: forehead to chin, ear to ear)
FACE_CENTER_XY = (222, 118)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """A real face photo (skimage's astronaut) and two images without a face."""
    from skimage import data

    d = tmp_path_factory.mktemp("faces")
    paths = {"astronaut": d / "astronaut.png", "blank": d / "blank.png", "gradient": d / "gradient.png"}
    Image.fromarray(data.astronaut()).save(paths["astronaut"])
    Image.new("RGB", (120, 90), (0, 0, 0)).save(paths["blank"])
    x = np.linspace(0, 255, 150, dtype=np.float32)
    grad = np.stack([np.tile(x, (100, 1)), np.tile(x[::-1], (100, 1)), np.full((100, 150), 90.0)], axis=2)
    Image.fromarray(grad.astype(np.uint8)).save(paths["gradient"])
    return paths


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector(DetectorParams(), CPU)


def test_detects_the_astronaut_face_in_the_right_place(images, detector):
    faces = detector.detect([images["astronaut"], images["blank"]], workers=0)
    assert faces.found.tolist() == [True, False]
    x0, y0, x1, y1 = faces.boxes[0]
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    assert abs(cx - FACE_CENTER_XY[0]) < 15 and abs(cy - FACE_CENTER_XY[1]) < 20
    assert 60 < x1 - x0 < 130 and 80 < y1 - y0 < 150  # a face, not the whole 512 px image
    eyes, nose = faces.landmarks[0][:2], faces.landmarks[0][2]
    assert eyes[0, 0] < nose[0] < eyes[1, 0] and eyes[:, 1].max() < nose[1]  # left eye, right eye, nose below
    assert faces.probs[0] > 0.9


def test_eye_alignment_levels_the_eyes(images, detector):
    img = np.asarray(Image.open(images["astronaut"]).convert("RGB"))
    tilted = cv2.warpAffine(img, cv2.getRotationMatrix2D((256, 256), 15, 1.0), (512, 512))  # head rolled 15 degrees
    path = images["astronaut"].with_name("tilted.png")
    Image.fromarray(tilted).save(path)
    faces = detector.detect([path], workers=0)
    lm, box = faces.landmarks[0], faces.boxes[0]
    params = CropParams()
    side = max(box[2] - box[0], box[3] - box[1]) * params.size_px / (params.size_px - params.margin_px) * params.context_px / params.size_px
    angle = np.degrees(np.arctan2(lm[1, 1] - lm[0, 1], lm[1, 0] - lm[0, 0]))
    assert abs(abs(angle) - 15) < 5  # the eyes are tilted in the image ...
    m = square_affine(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), side, angle, params.context_px)
    eyes = np.c_[lm[:2], np.ones(2)] @ m.T
    assert abs(eyes[0, 1] - eyes[1, 1]) < 1.0  # ... and level in the crop


@pytest.mark.slow
def test_no_face_falls_back_to_the_centre_square_counted_and_normalised_like_faces(images, detector, tmp_path):
    params = CropParams()  # FaceNet geometry: 160 px seen, 200 px stored
    paths = [images["astronaut"], images["blank"], images["gradient"]]
    crops = face_crops(paths, detector, params, workers=0, cache_dir=tmp_path)
    assert crops.fallback.tolist() == [False, True, True] and crops.n_fallback == 2
    assert np.isnan(crops.boxes[2]).all() and crops.pixels.shape == (3, 200, 200, 3)
    # the fallback is the centre square (side = shorter side) resized to what the embedder sees
    grad = np.asarray(Image.open(images["gradient"]).convert("RGB"))
    centre = cv2.resize(grad[:, 25:125], (160, 160), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    seen = crops.pixels[2, 20:180, 20:180].astype(np.float32)
    assert np.abs(seen - centre).mean() < 2.0
    # --face-fallback letterbox: the whole 150 x 100 image, its longer side across the 160 px view
    boxed = face_crops(paths[2:], detector, CropParams(fallback="letterbox"), workers=0, cache_dir=tmp_path / "letterbox")
    whole = cv2.resize(grad, (160, 107), interpolation=cv2.INTER_AREA).astype(np.float32)
    seen = boxed.pixels[0, 20:180, 20:180].astype(np.float32)
    assert np.abs(seen[27:133] - whole[:106]).mean() < 3.0 and boxed.fallback.tolist() == [True]
    with pytest.raises(KitError, match="--face-fallback 'edge'"):
        CropParams(fallback="edge").check()
    # faces and fallbacks reach the network through the same normalisation
    seed_everything(0)
    emb = FaceNetEmbedder("none", CPU)
    inputs = []
    emb.model.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].clone()))
    embed_arrays(emb, crops.pixels, [View()], device=CPU, out_px=emb.input_px, batch_size=8)
    x = inputs[0]
    assert x.shape == (3, 3, 160, 160)
    expected = (torch.from_numpy(crops.pixels[:, 20:180, 20:180]).permute(0, 3, 1, 2).float() - 127.5) / 128.0
    assert torch.allclose(x, expected, atol=1e-5)  # face row and fallback rows alike
    assert x[2].min() >= -1.0 and x[2].max() <= 1.0 and x[2].std() > 0.2  # on the face crops' scale, not raw 0..255
    # the cache gives the same crops back without detecting again
    again = face_crops(paths, detector, params, workers=0, cache_dir=tmp_path)
    assert np.array_equal(again.pixels, crops.pixels) and len(list(tmp_path.glob("crops_*.npz"))) == 1


def test_tta_views_change_the_input_and_identity_is_an_exact_centre_crop():
    crops = torch.rand(2, 3, 200, 200) * 255
    ident = tta_views([])
    assert ident == [View()]
    views = tta_views(["scale", "flip", "rot", "brightness"])
    assert len(views) == 8 and views == tta_views(["flip", "rot", "brightness", "scale"])
    from utils.embedding.views import render_view

    assert torch.equal(render_view(crops, View(), 160), crops[:, :, 20:180, 20:180])
    flipped = render_view(crops, View(flip=True), 160)
    assert torch.equal(flipped, crops[:, :, 20:180, 20:180].flip(3))
    for v in views[2:]:
        assert not torch.allclose(render_view(crops, v, 160), crops[:, :, 20:180, 20:180], atol=1.0)
    with pytest.raises(KitError, match="--tta 'jitter'"):
        tta_views(["jitter"])


def test_facenet_weights_from_a_local_file(tmp_path):
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(123)
    ref = InceptionResnetV1().eval()
    state = ref.state_dict()
    state["logits.weight"] = torch.zeros(7, 512)  # release files carry the VGGFace2 classifier: ignored
    state["logits.bias"] = torch.zeros(7)
    path = tmp_path / "facenet.pt"
    torch.save(state, path)
    torch.manual_seed(999)
    loaded = FaceNetEmbedder(str(path), CPU).model.state_dict()
    assert loaded.keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded[k], v), k


@pytest.mark.parametrize("kind", ["missing", "not_torch", "other_model"])
def test_bad_facenet_weights_file_is_one_clear_line(tmp_path, kind):
    path = tmp_path / "weights.pt"
    if kind == "not_torch":
        path.write_text("this is not a checkpoint\n")
    elif kind == "other_model":
        torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(KitError) as err:
        build_embedder("facenet", str(path), CPU)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg


def test_bad_dlib_files_are_one_clear_line(tmp_path):
    bad = tmp_path / "model.dat"
    bad.write_text("garbage")
    for weights in (str(bad), str(tmp_path / "absent.dat")):
        with pytest.raises(KitError) as err:
            build_embedder("dlib", weights, CPU)
        assert weights in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(KitError, match="--weights none"):
        build_embedder("dlib", "none", CPU)
    from utils.faces.crop import load_shape_predictor

    with pytest.raises(KitError, match="not a dlib shape predictor"):
        load_shape_predictor(bad)


def test_main_rejects_hub_weights_offline_in_one_line(rehearsal_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(KitError, match="--weights PATH") as err:
        infer_facenet.main(["--data", str(rehearsal_data), "--runs", str(tmp_path / "runs"), "--workers", "0"])
    assert "\n" not in str(err.value)


SMALL = ["--detector", "mtcnn", "--detect-px", "64", "--workers", "0", "--embed-batch-size", "32"]


@pytest.mark.slow
def test_main_end_to_end_on_rehearsal_data_writes_a_valid_run(rehearsal_data, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    argv = ["--data", str(rehearsal_data), "--runs", str(runs), "--embedder", "facenet", "--weights", "none", *SMALL, "--tta"]
    assert infer_facenet.main(argv) == 0
    run = load_run(runs / "facenet")
    meta = run.meta
    assert meta["model"] == "facenet" and meta["config"]["tta"] == [] and meta["tta_views"] == 1
    for which, counts in meta["faces"].items():  # generated shapes, no faces: every image falls back, counted
        assert counts["images"] > 0 and counts["fallback"] == counts["images"] and counts["faces_found"] == 0, which
    for split in ("val", "test"):
        m = run.splits[split]
        assert m.sim.shape == (len(m.query_names), len(m.gallery_names)) and np.isfinite(m.sim).all()
        assert "score" in meta["metrics"][split]
    assert json.loads((runs / "split.json").read_text())["val_query"]
    # a second run reads crops and embeddings from the cache (no detection, no colour view, no embedding) and writes the same matrices
    before = np.load(runs / "facenet" / "test_sim.npy")

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    with monkeypatch.context() as m:
        m.setattr(FaceDetector, "detect", must_not_run)
        m.setattr(face_pipeline, "embed_arrays", must_not_run)
        m.setattr(face_pipeline, "colour_view", must_not_run)  # grey crops are made only for the embedder
        assert infer_facenet.main(argv) == 0
    assert np.array_equal(np.load(runs / "facenet" / "test_sim.npy"), before)
    # the cache is shared across run folders: another run name with the same settings detects nothing again
    cached = sorted(p.name for p in (runs / "face_cache").iterdir())
    assert infer_facenet.main([*argv, "--run-name", "facenet_again"]) == 0
    assert sorted(p.name for p in (runs / "face_cache").iterdir()) == cached
    assert np.array_equal(np.load(runs / "facenet_again" / "test_sim.npy"), before)


@pytest.mark.slow
def test_main_applies_tta_to_query_and_gallery_alike(rehearsal_data, tmp_path):
    runs = tmp_path / "runs"
    assert infer_facenet.main(["--data", str(rehearsal_data), "--runs", str(runs), "--embedder", "dlib", *SMALL, "--tta", "flip", "--gallery-views", "--gallery-norm", "none"]) == 0
    test = load_run(runs / "dlib").splits["test"]  # plain gallery views only: the matrix is the cosine of the embeddings
    # the matrix is TTA(query) . TTA(gallery): skipping TTA on either side gives another matrix
    emb = build_embedder("dlib", "default", CPU)
    params = CropParams(size_px=150, aligner="dlib")
    det = FaceDetector(DetectorParams(canvas_px=64), CPU)
    colour = [
        face_crops([rehearsal_data / "test" / side / n for n in names], det, params, workers=0, cache_dir=runs / "dlib" / "cache").pixels
        for side, names in (("query", test.query_names), ("gallery", test.gallery_names))
    ]
    crops = [colour_view(c, "grey") for c in colour]  # the default --face-colour, on both sides
    q_tta, g_tta = (embed_arrays(emb, c, tta_views(["flip"]), device=CPU, out_px=emb.input_px) for c in crops)
    q_id, g_id = (embed_arrays(emb, c, tta_views([]), device=CPU, out_px=emb.input_px) for c in crops)
    assert np.allclose(test.sim, q_tta @ g_tta.T, atol=1e-5)
    assert np.abs(test.sim - q_id @ g_tta.T).max() > 1e-3  # what a query side without TTA gives
    assert np.abs(test.sim - q_tta @ g_id.T).max() > 1e-3  # what a gallery side without TTA gives
    q_rgb, g_rgb = (embed_arrays(emb, c, tta_views(["flip"]), device=CPU, out_px=emb.input_px) for c in colour)
    assert np.abs(test.sim - q_rgb @ g_rgb.T).max() > 1e-3  # what colour crops give (--face-colour rgb)


def test_face_colour_views(images, detector):
    photo = np.asarray(Image.open(images["astronaut"]).convert("RGB"))
    grey = colour_view(photo[None], "grey")[0]
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert np.abs(grey[..., 0].astype(int) - cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)).max() == 0
    assert np.array_equal(colour_view(photo[None], "rgb")[0], photo)
    # hue: a jet colour map reads back in the order of the grey values it stands for; grey stays grey
    ramp = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    jet = cv2.cvtColor(cv2.applyColorMap(ramp, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    back = colour_view(jet[None], "hue")[0][0, :, 0].astype(int)
    assert np.diff(back).min() >= -2 and back[-1] - back[0] > 150  # non-decreasing up to rounding, full range
    assert np.array_equal(colour_view(grey[None], "hue")[0], grey)
    with pytest.raises(KitError, match="--face-colour 'sepia'"):
        colour_view(photo[None], "sepia")
    # grey crops: a colour cast (warm varnish) moves the dlib embedding less than in colour
    tinted = (photo * np.array([1.15, 0.95, 0.75])).clip(0, 255).astype(np.uint8)
    faces = face_crops([images["astronaut"]], detector, CropParams(size_px=150, aligner="dlib"), workers=0).pixels
    d = images["astronaut"].parent / "tinted.png"
    Image.fromarray(tinted).save(d)
    pair = np.concatenate([faces, face_crops([d], detector, CropParams(size_px=150, aligner="dlib"), workers=0).pixels])
    emb = build_embedder("dlib", "default", CPU)
    cos = {m: float(np.prod(embed_arrays(emb, colour_view(pair, m), tta_views([]), device=CPU, out_px=150), axis=0).sum())
           for m in ("rgb", "grey")}
    assert cos["grey"] > cos["rgb"], cos
