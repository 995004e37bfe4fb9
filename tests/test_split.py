"""The validation split: deterministic, by identity, domain-aware, saved once."""

from __future__ import annotations

import json
import shutil

import pytest

from utils.data.layout import load_layout
from utils.data.split import SplitParams, load_or_create_split, make_split
from utils.errors import KitError


def test_split_is_deterministic_and_by_identity(rehearsal_data_session):
    layout = load_layout(rehearsal_data_session)
    a = make_split(layout, SplitParams(seed=3))
    b = make_split(layout, SplitParams(seed=3))
    c = make_split(layout, SplitParams(seed=4))
    assert a == b and a.val != c.val
    assert set(a.train).isdisjoint(a.val)
    assert len(a.val) == round(0.2 * 16)
    assert {a.identity_of(n) for n in a.val_query + a.val_gallery} == set(a.val)


def test_domains_put_real_images_in_queries(rehearsal_data_session):
    split = make_split(load_layout(rehearsal_data_session), SplitParams())
    assert split.val_query and all("/real_" in q for q in split.val_query)
    assert split.val_gallery and all("/synth_" in g for g in split.val_gallery)
    rel = split.val_relevant()
    for q, gallery in rel.items():
        assert gallery and all(split.identity_of(g) == split.identity_of(q) for g in gallery)


def test_without_domains_each_identity_is_halved(rehearsal_data):
    (rehearsal_data / "domains.csv").unlink()
    split = make_split(load_layout(rehearsal_data), SplitParams())
    for ident, imgs in split.val.items():
        q = [n for n in split.val_query if split.identity_of(n) == ident]
        g = [n for n in split.val_gallery if split.identity_of(n) == ident]
        assert len(q) == len(imgs) // 2 and sorted(q + g) == sorted(imgs)


def _rewrite_domains(data, edit):
    path = data / "domains.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], *filter(None, map(edit, lines[1:]))]) + "\n")


@pytest.mark.parametrize("edit,message", [
    (lambda row: row.removeprefix("train/"),  # paths relative to train/, not to the data folder
     r"domains.csv: none of its \d+ paths names a training image; paths are relative to the data folder, like "
     r"'train/id000/real_0.jpg': fix them or remove the file"),
    (lambda row: row.replace(",real", ",Real").replace(",synthetic", ",Synthetic"),
     r"domains.csv: no training image has the domain 'real' \(--query-domain\); its training images' domains are "
     r"\['Real', 'Synthetic'\]: pass --query-domain with one of them or fix the file"),
])
def test_domains_that_match_no_training_image_or_no_query_domain_are_one_line(rehearsal_data, edit, message):
    """A domains.csv whose paths were written relative to train/, or whose domains are spelt 'Real'/'Synthetic',
    was silently ignored: every held-out identity was halved, so validation queries mixed real and synthetic
    images and the validation score measured another task than the test's."""
    _rewrite_domains(rehearsal_data, edit)
    with pytest.raises(KitError, match=message):
        make_split(load_layout(rehearsal_data), SplitParams())


def test_training_images_without_a_domains_row_are_named(rehearsal_data, caplog):
    """Rows missing from domains.csv dropped those images from the validation split without a word."""
    _rewrite_domains(rehearsal_data, lambda row: None if row.startswith("train/id00") else row)
    split = make_split(load_layout(rehearsal_data), SplitParams())
    assert split.val_query and all("/real_" in q for q in split.val_query if "/id00" not in q)
    assert "domains.csv: 80 training image(s) have no row (e.g. 'train/id000/real_0.jpg')" in caplog.text


def test_saved_split_is_reused_and_guarded(rehearsal_data, tmp_path):
    layout = load_layout(rehearsal_data)
    runs = tmp_path / "runs"
    first = load_or_create_split(layout, SplitParams(seed=1), runs)
    saved = json.loads((runs / "split.json").read_text())
    assert saved["val_query"] == first.val_query
    assert load_or_create_split(layout, SplitParams(seed=1), runs) == first
    with pytest.raises(KitError, match="split.json: made with .*pass the same --seed"):
        load_or_create_split(layout, SplitParams(seed=2), runs)
    real = rehearsal_data / "domains.csv"
    kept = real.read_text()
    moved = f"{first.val_gallery[0]},synthetic"
    assert moved in kept
    real.write_text(kept.replace(moved, f"{first.val_gallery[0]},real"))  # a validation gallery image becomes a query
    with pytest.raises(KitError, match=r"split.json: made with another .*domains.csv \(the validation queries or "
                                       r"gallery differ\), so the runs already there were scored on another"):
        load_or_create_split(load_layout(rehearsal_data), SplitParams(seed=1), runs)
    real.write_text(kept)
    assert load_or_create_split(load_layout(rehearsal_data), SplitParams(seed=1), runs) == first
    shutil.rmtree(rehearsal_data / "train" / "id000")
    with pytest.raises(KitError, match="another training set"):
        load_or_create_split(load_layout(rehearsal_data), SplitParams(seed=1), runs)



@pytest.mark.parametrize("text,problem", [
    (b"", r"not valid JSON \(Expecting value: line 1 column 1"),
    (b'{"params": {"seed": 1, "val', r"not valid JSON \(Unterminated string"),
    (b"[]", "expected a JSON object, got list"),
    (b"{\xff}", r"not valid JSON \('utf-8' codec can't decode"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deep to read"),
])
def test_a_split_json_cut_short_or_not_an_object_is_one_line(rehearsal_data, tmp_path, text, problem):
    """runs/split.json emptied or cut short (a copy onto a full disk, an editor): every model script died with a
    JSONDecodeError, AttributeError, UnicodeDecodeError or RecursionError traceback. Now one line says to delete
    it, and a run after the deletion makes the very same split again."""
    runs = tmp_path / "runs"
    layout = load_layout(rehearsal_data)
    first = load_or_create_split(layout, SplitParams(seed=1), runs)
    saved = (runs / "split.json").read_bytes()
    (runs / "split.json").write_bytes(text)
    with pytest.raises(KitError, match=rf"split.json: {problem}.*; delete it and run again"):
        load_or_create_split(layout, SplitParams(seed=1), runs)
    (runs / "split.json").unlink()
    assert load_or_create_split(layout, SplitParams(seed=1), runs) == first
    assert (runs / "split.json").read_bytes() == saved

def test_bad_fraction_is_refused(rehearsal_data_session):
    with pytest.raises(KitError, match="val-fraction"):
        make_split(load_layout(rehearsal_data_session), SplitParams(val_fraction=1.5))
