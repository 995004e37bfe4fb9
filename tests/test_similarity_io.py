"""Similarity matrices: atomic save, checked load (hashes), join by name, scan a runs folder."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from utils.errors import KitError
from utils.runs import similarity_io
from utils.runs.similarity_io import SimMatrix, align_runs, invalidate_run, load_run, save_run, scan_runs


def _save(path, sim_val, q=("q1", "q2"), g=tuple("abcdefghijk"), sim_test=None):
    m = SimMatrix(sim_val, list(q), list(g))
    t = m if sim_test is None else SimMatrix(sim_test, list(q), list(g))
    return save_run(path, {"val": m, "test": t}, {"model": path.name})


def _np_save_and_rehash(run_dir, name, sim):
    """Replace a matrix and its hash in meta.json, as a run that saved it would have."""
    np.save(run_dir / name, sim)
    meta = json.loads((run_dir / "meta.json").read_text())
    meta["files"][name]["sha256"] = hashlib.sha256((run_dir / name).read_bytes()).hexdigest()
    (run_dir / "meta.json").write_text(json.dumps(meta))


def test_roundtrip_and_no_temp_files_left(tmp_path):
    sim = np.random.default_rng(0).normal(size=(2, 11)).astype(np.float32)
    _save(tmp_path / "m", sim)
    run = load_run(tmp_path / "m")
    assert np.array_equal(run.splits["val"].sim, sim) and run.splits["test"].gallery_names[0] == "a"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["meta.json", "test_sim.npy", "val_sim.npy"]


def test_nan_is_refused_on_save_and_on_load(tmp_path):
    sim = np.zeros((2, 11), np.float32)
    sim[1, 3] = np.nan
    with pytest.raises(KitError, match="1 NaN or infinite"):
        _save(tmp_path / "m", sim)
    _save(tmp_path / "m", np.zeros((2, 11), np.float32))
    _np_save_and_rehash(tmp_path / "m", "val_sim.npy", sim)
    with pytest.raises(KitError, match=r"val_sim.npy: 1 NaN or infinite"):
        load_run(tmp_path / "m")


def test_shape_that_does_not_match_names_is_refused(tmp_path):
    _save(tmp_path / "m", np.zeros((2, 11), np.float32))
    _np_save_and_rehash(tmp_path / "m", "test_sim.npy", np.zeros((2, 10), np.float32))
    with pytest.raises(KitError, match=r"test_sim.npy: shape \(2, 10\) does not match its names"):
        load_run(tmp_path / "m")


def test_missing_files_are_named(tmp_path):
    with pytest.raises(KitError, match="meta.json: not found; run the model script first"):
        load_run(tmp_path / "nothing")
    _save(tmp_path / "m", np.zeros((2, 11), np.float32))
    (tmp_path / "m" / "test_sim.npy").unlink()
    (tmp_path / "m" / "meta.json").write_text((tmp_path / "m" / "meta.json").read_text())
    with pytest.raises(KitError, match="test_sim.npy: not found"):
        load_run(tmp_path / "m")


def test_align_joins_by_name_not_row_order(tmp_path):
    rng = np.random.default_rng(1)
    sim = rng.normal(size=(2, 11)).astype(np.float32)
    _save(tmp_path / "a", sim)
    g = list("abcdefghijk")
    perm = rng.permutation(11)
    _save(tmp_path / "b", sim[::-1][:, perm], q=("q2", "q1"), g=[g[j] for j in perm])
    a, b = align_runs([load_run(tmp_path / "a"), load_run(tmp_path / "b")], "val")
    assert np.array_equal(a.sim, b.sim)


def test_align_refuses_different_names(tmp_path):
    _save(tmp_path / "a", np.zeros((2, 11), np.float32))
    _save(tmp_path / "b", np.zeros((2, 11), np.float32), q=("q1", "q3"))
    with pytest.raises(KitError, match=r"val query names differ .*missing \['q2'\], extra \['q3'\]"):
        align_runs([load_run(tmp_path / "a"), load_run(tmp_path / "b")], "val")


def test_repeated_names_are_refused(tmp_path):
    _save(tmp_path / "a", np.zeros((2, 11), np.float32))
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    meta["splits"]["val"]["query_names"] = ["q1", "q1"]
    (tmp_path / "a" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(KitError, match="query names repeat"):
        load_run(tmp_path / "a")


def test_meta_records_each_matrix_hash_shape_and_dtype(tmp_path):
    _save(tmp_path / "m", np.ones((2, 11), np.float32))
    meta = json.loads((tmp_path / "m" / "meta.json").read_text())
    rec = meta["files"]["test_sim.npy"]
    assert rec["sha256"] == hashlib.sha256((tmp_path / "m" / "test_sim.npy").read_bytes()).hexdigest()
    assert rec["shape"] == [2, 11] and rec["dtype"] == "float32"


def test_a_matrix_written_by_another_run_is_refused(tmp_path):
    _save(tmp_path / "old", np.zeros((2, 11), np.float32))
    _save(tmp_path / "new", np.ones((2, 11), np.float32))
    shutil.copy(tmp_path / "old" / "test_sim.npy", tmp_path / "new" / "test_sim.npy")  # valid, finite, right shape
    with pytest.raises(KitError) as info:
        load_run(tmp_path / "new")
    msg = str(info.value)
    assert "new/test_sim.npy: does not match the sha256 in meta.json (written by another run); re-run the model" in msg
    assert "\n" not in msg


def test_a_run_without_hashes_is_refused(tmp_path):
    _save(tmp_path / "m", np.zeros((2, 11), np.float32))
    meta = json.loads((tmp_path / "m" / "meta.json").read_text())
    del meta["files"]
    (tmp_path / "m" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(KitError, match="val_sim.npy: meta.json holds no sha256 for it"):
        load_run(tmp_path / "m")


def test_nan_while_saving_writes_nothing(tmp_path):
    old = np.zeros((2, 11), np.float32)
    _save(tmp_path / "m", old)
    bad = np.ones((2, 11), np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(KitError, match="test_sim.npy: 1 NaN or infinite"):
        _save(tmp_path / "m", np.ones((2, 11), np.float32), sim_test=bad)
    run = load_run(tmp_path / "m")  # still the earlier run, whole: val not replaced beside the old test
    assert np.array_equal(run.splits["val"].sim, old) and np.array_equal(run.splits["test"].sim, old)


def test_a_failure_between_matrices_leaves_a_refused_folder(tmp_path, monkeypatch):
    _save(tmp_path / "m", np.zeros((2, 11), np.float32))
    real = similarity_io.atomic_write_bytes

    def disk_full_on_test(path, data):
        if path.name == "test_sim.npy":
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(similarity_io, "atomic_write_bytes", disk_full_on_test)
    with pytest.raises(OSError):
        _save(tmp_path / "m", np.ones((2, 11), np.float32))
    with pytest.raises(KitError, match="meta.json: not found; the run is incomplete"):
        load_run(tmp_path / "m")
    assert not list((tmp_path / "m").glob(".*.tmp"))


def test_invalidate_run_makes_the_folder_refused_until_the_next_save(tmp_path):
    _save(tmp_path / "m", np.zeros((2, 11), np.float32))
    assert invalidate_run(tmp_path / "m") is True
    assert invalidate_run(tmp_path / "m") is False
    with pytest.raises(KitError, match="meta.json: not found; the run is incomplete .*re-run the model"):
        load_run(tmp_path / "m")
    _save(tmp_path / "m", np.ones((2, 11), np.float32))
    assert load_run(tmp_path / "m").splits["test"].sim[0, 0] == 1


def test_scan_keeps_complete_agreeing_runs_and_says_why_it_leaves_out_others(tmp_path):
    runs = tmp_path / "runs"
    for name in ("a", "b", "incomplete", "tampered"):
        _save(runs / name, np.full((2, 11), 0.5, np.float32))
    _save(runs / "other_data", np.zeros((2, 11), np.float32), q=("q1", "q9"))
    invalidate_run(runs / "incomplete")
    shutil.copy(runs / "other_data" / "val_sim.npy", runs / "tampered" / "val_sim.npy")
    (runs / "face_cache").mkdir()  # a cache, not a run: not mentioned
    (runs / "face_cache" / "x.npz").write_bytes(b"")
    kept, left_out = scan_runs(runs)
    assert [r.path.name for r in kept] == ["a", "b"]
    why = {d.name: reason for d, reason in left_out}
    assert set(why) == {"incomplete", "tampered", "other_data"}
    assert "the run is incomplete" in why["incomplete"]
    assert "written by another run" in why["tampered"]
    assert "val query names differ" in why["other_data"] and "extra ['q9']" in why["other_data"]
