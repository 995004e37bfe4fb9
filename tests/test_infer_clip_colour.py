"""infer_clip_colour.py and its colour term: descriptors and distances on real image files,
checked against OpenCV's own histogram comparison; the term's search on a handmade case; the script
end to end on generated data up to a real server, with open_clip and (if installed) transformers CLIP."""

from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import ensemble
import infer_clip_colour as script
import submit
from tests.helpers.serving import competition_server
from tests.helpers.tiny_models import TINY_VIT
from utils.clip.colour_term import apply_colour_term, search_colour_term, search_with_checks, threshold_grid
from utils.data.colour import DESCRIPTORS, DISTANCES, colour_descriptors, colour_distances, emd
from utils.data.object_crop import object_box
from utils.deps import has_transformers
from utils.errors import KitError
from utils.runs.metrics import mean_cosine_by_relevance
from utils.runs.similarity_io import load_run


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


def test_dominant_colours_are_deterministic(colour_files):
    first = colour_descriptors(colour_files, "dominant").hist
    assert np.array_equal(first, colour_descriptors(colour_files, "dominant").hist)  # k-means is seeded


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


def test_object_box_on_a_plain_background():
    img = Image.new("RGB", (100, 80), (255, 255, 255))
    img.paste(Image.new("RGB", (20, 30), (200, 0, 0)), (40, 20))
    assert object_box(img, margin=0.0) == (40, 20, 60, 50)
    assert object_box(Image.new("RGB", (50, 50), (255, 255, 255))) is None  # nothing there: kept whole
    noise = np.random.default_rng(0).integers(0, 256, (50, 50, 3), dtype=np.uint8)
    assert object_box(Image.fromarray(noise)) is None  # no plain background: kept whole


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


def test_colour_search_warns_on_saturated_validation(caplog):
    """Cosine alone already ranks every right answer first: every option scores 1000 and the data cannot choose."""
    cosine = np.array([[0.9, 0.2, 0.1], [0.1, 0.9, 0.3]], dtype=np.float32)
    dist = np.array([[0.1, 0.5, 0.9], [0.8, 0.2, 0.4]], dtype=np.float32)
    rel = np.eye(2, 3, dtype=bool)
    with caplog.at_level(logging.WARNING, logger="utils.clip.colour_term"):
        best, table, warnings = search_with_checks(cosine, dist, rel, [0.0, 0.05, 0.1], [0.3, 1.0])
    assert all(c.val_score == 1000.0 for c in table) and best.alpha == 0.0
    assert len(warnings) == 1 and "validation cannot separate" in warnings[0]
    assert f"{len(table)} of {len(table)}" in warnings[0]
    assert warnings[0] in caplog.text
    # a validation that does separate the options (alpha 0.05 inside the grid, the largest threshold) says nothing
    cosine = np.array([[0.32, 0.84, 0.31, 0.67, 0.30], [0.83, 0.78, 0.81, 0.51, 0.43], [0.43, 0.70, 0.75, 0.79, 0.76]], np.float32)
    dist = np.array([[0.52, 0.37, 0.68, 0.68, 0.86], [0.85, 0.13, 0.44, 0.52, 0.46], [0.48, 0.92, 0.25, 0.79, 0.17]], np.float32)
    rel = np.array([[1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]], bool)
    chosen, table, quiet = search_with_checks(cosine, dist, rel, [0.0, 0.05, 0.1, 0.2, 0.4], [0.3, 0.6, 1.0])
    assert (chosen.alpha, chosen.val_score) == (0.05, 1000.0) and quiet == []
    assert sorted({c.alpha for c in table}) == [0.0, 0.05, 0.1, 0.2, 0.4]  # not widened


def test_colour_search_widens_its_grid_once_then_warns_at_the_edge(caplog):
    # threshold 0.9 (quantile 1.0): query 0 needs alpha > 0.034, query 1 alpha > 0.09; 0.04 (the grid's edge)
    # fixes query 0 only; the widened grid (0.08, 0.16) fixes both with its largest value, again its edge
    cosine = np.array([[0.80, 0.70, 0.83], [0.60, 0.70, 0.77]], dtype=np.float32)
    dist = np.array([[0.1, 0.9, 0.9], [0.9, 0.2, 0.9]], dtype=np.float32)
    rel = np.eye(2, 3, dtype=bool)
    before, first, _ = search_with_checks(cosine, dist, rel, [0.0, 0.02, 0.04], [1.0])
    alphas = sorted({c.alpha for c in first})
    assert alphas == [0.0, 0.02, 0.04, 0.08, 0.16]
    assert before.alpha == 0.16 and before.val_score == 1000.0
    with caplog.at_level(logging.WARNING, logger="utils.clip.colour_term"):
        _, _, warnings = search_with_checks(cosine, dist, rel, [0.0, 0.02, 0.04], [1.0])
    assert any("edge of its grid" in w for w in warnings) and "edge of its grid" in caplog.text
    # inside the grid: no widening, no edge warning
    inside, table, warnings = search_with_checks(cosine, dist, rel, [0.0, 0.2, 0.4], [1.0])
    assert inside.alpha == 0.2 and sorted({c.alpha for c in table}) == [0.0, 0.2, 0.4]
    assert not any("edge" in w for w in warnings)


def test_mean_cosine_of_correct_and_incorrect_pairs():
    sim = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.4]], dtype=np.float32)
    rel = np.eye(2, 3, dtype=bool)
    gap = mean_cosine_by_relevance(sim, rel)
    assert np.isclose(gap["correct"], 0.85) and np.isclose(gap["incorrect"], (0.1 + 0.3 + 0.2 + 0.4) / 4)
    assert np.isclose(gap["gap"], 0.85 - 0.25)


# ----------------------------------------------------------------------------
# the script, end to end on generated data, into ensemble.py and submit.py


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread, no thrash


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("clip_cfg") / "tiny-vit.json"
    path.write_text(json.dumps(TINY_VIT))
    return str(path)


def test_script_end_to_end_then_ensemble_and_submit(rehearsal_data_session, tmp_path, tiny_vit):
    data, runs = str(rehearsal_data_session), tmp_path / "runs"
    common = ["--data", data, "--runs", str(runs), "--model", tiny_vit, "--weights", "none", "--workers", "0"]
    # cosine alone (alpha fixed at 0) is the zero-shot baseline
    assert script.main([*common, "--alphas", "0", "--run-name", "cosine"]) == 0
    cosine = load_run(runs / "cosine")
    assert cosine.meta["colour_term"]["alpha"] == 0.0
    assert script.main([*common, "--colour", "lab", "--distance", "chi2", "--colour-top-m", "5"]) == 0
    run = load_run(runs / "clip_colour")
    term = run.meta["colour_term"]
    assert term["alpha"] > 0 and term["threshold"] > 0 and len(term["grid"]) > 1
    # the bonus lies in [0, alpha], only on each query's 5 best by cosine, and never lowers validation
    for split in ("val", "test"):
        bonus = run.splits[split].sim - cosine.splits[split].sim
        assert bonus.min() >= -1e-6 and bonus.max() <= term["alpha"] + 1e-6
        assert ((bonus > 1e-6).sum(axis=1) <= 5).all()
    assert run.meta["metrics"]["val"]["score"] >= cosine.meta["metrics"]["val"]["score"]
    assert term["effect"]["val"]["score_cosine"] == cosine.meta["metrics"]["val"]["score"]
    assert isinstance(term["warnings"], list)
    for split in ("val", "test"):  # Tudo Bein's check, on the cosine before the colour term
        gap = run.meta["mean_cosine"][split]
        assert -1 <= gap["incorrect"] <= 1 and np.isclose(gap["gap"], gap["correct"] - gap["incorrect"])

    assert ensemble.main(["--runs", str(runs), "--models", "clip_colour", "--data", data, "--bootstrap", "10"]) == 0
    with competition_server(rehearsal_data_session) as url:
        assert submit.main(["--run", str(runs / "ensemble"), "--url", url, "--group", "colour",
                            "--out", str(tmp_path / "subs"), "--data", data]) == 0
    reply = json.loads(next((tmp_path / "subs").glob("*.response.json")).read_text())
    assert np.isclose(reply["accuracy"], run.meta["metrics"]["test"]["score"])  # one model passes through


def test_hugging_face_clip_from_a_local_folder(rehearsal_data_session, tmp_path):
    if not has_transformers:
        with pytest.raises(KitError, match="transformers"):
            script.main(["--data", str(rehearsal_data_session), "--runs", str(tmp_path / "runs"), "--model", "hf:any"])
        return
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = tmp_path / "tiny-hf-clip"
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    common = ["--data", str(rehearsal_data_session), "--runs", str(tmp_path / "runs"), "--workers", "0"]
    assert script.main([*common, "--model", f"hf:{folder}", "--colour", "dominant", "--distance", "emd", "--crop-object", "border"]) == 0
    run = load_run(tmp_path / "runs" / "clip_colour")
    assert run.meta["embedding_dim"] == 16 and run.meta["colour_term"]["distance"] == "emd"
    # flat illustration-style gallery images are cropped; textured photo queries mostly stay whole (counted)
    crops = run.meta["object_crop"]
    assert crops["test_gallery"]["whole_image"] == 0
    assert crops["test_query"]["whole_image"] > crops["test_query"]["images"] // 2
    with pytest.raises(KitError, match="cannot load a CLIP model"):
        script.main([*common, "--model", f"hf:{tmp_path / 'missing'}"])
