"""visualize.py --gap and --boxes on real face runs: the map of a face run and of its adapted run,
its title's mean cosines against numpy, and the detector's box drawn on a real face."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

import infer_facenet
import train_face_adapter
import visualize
from utils.data.split import identity_of
from utils.errors import KitError
from utils.faces.views import gallery_normalised
from utils.runs.gap import pair_means, project_2d
from utils.runs.similarity_io import load_run
from utils.runs.visual import BOX_RGB

MEANS = re.compile(r"(val|test): mean cosine right (-?\d\.\d{3}), wrong (-?\d\.\d{3})")


def title_means(png) -> dict[str, tuple[float, float]]:
    """The mean cosines written in the map's title (kept in the PNG's Title field)."""
    title = Image.open(png).text["Title"]
    return {m[0]: (float(m[1]), float(m[2])) for m in MEANS.findall(title)}


def numpy_means(run_dir, split: str, test_truth: dict[str, list[str]]) -> tuple[float, float]:
    """The full cosine matrix of the run's kept embeddings, split by the right pairs
    (val: the same identity; test: the ground truth)."""
    q, g = (np.load(run_dir / f"{split}_{side}_emb.npy").astype(np.float64) for side in ("query", "gallery"))
    run = load_run(run_dir)
    m = run.splits[split]
    # the kept embeddings are the ones the matrix came from (through the run's --gallery-norm)
    expected, _ = gallery_normalised({split: (q @ g.T).astype(np.float32)}, run.meta["gallery_norm"]["norm"])
    assert np.allclose(expected[split], m.sim, atol=1e-4)
    if split == "val":
        rel = np.array([[identity_of(a) == identity_of(b) for b in m.gallery_names] for a in m.query_names])
    else:
        rel = np.array([[b in test_truth[a] for b in m.gallery_names] for a in m.query_names])
    cos = q @ g.T
    return float(cos[rel].mean()), float(cos[~rel].mean())


def test_pair_means_are_the_means_over_the_full_matrix():
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(7, 5)), rng.normal(size=(11, 5))
    rel = rng.random((7, 11)) < 0.3
    right, wrong = pair_means(q, g, np.nonzero(rel))
    assert right == pytest.approx((q @ g.T)[rel].mean()) and wrong == pytest.approx((q @ g.T)[~rel].mean())
    assert np.array_equal(project_2d(q, "pca"), project_2d(q, "pca")) and project_2d(q, "pca").shape == (7, 2)
    with pytest.raises(KitError, match="--gap-method 'umap'"):
        project_2d(q, "umap")


def test_gap_map_of_a_face_run_and_of_its_adapted_run(rehearsal_data, tmp_path):
    runs = tmp_path / "runs"
    common = ["--data", str(rehearsal_data), "--runs", str(runs)]
    assert infer_facenet.main([*common, "--embedder", "dlib", "--detector", "none", "--workers", "0"]) == 0
    assert train_face_adapter.main([*common, "--source", "dlib", "--domain-stats", "center", "--epochs", "2", "--patience", "0"]) == 0
    gt = json.loads((rehearsal_data / "test" / "ground_truth.json").read_text())
    for name in ("dlib", "dlib_adapted"):
        run = runs / name
        assert visualize.main(["--run", str(run), "--gap"]) == 0
        png = run / "visual" / "gap_pca.png"
        assert Image.open(png).format == "PNG" and png.stat().st_size > 5000
        got = title_means(png)
        assert set(got) == {"val", "test"}
        for split in ("val", "test"):
            want = numpy_means(run, split, gt)
            assert got[split] == pytest.approx(want, abs=6e-4), (name, split)
            assert want[0] > want[1]  # the face embedder separates identities across the domains
    # --boxes on the adapted run: the face settings of its source (--detector none: every image a fallback)
    assert visualize.main(["--run", str(runs / "dlib_adapted"), "--boxes", "--split", "val", "--queries", "2", "--device", "cpu"]) == 0
    assert len(list((runs / "dlib_adapted" / "visual" / "boxes" / "val").glob("*.png"))) == 4
    assert (runs / "dlib_adapted" / "visual" / "boxes" / "val.html").read_text().count("no face (fallback crop)") == 4
    # t-SNE with a fixed random_state: the same command, the same PNG
    argv = ["--run", str(runs / "dlib"), "--gap", "--gap-method", "tsne", "--split", "val", "--out", str(tmp_path / "a")]
    assert visualize.main(argv) == 0
    assert visualize.main([*argv[:-1], str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "gap_tsne.png").read_bytes() == (tmp_path / "b" / "gap_tsne.png").read_bytes()
    # a kept embedding that changed since the run is refused in one line
    emb = runs / "dlib" / "val_query_emb.npy"
    np.save(emb, -np.load(emb))
    with pytest.raises(KitError, match="val_query_emb.npy: missing or does not match the sha256"):
        visualize.main(["--run", str(runs / "dlib"), "--gap"])


def test_gap_of_a_run_made_from_matrices_says_it_keeps_no_embeddings(rehearsal_data_session, tmp_path):
    from tests.helpers.runs import handmade_run

    run, _, _ = handmade_run(rehearsal_data_session, tmp_path / "runs")
    with pytest.raises(KitError, match="keeps no val embeddings"):
        visualize.main(["--run", str(run), "--gap"])


def test_boxes_are_drawn_around_the_detected_face_of_a_real_photo(rehearsal_data, tmp_path):
    from skimage import data as skdata

    photo = skdata.astronaut()
    assert not (photo == np.array(BOX_RGB, np.uint8)).all(axis=2).any()  # no box-coloured pixel of its own
    query = sorted((rehearsal_data / "test" / "query").iterdir())[0]
    Image.fromarray(photo).save(query, format="PNG")  # a test query becomes the astronaut (name kept)
    runs = tmp_path / "runs"
    common = ["--data", str(rehearsal_data), "--runs", str(runs)]
    assert infer_facenet.main([*common, "--embedder", "dlib", "--detector", "mtcnn", "--workers", "0"]) == 0
    with pytest.raises(KitError, match="not a face run"):  # a run without face settings
        (runs / "other").mkdir()
        (runs / "other" / "meta.json").write_text('{"config": {"data": "%s"}, "splits": {}}' % rehearsal_data)
        visualize.main(["--run", str(runs / "other"), "--boxes"])
    out = tmp_path / "look"
    assert visualize.main(["--run", str(runs / "dlib"), "--boxes", "--split", "test", "--queries", "0", "--out", str(out), "--device", "cpu"]) == 0
    png = next((out / "boxes" / "test").glob(f"query_*_{query.name}.png"))
    img = np.asarray(Image.open(png).convert("RGB"))
    ys, xs = np.nonzero((img == np.array(BOX_RGB, np.uint8)).all(axis=2))
    assert len(xs) > 200  # a drawn outline
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    scale = img.shape[1] / photo.shape[1]
    cx, cy = 222 * scale, 118 * scale  # the astronaut's face (by eye), as in tests/test_infer_facenet.py
    assert x0 < cx < x1 and y0 < cy < y1 and 40 * scale < x1 - x0 < 250 * scale
    for edge in (img[y0, x0:x1], img[y1, x0:x1], img[y0:y1, x0], img[y0:y1, x1]):  # four sides, box-coloured along
        assert (edge == np.array(BOX_RGB, np.uint8)).all(axis=1).mean() > 0.9
    inside = img[y0 + 5 : y1 - 5, x0 + 5 : x1 - 5]
    assert not (inside == np.array(BOX_RGB, np.uint8)).all(axis=2).any()  # an outline, not a filled square
    page = (out / "boxes" / "test.html").read_text()
    assert f"query: {query.name}" in page and "face: " in page
    assert len(list((out / "boxes" / "test").glob("*.png"))) == len(list((rehearsal_data / "test" / "query").iterdir())) + len(
        list((rehearsal_data / "test" / "gallery").iterdir()))


def test_gap_of_a_topk_run_reads_its_embeddings_and_draws_at_most_gap_points(rehearsal_data_session, tmp_path):
    from utils.data.layout import load_layout
    from utils.runs.topk_run import l2_normalise, write_topk_run

    layout = load_layout(rehearsal_data_session)
    ids = sorted(layout.train)[:4]
    val_q = [layout.rel(layout.train[i][0]) for i in ids]
    val_g = [layout.rel(p) for i in ids for p in layout.train[i][1:]]
    rng = np.random.default_rng(0)
    q = rng.normal(size=(len(val_q), 8)).astype(np.float32)
    g = (q[[ids.index(identity_of(n)) for n in val_g]] + 0.8 * rng.normal(size=(len(val_g), 8))).astype(np.float32)
    test_q, test_g = [p.name for p in layout.query], [p.name for p in layout.gallery]
    tq, tg = (rng.normal(size=(len(n), 8)).astype(np.float32) for n in (test_q, test_g))
    run = write_topk_run(tmp_path / "runs" / "topk", {"val": (q, g, val_q, val_g), "test": (tq, tg, test_q, test_g)},
                         {"model": "topk", "config": {"data": str(rehearsal_data_session)}}, k=3)
    assert visualize.main(["--run", str(run), "--gap", "--gap-points", "5"]) == 0
    png = run / "visual" / "gap_pca.png"
    assert f"map of {len(val_q) + 5 + 5 + 5} embeddings" in Image.open(png).text["Title"]  # 4 val queries, 5 of each other set
    qn, gn = l2_normalise(q).astype(np.float64), l2_normalise(g).astype(np.float64)
    rel = np.array([[identity_of(a) == identity_of(b) for b in val_g] for a in val_q])
    assert title_means(png)["val"] == pytest.approx(((qn @ gn.T)[rel].mean(), (qn @ gn.T)[~rel].mean()), abs=6e-4)
