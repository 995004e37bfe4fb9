"""The style library (utils/faces/styles.py), the adapter's rendered pairs (train_face_adapter.py
--rendered-pairs) with the source's gallery views kept, and the harder validation that breaks ties
(utils/faces/tiebreak.py)."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest

import infer_facenet
import train_face_adapter
from utils.embedding.embed import l2_normalize
from utils.errors import KitError
from utils.faces.styles import STYLE_FUNCS, TRAIN_STYLES, VALIDATION_STYLES, StyleLibrary
from utils.faces.tiebreak import MIN_SEPARATING, break_tie, harder_face_validation, tied_at_top
from utils.faces.views import fuse
from utils.runs.metrics import evaluate
from utils.runs.similarity_io import load_run


@pytest.fixture(scope="module")
def face() -> np.ndarray:
    """A real face (skimage's astronaut), cut and shrunk to 72 x 60 so that every style is quick."""
    import cv2
    from skimage import data

    return cv2.resize(data.astronaut()[20:260, 140:340], (60, 72), interpolation=cv2.INTER_AREA)


def test_every_style_keeps_size_and_dtype_and_the_library_renders_deterministically_per_seed(face):
    for name, fn in STYLE_FUNCS.items():
        out = fn(face.copy(), random.Random(0))
        assert out.shape == face.shape and out.dtype == np.uint8, name
    lib = StyleLibrary()
    a, src_a, used_a = lib.render_many([face, face[::-1].copy()], 3, seed=7)
    b, src_b, used_b = lib.render_many([face, face[::-1].copy()], 3, seed=7)
    assert a.shape == (6, *face.shape) and a.dtype == np.uint8 and np.array_equal(a, b) and used_a == used_b
    assert src_a.tolist() == [0, 0, 0, 1, 1, 1] and np.array_equal(src_a, src_b)
    assert not np.array_equal(a, lib.render_many([face, face[::-1].copy()], 3, seed=8)[0])  # another seed, other renders
    assert all(1 <= len(u) <= lib.max_compose for u in used_a)


def test_an_excluded_style_is_never_rendered_and_patches_leave_the_rest_of_the_image():
    assert not set(TRAIN_STYLES) & set(VALIDATION_STYLES) and set(TRAIN_STYLES) | set(VALIDATION_STYLES) == set(STYLE_FUNCS)
    img = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    lib = StyleLibrary(styles=("pencil", "invert", "posterize"), exclude=("pencil",), max_compose=2)
    _, _, used = lib.render_many([img], 40, seed=0)
    assert {s for u in used for s in u} == {"invert", "posterize"}
    patch = StyleLibrary(styles=("invert",), patch_prob=1.0).render(img, random.Random(1))
    changed = np.any(patch != img, axis=2)
    assert 0 < changed.mean() < 0.5 and np.array_equal(patch[~changed], img[~changed])  # one patch restyled, the rest as it was
    with pytest.raises(KitError, match="'watercolour'"):
        StyleLibrary(styles=("watercolour",))
    with pytest.raises(KitError, match="every style"):
        StyleLibrary(styles=("invert",), exclude=("invert",))
    with pytest.raises(KitError, match="RGB uint8"):
        lib.render(img.astype(np.float32), random.Random(0))


def _tie_case(n_query: int, n_fixed: int):
    """Validation: every query matches its gallery image in both views (all rules tie at 1000). Harder
    validation: a query's renders (its other photos' look, in another style) lie far from its person
    in the plain view; the second view reads ``n_fixed`` persons' renders correctly."""
    rng = np.random.default_rng(0)
    d = 32
    person = l2_normalize(rng.normal(size=(n_query, d)).astype(np.float32))
    query = l2_normalize(person + 0.1 * rng.normal(size=person.shape).astype(np.float32))
    gallery = [person, person.copy()]
    noise = l2_normalize(rng.normal(size=(n_query, d)).astype(np.float32))
    second = np.where(np.arange(n_query)[:, None] < n_fixed, person, noise)
    # two photos per person: queries 2k and 2k+1 are person k
    labels = np.arange(n_query) // 2
    renders = [noise[labels * 2], second[labels * 2]]
    others = l2_normalize(rng.normal(size=(n_query, d)).astype(np.float32))  # a gallery of other people: only the renders are relevant
    hard = harder_face_validation(query[labels * 2], labels, [others, others.copy()], np.full(n_query, -1), renders, np.arange(n_query))
    val = {r: evaluate(fuse(query, gallery, r), np.eye(n_query, dtype=bool)) for r in ("zmax", "plain")}
    return hard, val


def test_the_harder_validation_separates_two_options_that_tie_on_the_plain_one(caplog):
    hard, val = _tie_case(n_query=16, n_fixed=16)
    assert val["zmax"]["score"] == val["plain"]["score"] == 1000.0 and tied_at_top(val) == ["zmax", "plain"]
    # a query's own render is never relevant and ranks last
    assert not (hard.rel & hard.own).any() and hard.own.sum() == 16
    s = hard.sim(lambda q, g: fuse(q, g, "plain"))
    assert np.all(s[hard.own] < s[~hard.own].min())
    with caplog.at_level(logging.WARNING):
        result = break_tie(["plain", "zmax"], lambda r: hard.sim(lambda q, g: fuse(q, g, r)), hard.rel, "test")
    assert result.chosen == "zmax" and result.runner_up == "plain" and result.separating >= MIN_SEPARATING and not result.weak
    assert result.metrics["zmax"]["score"] > result.metrics["plain"]["score"]
    assert "too few" not in caplog.text and result.record()["separating_queries"] == result.separating


def test_the_tie_warning_fires_when_fewer_than_five_queries_separate_the_options(caplog):
    rng = np.random.default_rng(1)
    rel = np.eye(12, 30, dtype=bool)
    a = rng.normal(size=(12, 30))
    a[np.arange(12), np.arange(12)] += 10.0  # every query finds its image first
    b = a.copy()
    b[:2, :2] -= 20.0  # option b loses it on two queries only
    with caplog.at_level(logging.WARNING):
        result = break_tie(["b", "a"], {"a": a, "b": b}.__getitem__, rel, "test")
    assert result.chosen == "a" and result.runner_up == "b" and result.separating == 2 and result.weak
    assert "only 2 harder validation queries separate a from b" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert break_tie(["a", "b"], {"a": a, "b": a.copy()}.__getitem__, rel, "test").chosen == "a"  # equal: the first preferred
    assert "only 0 harder validation queries" in caplog.text
    with pytest.raises(KitError, match="two or more"):
        break_tie(["a"], {"a": a}.__getitem__, rel, "test")


def test_rendered_pairs_train_the_adapter_and_the_adapted_run_keeps_the_source_views(rehearsal_data, tmp_path, caplog):
    runs = tmp_path / "runs"
    common = ["--data", str(rehearsal_data), "--runs", str(runs)]
    assert infer_facenet.main([*common, "--embedder", "dlib", "--detector", "none", "--tta", "--workers", "0", "--view-fusion", "max"]) == 0
    with pytest.raises(KitError, match="--rendered-pairs -1"):
        train_face_adapter.main([*common, "--rendered-pairs", "-1"])
    with pytest.raises(KitError, match="'sketchy'"):
        train_face_adapter.main([*common, "--rendered-pairs", "2", "--rendered-exclude", "sketchy"])
    argv = [*common, "--source", "dlib", "--rendered-pairs", "2", "--rendered-exclude", "pencil", "--epochs", "2", "--patience", "0"]
    assert train_face_adapter.main(argv) == 0
    run = load_run(runs / "dlib_adapted")
    assert [h["epoch"] for h in run.meta["history"]] == [1, 2] and run.meta["config"]["rendered_pairs"] == 2
    rendered = [np.load(p) for p in (runs / "face_cache").glob("rendered_*.npz")]
    z = next(r for r in rendered if not any(k.startswith("view.") for k in r.files))  # the training renders (a tie's renders carry views)
    assert len(z["emb"]) == len(z["src"]) == len(z["used"]) == 2 * len(set(z["src"].tolist())) > 0  # two renders of each real photo
    used = {style for u in z["used"].tolist() for style in u.split("+")}
    assert used and "pencil" not in used and not used & set(VALIDATION_STYLES)  # never the excluded or the validation styles
    # the source's gallery views and rule are kept: the adapted run fuses them as the source did
    assert run.meta["view_fusion"]["rule"] == "max" and run.meta["gallery_views"]["names"] == load_run(runs / "dlib").meta["gallery_views"]["names"]
    # --view-fusion auto where every rule ties: a texture view too fine to change a pixel equals the plain view, so the
    # harder validation decides, finds no query that separates the rules, keeps the first (zmax) and warns
    argv = [*common, "--embedder", "dlib", "--detector", "none", "--tta", "--workers", "0", "--run-name", "auto", "--gallery-views", "texture",
            "--texture-eye-frac", "0.001"]
    with caplog.at_level(logging.WARNING):
        assert infer_facenet.main(argv) == 0
    fusion = load_run(runs / "auto").meta["view_fusion"]
    assert sorted(tied_at_top(fusion["val"])) == ["max", "mean", "plain", "softmax", "zmax"]  # meta.json sorts the keys
    tie = fusion["tie_break"]
    assert fusion["chosen_by"] == "harder validation (5 rules tied on validation)" and fusion["rule"] == tie["chosen"] == "zmax"
    assert tie["separating_queries"] == 0 and tie["weak"] and tie["queries"] > 0 and set(tie["harder_val"]) == set(fusion["val"])
    assert "rests on too few queries" in caplog.text
    hard = [z for z in map(np.load, (runs / "face_cache").glob("rendered_*.npz")) if "view.texture0.001" in z.files]  # the renders' own view
    assert len(hard) == 1 and {s for u in hard[0]["used"].tolist() for s in u.split("+")} <= set(VALIDATION_STYLES)
