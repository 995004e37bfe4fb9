"""visualize.py on real images of the generated dataset and a run written from a handmade matrix:
the PNG's size, and the colour of the frames at positions known to be right or wrong."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import visualize
from tests.helpers.runs import handmade_run
from utils.errors import KitError
from utils.runs.similarity_io import load_run
from utils.runs.topk_run import write_topk_run
from utils.runs.visual import PanelLayout

THUMB_PX = 48
K = 5


def frame_colour(png: Image.Image, position: int) -> np.ndarray:
    """Median RGB of the frame strip above the thumbnail at ``position`` (0 = the query)."""
    layout = PanelLayout(k=K, thumb_px=THUMB_PX)
    left, top, right, _ = layout.tile_box(position)
    strip = np.asarray(png)[top : top + layout.frame_px, left:right]
    return np.median(strip.reshape(-1, 3), axis=0)


def is_green(rgb):
    return rgb[1] > 150 and rgb[0] < 80 and rgb[2] < 80


def is_red(rgb):
    return rgb[0] > 150 and rgb[1] < 80 and rgb[2] < 80


def test_val_panel_has_expected_size_and_frames(rehearsal_data_session, tmp_path):
    run, val_q, _ = handmade_run(rehearsal_data_session, tmp_path / "runs")
    assert visualize.main(["--run", str(run), "--split", "val", "--k", str(K), "--thumb-px", str(THUMB_PX),
                           "--queries", "0"]) == 0  # --data from the run's meta.json
    pngs = sorted((run / "visual" / "val").glob("*.png"))
    assert len(pngs) == 2
    img = Image.open(pngs[0]).convert("RGB")
    # (K+1) framed tiles, gaps and margins: independent of the images' own sizes
    tile = THUMB_PX + 2 * 6
    assert img.size == (2 * 8 + (K + 1) * tile + K * 8 + 24, 2 * 8 + tile + 34)
    assert Image.open(pngs[1]).size == img.size
    assert is_red(frame_colour(img, 1)), frame_colour(img, 1)  # rank 1: the other identity
    assert is_green(frame_colour(img, 2)), frame_colour(img, 2)  # rank 2: the same identity
    assert not is_green(frame_colour(img, 0)) and not is_red(frame_colour(img, 0))  # the query's own frame
    second = Image.open(pngs[1]).convert("RGB")
    assert is_green(frame_colour(second, 1))
    page = (run / "visual" / "val.html").read_text()
    assert f"val/{pngs[0].name}" in page and "first right answer at rank 2" in page



def test_a_run_in_the_topk_form_is_named_as_such_not_as_unfinished(rehearsal_data_session, tmp_path):
    """A finished run past --matrix-limit (next to matrix runs in runs/) was refused with 'val_sim.npy: not found;
    the model run did not finish': the user re-ran a model that had finished. Now the line names the form."""
    run, _, _ = handmade_run(rehearsal_data_session, tmp_path / "runs")
    meta = load_run(run).meta
    rng = np.random.default_rng(0)
    emb = {split: (rng.normal(size=(len(m.query_names), 8)), rng.normal(size=(len(m.gallery_names), 8)), m.query_names,
                   m.gallery_names) for split, m in load_run(run).splits.items()}
    topk = write_topk_run(tmp_path / "runs" / "big", emb, {k: meta[k] for k in ("model", "config", "data_fingerprint")}, k=10)
    for split in ("val", "test"):
        with pytest.raises(KitError, match=r"runs/big: a run in the top-k form \(each query's best candidates, no "
                                           r"<split>_sim.npy\); this step reads runs in the matrix form"):
            visualize.main(["--run", str(topk), "--split", split])
    assert not (topk / "visual").exists()


def test_a_thumbnail_side_past_the_cap_is_one_line_before_any_drawing(rehearsal_data_session, tmp_path):
    """--thumb-px had no upper bound: 100000 (a typo for 1000) made a (K+1) x 100000 px wide canvas per query and
    the kernel killed the process at ~24 GB resident after a minute. Now above 1024 is refused before any drawing."""
    run, _, _ = handmade_run(rehearsal_data_session, tmp_path / "runs")
    out = tmp_path / "visual"
    for px in (visualize.MAX_THUMB_PX + 1, 100_000):
        with pytest.raises(KitError, match=rf"--thumb-px {px}, .*: need k >= 1, thumb-px from 16 to 1024"):
            visualize.main(["--run", str(run), "--split", "val", "--queries", "1", "--thumb-px", str(px), "--out", str(out)])
    assert not out.exists()
    assert visualize.main(["--run", str(run), "--split", "val", "--queries", "1", "--k", "2",
                           "--thumb-px", str(visualize.MAX_THUMB_PX), "--out", str(out)]) == 0


def test_an_image_far_thinner_than_tall_is_drawn(rehearsal_data, tmp_path):
    """A 1 x 4000 px gallery image (a banner, a scan strip): the model scripts embed it, but visualize.py died with
    'ValueError: height and width must be > 0' (ImageOps.pad asked for a 0 px wide resize). It now draws, 1 px wide."""
    from utils.runs.visual import FILL_RGB, thumbnail

    thin = thumbnail(Image.new("RGB", (1, 256), (0, 200, 0)), THUMB_PX)
    green = (np.asarray(thin) == (0, 200, 0)).all(axis=2)
    assert thin.size == (THUMB_PX, THUMB_PX) and green.sum() == THUMB_PX and green.any(axis=0).sum() == 1  # one column
    assert thin.getpixel((0, THUMB_PX // 2)) == tuple(FILL_RGB)
    for p in sorted((rehearsal_data / "test" / "gallery").iterdir()):
        Image.new("RGB", (1, 4000), (0, 200, 0)).save(p, format="PNG")  # every gallery image thin: one is in every top-k
    run, _, _ = handmade_run(rehearsal_data, tmp_path / "runs")
    out = tmp_path / "look"
    assert visualize.main(["--run", str(run), "--data", str(rehearsal_data), "--split", "test", "--queries", "1",
                           "--k", str(K), "--thumb-px", str(THUMB_PX), "--out", str(out)]) == 0
    assert len(list((out / "test").glob("*.png"))) == 1


def test_worst_first_on_test_with_ground_truth(rehearsal_data_session, tmp_path):
    run, _, q = handmade_run(rehearsal_data_session, tmp_path / "runs")
    out = tmp_path / "look"
    assert visualize.main(["--run", str(run), "--data", str(rehearsal_data_session), "--split", "test", "--worst",
                           "--queries", "3", "--k", str(K), "--thumb-px", str(THUMB_PX), "--out", str(out)]) == 0
    pngs = sorted((out / "test").glob("*.png"))
    assert len(pngs) == 3
    img = Image.open(pngs[0]).convert("RGB")
    assert [is_red(frame_colour(img, p)) for p in (1, 2)] == [True, True]
    assert is_green(frame_colour(img, 3))
    assert (out / "test.html").read_text().count("first right answer at rank 3") == 3


def test_worst_without_ground_truth_is_one_clear_error(rehearsal_data, tmp_path):
    run, _, _ = handmade_run(rehearsal_data, tmp_path / "runs")
    (rehearsal_data / "test" / "ground_truth.json").unlink()
    with pytest.raises(KitError, match="--worst needs a ground truth"):
        visualize.main(["--run", str(run), "--split", "test", "--worst"])
    # without --worst, test panels are drawn with grey frames
    assert visualize.main(["--run", str(run), "--split", "test", "--queries", "1", "--k", str(K), "--thumb-px", str(THUMB_PX)]) == 0
    img = Image.open(next((run / "visual" / "test").glob("*.png"))).convert("RGB")
    rgb = frame_colour(img, 1)
    assert not is_green(rgb) and not is_red(rgb) and abs(int(rgb[0]) - int(rgb[1])) < 10


def test_names_with_a_newline_are_drawn_on_one_line(rehearsal_data, tmp_path):
    """A query and a gallery file whose names hold a newline (legal on Linux): panels drawn, the name shown as '\\n'."""
    import json

    gt_path = rehearsal_data / "test" / "ground_truth.json"
    gt = json.loads(gt_path.read_text())
    query = sorted(gt)[0]
    gallery = gt[query][0]
    new_q, new_g = f"odd\nquery_{query}", f"odd\ngallery_{gallery}"
    (rehearsal_data / "test" / "query" / query).rename(rehearsal_data / "test" / "query" / new_q)
    (rehearsal_data / "test" / "gallery" / gallery).rename(rehearsal_data / "test" / "gallery" / new_g)
    gt[new_q] = [new_g if g == gallery else g for g in gt.pop(query)]
    gt = {q: [new_g if g == gallery else g for g in v] for q, v in gt.items()}
    gt_path.write_text(json.dumps(gt))
    run, _, q = handmade_run(rehearsal_data, tmp_path / "runs")
    assert new_q in q
    assert visualize.main(["--run", str(run), "--split", "test", "--queries", "0", "--k", str(K),
                           "--thumb-px", str(THUMB_PX)]) == 0
    pngs = sorted((run / "visual" / "test").glob("*.png"))
    assert len(pngs) == len(q) and all("\n" not in p.name for p in pngs)
    img = Image.open(pngs[q.index(new_q)]).convert("RGB")
    assert [is_red(frame_colour(img, p)) for p in (1, 2)] == [True, True]
    assert is_green(frame_colour(img, 3))  # its right answer (the renamed gallery image): rank 3 in handmade_run
    assert "odd\nquery_" in (run / "visual" / "test.html").read_text()


def test_a_caption_run_draws_each_results_caption_under_it_and_lists_it_on_the_page(rehearsal_data_session, tmp_path):
    import json

    from PIL import ImageDraw, ImageFont

    from utils.runs.visual import wrap_text

    run, val_q, _ = handmade_run(rehearsal_data_session, tmp_path / "runs")
    meta = json.loads((run / "meta.json").read_text())
    gallery = meta["splits"]["val"]["gallery_names"]
    long = "a watercolour painting of a person with <b>curly</b> hair " * 6
    (run / "gallery_captions.json").write_text(json.dumps({"val": {g: long for g in gallery}, "test": {}}))
    argv = ["--run", str(run), "--split", "val", "--k", str(K), "--thumb-px", str(THUMB_PX), "--queries", "1"]
    assert visualize.main([*argv, "--caption-lines", "2"]) == 0
    img = np.asarray(Image.open(next((run / "visual" / "val").glob("*.png"))).convert("L"))
    layout = PanelLayout(k=K, thumb_px=THUMB_PX, text_lines=2)
    assert img.shape == (layout.size[1], layout.size[0]) == (2 * 8 + THUMB_PX + 12 + 34 + 2 * 12, layout.size[0])
    _, _, right, bottom = layout.tile_box(1)
    caption_band = img[bottom + 33 : bottom + 33 + 24, right - layout.tile_px : right]
    query_band = img[bottom + 33 :, layout.tile_box(0)[0] : layout.tile_box(0)[2]]
    assert (caption_band < 100).sum() > 50 and (query_band < 100).sum() == 0  # text under a result, none under the query
    page = (run / "visual" / "val.html").read_text()
    assert page.count("&lt;b&gt;curly&lt;/b&gt;") == 6 * K and "<b>curly" not in page  # every result's caption in full, escaped
    # the wrapping: at most the lines asked for, each within the tile, the cut marked
    draw, font = ImageDraw.Draw(Image.new("RGB", (10, 10))), ImageFont.load_default()
    lines = wrap_text(draw, long, font, layout.tile_px, 2)
    assert len(lines) == 2 and lines[-1].endswith("...") and all(draw.textlength(t, font=font) <= layout.tile_px for t in lines)
    assert wrap_text(draw, "short words", font, layout.tile_px, 3) == ["short words"]
    assert all(draw.textlength(t, font=font) <= 40 for t in wrap_text(draw, "x" * 200, font, 40, 3))
    # --caption-lines 0: the panel without captions
    assert visualize.main([*argv, "--caption-lines", "0"]) == 0
    assert Image.open(next((run / "visual" / "val").glob("*.png"))).size == PanelLayout(k=K, thumb_px=THUMB_PX).size
    (run / "gallery_captions.json").write_text(json.dumps({"val": ["not", "a", "mapping"]}))
    with pytest.raises(KitError, match="gallery_captions.json: expected"):
        visualize.main(argv)
