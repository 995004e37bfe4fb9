"""Runs know the images they were made from (utils/runs/data_fingerprint.py): a run made from other images of
the same names is left out of an ensemble, blocked by preflight and refused by submit.py --data and visualize.py;
a touched image counts as other data (the fingerprint reads name, size and mtime, not the pixels)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

import ensemble
import submit
import visualize
from tests.helpers.runs import make_run, write_runs
from tests.test_attack_regressions import other_data_run
from tests.test_run_provenance import FAST, topk_runs
from utils.checklist import BLOCK, OK, WARN, Checklist
from utils.data.layout import load_layout
from utils.data.split import SplitParams
from utils.data.task import prepare_task
from utils.errors import KitError
from utils.runs.data_fingerprint import layout_fingerprint, split_fingerprint
from utils.runs.model_run import run_meta
from utils.runs.run_checks import check_runs


def run_statuses(runs: Path, data: Path) -> dict[str, tuple[str, str]]:
    cl = Checklist()
    check_runs(cl, runs, load_layout(data))
    return {i.name: (i.status, i.detail) for i in cl.items if i.group == "runs"}


def stamp(run: Path, fp: dict) -> None:
    """Record ``fp`` as the run's data fingerprint (both splits), as run_meta does."""
    meta = json.loads((run / "meta.json").read_text())
    meta["data_fingerprint"] = {"val": fp, "test": fp}
    (run / "meta.json").write_text(json.dumps(meta))


def image_folder(root: Path, names: list[str], salt: bytes) -> dict:
    """Files of ``names`` under ``root`` whose bytes depend on ``salt``; their fingerprint."""
    root.mkdir(parents=True)
    paths = [root / n for n in names]
    for i, p in enumerate(paths):
        p.write_bytes(salt * (i + 1))
    return split_fingerprint(paths[:1], paths[1:], names[:1], names[1:])


def test_a_model_run_records_the_fingerprint_of_its_test_images(rehearsal_data, tmp_path):
    task = prepare_task(rehearsal_data, tmp_path / "runs", SplitParams())
    meta = run_meta("m", {}, task, {}, {}, None)
    assert meta["data_fingerprint"]["test"] == layout_fingerprint(load_layout(rehearsal_data))
    assert meta["data_fingerprint"]["val"]["files"] == len(task.val_query) + len(task.val_gallery)


def test_ensemble_leaves_out_a_member_made_from_other_images_with_one_line(tmp_path, capsys, caplog):
    runs, _ = write_runs(tmp_path, models=(("a", 1.5), ("b", 1.0), ("c", 1.2)))
    names = ["q.jpg", "g1.png", "g2.png"]
    same, other = image_folder(tmp_path / "d1", names, b"x"), image_folder(tmp_path / "d2", names, b"yy")
    for name, fp in (("a", same), ("b", same), ("c", other)):
        stamp(runs / name, fp)
    with caplog.at_level(logging.WARNING):
        assert ensemble.main(["--runs", str(runs), *FAST]) == 0
    lines = [r.getMessage() for r in caplog.records if "runs/c" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"leaving out {runs / 'c'}: made from other images of the same names")
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("left out: c (made from other images of the same names")
    meta = json.loads((runs / "ensemble" / "meta.json").read_text())
    assert [m["name"] for m in meta["members"]] == ["a", "b"]
    assert meta["data_fingerprint"]["test"] == same  # the fused run records its members' images
    with pytest.raises(KitError, match=r"runs/c: made from other images of the same names"):
        ensemble.main(["--runs", str(runs), "--models", "a", "c", "--out", str(tmp_path / "e2"), *FAST])


def test_a_topk_ensemble_leaves_out_a_member_made_from_other_images(tmp_path, capsys):
    runs = topk_runs(tmp_path, models=("p", "q", "r"))
    names = ["q.jpg", "g1.png", "g2.png"]
    same, other = image_folder(tmp_path / "d1", names, b"x"), image_folder(tmp_path / "d2", names, b"yy")
    for name, fp in (("p", same), ("q", other), ("r", same)):
        stamp(runs / name, fp)
    assert ensemble.main(["--runs", str(runs), *FAST]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("left out: q (made from other images of the same names")
    meta = json.loads((runs / "ensemble" / "meta.json").read_text())
    assert [m["name"] for m in meta["members"]] == ["p", "r"] and meta["data_fingerprint"]["test"] == same


def test_preflight_blocks_and_submit_and_visualize_refuse_a_run_of_other_images(rehearsal_data, tmp_path):
    runs = tmp_path / "runs"
    make_run(rehearsal_data, runs)
    other = other_data_run(rehearsal_data, tmp_path, runs)
    statuses = run_statuses(runs, rehearsal_data)
    assert statuses["model"][0] == OK
    assert statuses["other"][0] == BLOCK and "made from other images of the same names" in statuses["other"][1]
    with pytest.raises(KitError, match=r"other: made from other images of the same names .*re-run the model"):
        submit.main(["--run", str(other), "--data", str(rehearsal_data), "--dry-run", "--group", "t", "--out", str(tmp_path / "s")])
    assert not (tmp_path / "s").exists() or not list((tmp_path / "s").glob("*.json"))
    assert submit.main(["--run", str(runs / "model"), "--data", str(rehearsal_data), "--dry-run", "--group", "t", "--out", str(tmp_path / "s")]) == 0
    with pytest.raises(KitError, match="made from other images of the same names"):
        visualize.main(["--run", str(other), "--data", str(rehearsal_data), "--split", "test", "--out", str(tmp_path / "v")])
    assert not (tmp_path / "v").exists()


def test_a_run_of_other_test_names_is_named_as_other_data_not_other_images_of_the_same_names(rehearsal_data, tmp_path):
    """A run made on another data folder (other query names) was refused by visualize.py as 'made from other
    images of the same names ... (file sizes differ)': the names are not the same (submit.py names them itself)."""
    runs = tmp_path / "runs"
    run = make_run(rehearsal_data, runs)
    for p in (rehearsal_data / "test" / "query").iterdir():
        p.rename(p.with_name("x" + p.name))
    (rehearsal_data / "test" / "ground_truth.json").unlink()  # another folder: no rehearsal truth for these names
    message = (rf"{run}: made from other data than {rehearsal_data}: its test query names differ \(16 in the run, 16 in "
               r"the folder; e.g. 'x.*' is in one only\); pass the --data it was made from or re-run the model")
    with pytest.raises(KitError, match=message):
        visualize.main(["--run", str(run), "--data", str(rehearsal_data), "--split", "val", "--out", str(tmp_path / "v")])
    assert not (tmp_path / "v").exists()


def test_a_touched_image_counts_as_other_data_until_restored_and_a_copy_keeping_times_does_not(rehearsal_data, tmp_path):
    runs = tmp_path / "runs"
    make_run(rehearsal_data, runs)
    copy = tmp_path / "copy"
    shutil.copytree(rehearsal_data, copy)  # copy2 keeps the times: the same images
    assert run_statuses(runs, copy)["model"][0] == OK
    image = sorted((rehearsal_data / "test" / "gallery").iterdir())[0]
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes, one second later
    status, detail = run_statuses(runs, rehearsal_data)["model"]
    assert status == BLOCK and "same names and sizes" in detail and "re-run the model or restore the files" in detail
    with pytest.raises(KitError, match="re-run the model or restore the files"):
        submit.main(["--run", str(runs / "model"), "--data", str(rehearsal_data), "--dry-run", "--group", "t", "--out", str(tmp_path / "s")])
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))  # restored
    assert run_statuses(runs, rehearsal_data)["model"][0] == OK


def test_a_run_of_an_older_kit_without_a_fingerprint_is_a_warning_not_a_refusal(rehearsal_data, tmp_path, caplog):
    runs = tmp_path / "runs"
    run = make_run(rehearsal_data, runs)
    meta = json.loads((run / "meta.json").read_text())
    del meta["data_fingerprint"]
    (run / "meta.json").write_text(json.dumps(meta))
    status, detail = run_statuses(runs, rehearsal_data)["model"]
    assert status == WARN and "records no fingerprint" in detail
    with caplog.at_level(logging.WARNING):
        assert submit.main(["--run", str(run), "--data", str(rehearsal_data), "--dry-run", "--group", "t", "--out", str(tmp_path / "s")]) == 0
    assert any("records no fingerprint" in r.getMessage() for r in caplog.records)
