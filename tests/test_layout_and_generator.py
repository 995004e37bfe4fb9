"""The dataset layout checks and the embedded rehearsal data generator."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil

import pytest

import submit
from tests.helpers.runs import make_run
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
        (lambda d: (d / "test" / "ground_truth.json").write_text("[" * 100_000 + "]" * 100_000),
         r"ground_truth.json: not valid JSON \(nested too deep to read\)"),
        (lambda d: (d / "domains.csv").write_text("file,kind\na,b\n"), "domains.csv: expected a header 'path,domain'"),
    ],
)
def test_layout_errors_name_the_file(rehearsal_data, change, message):
    change(rehearsal_data)
    with pytest.raises(KitError, match=message):
        load_layout(rehearsal_data)


def test_data_given_as_a_file_says_so(rehearsal_data):
    """--data pointing at a file (the zip, ground_truth.json) said 'data folder not found' though the path exists."""
    for path in (rehearsal_data / "test" / "ground_truth.json", rehearsal_data / "domains.csv"):
        with pytest.raises(KitError, match=rf"^{path}: a file, not a folder; pass --data the folder that holds train/ and test/$"):
            load_layout(path)


@pytest.mark.parametrize("folder", ["query", "gallery"])
def test_a_dangling_or_looping_test_link_stops_naming_the_link(rehearsal_data, folder):
    link = rehearsal_data / "test" / folder / "zz_moved.jpg"
    os.symlink(rehearsal_data / "elsewhere" / "photo.jpg", link)
    with pytest.raises(KitError, match=rf"zz_moved.jpg: symbolic link points nowhere .*{folder} images must all be readable"):
        load_layout(rehearsal_data)
    link.unlink()
    os.symlink(link.name, link)  # points at itself
    with pytest.raises(KitError, match="zz_moved.jpg: symbolic link loop"):
        load_layout(rehearsal_data)


def test_a_dangling_training_link_is_skipped_with_a_line(rehearsal_data, caplog):
    ident = sorted((rehearsal_data / "train").iterdir())[0]
    os.symlink(rehearsal_data / "gone.png", ident / "zz_link.png")
    with caplog.at_level(logging.WARNING):
        layout = load_layout(rehearsal_data)
    assert ident / "zz_link.png" not in layout.train[ident.name] and layout.train[ident.name]
    assert f"skipping training image {ident / 'zz_link.png'}: symbolic link points nowhere" in caplog.text


def test_submit_with_data_refuses_a_query_folder_with_a_dangling_link(rehearsal_data, tmp_path):
    run = make_run(rehearsal_data, tmp_path / "runs")
    os.symlink(rehearsal_data / "gone.jpg", rehearsal_data / "test" / "query" / "zz_lost.jpg")
    with pytest.raises(KitError, match=r"query/zz_lost.jpg: symbolic link points nowhere"):
        submit.main(["--run", str(run), "--group", "t", "--dry-run", "--out", str(tmp_path / "subs"), "--data", str(rehearsal_data)])
    assert not (tmp_path / "subs").exists()


def test_ground_truth_written_for_other_names_stops_with_one_line(rehearsal_data, caplog):
    """Keys saved as paths ('test/query/x.jpg') matched no query: every test score read 0.00 and the local server
    scored every query a miss, silently. Now the file is named with examples; a query merely left without a right
    answer in the gallery is a warning line (it scores as a miss)."""
    import json

    gt_path = rehearsal_data / "test" / "ground_truth.json"
    truth = json.loads(gt_path.read_text())
    gt_path.write_text(json.dumps({f"test/query/{q}": g for q, g in truth.items()}))
    first = f"test/query/{sorted(truth)[0]}"
    with pytest.raises(KitError, match=rf"ground_truth.json: {len(truth)} of {len(truth)} query names are not files "
                                       rf"in test/query, e.g. \['{first}'"):
        load_layout(rehearsal_data)
    stale = sorted(truth)[0]
    (rehearsal_data / "test" / "query" / stale).rename(rehearsal_data / "test" / "query" / f"renamed_{stale}")
    gt_path.write_text(json.dumps(truth))  # the right form, but one query renamed on disk
    with pytest.raises(KitError, match=rf"1 of {len(truth)} query names are not files in test/query, e.g. \['{stale}'\]"):
        load_layout(rehearsal_data)
    truth[f"renamed_{stale}"] = ["not_in_the_gallery.png"]
    del truth[stale]
    gt_path.write_text(json.dumps(truth))
    with caplog.at_level(logging.WARNING):
        layout = load_layout(rehearsal_data)
    assert layout.ground_truth == truth
    assert f"1 of {len(truth)} queries have no right answer in test/gallery (they score as misses), e.g. ['renamed_{stale}']" in caplog.text


def test_domains_and_ground_truth_saved_by_a_spreadsheet_are_read_or_named(rehearsal_data):
    """Excel's 'CSV UTF-8' and Notepad put a byte-order mark first: domains.csv was refused with the misleading
    "expected a header 'path,domain', got ['\\ufeffpath', 'domain']" and ground_truth.json as not valid JSON.
    Both now read as UTF-8 with or without the mark; a file in another encoding (Latin-1) stopped with a
    UnicodeDecodeError traceback and now stops with one line naming it."""
    domains, gt_path = rehearsal_data / "domains.csv", rehearsal_data / "test" / "ground_truth.json"
    before = load_layout(rehearsal_data)
    domains.write_bytes(b"\xef\xbb\xbf" + domains.read_bytes().replace(b"\n", b"\r\n"))
    gt_path.write_bytes(b"\xef\xbb\xbf" + gt_path.read_bytes())
    after = load_layout(rehearsal_data)
    assert after.domains == before.domains and after.ground_truth == before.ground_truth
    for path, word in ((domains, "real"), (gt_path, ".jpg")):
        kept = path.read_bytes()
        path.write_bytes(kept.replace(word.encode(), f"é{word}".encode("latin-1"), 1))
        with pytest.raises(KitError, match=rf"{path.name}: not UTF-8 text \(byte \d+: invalid continuation byte\); save it as UTF-8"):
            load_layout(rehearsal_data)
        path.write_bytes(kept)
