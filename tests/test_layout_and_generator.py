"""The dataset layout checks and the embedded rehearsal data generator."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from utils.data.layout import load_layout
from utils.data.rehearsal_data import generate
from utils.errors import KitError


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_generator_writes_a_consistent_competition_layout(rehearsal_data_session):
    layout = load_layout(rehearsal_data_session)
    assert len(layout.train) == 16 and len(layout.query) == 16 and len(layout.gallery) == 16
    gallery = {p.name for p in layout.gallery}
    assert set(layout.ground_truth) == {p.name for p in layout.query}
    assert all(g and set(g) <= gallery for g in layout.ground_truth.values())
    assert layout.domains[f"test/query/{layout.query[0].name}"] == "real"
    # test names do not leak the identity
    assert not any(p.stem.startswith("id") for p in layout.query + layout.gallery)


def test_generator_is_deterministic_and_refuses_to_overwrite(tmp_path):
    a = generate(tmp_path / "a", train_identities=4, test_identities=5, size=32, seed=7)
    b = generate(tmp_path / "b", train_identities=4, test_identities=5, size=32, seed=7)
    assert _digest(a) == _digest(b)
    with pytest.raises(KitError, match="not empty; pass --overwrite"):
        generate(tmp_path / "a", train_identities=4, test_identities=5, size=32)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: shutil.rmtree(d / "test" / "query"), "query: folder not found"),
        (lambda d: [p.unlink() for p in sorted((d / "test" / "gallery").iterdir())[9:]], "images; a top-10 needs at least 10"),
        (lambda d: (d / "test" / "ground_truth.json").write_text("{oops"), "ground_truth.json: not valid JSON"),
        (lambda d: (d / "domains.csv").write_text("file,kind\na,b\n"), "domains.csv: expected a header 'path,domain'"),
    ],
)
def test_layout_errors_name_the_file(rehearsal_data, change, message):
    change(rehearsal_data)
    with pytest.raises(KitError, match=message):
        load_layout(rehearsal_data)
