"""Similarity matrices: atomic save, checked load, join by name."""

from __future__ import annotations

import json

import numpy as np
import pytest

from utils.errors import KitError
from utils.runs.similarity_io import SimMatrix, align_runs, load_run, save_run


def _save(path, sim_val, q=("q1", "q2"), g=tuple("abcdefghijk")):
    m = SimMatrix(sim_val, list(q), list(g))
    return save_run(path, {"val": m, "test": m}, {"model": path.name})


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
    np.save(tmp_path / "m" / "val_sim.npy", sim)
    with pytest.raises(KitError, match=r"val_sim.npy: 1 NaN or infinite"):
        load_run(tmp_path / "m")


def test_shape_that_does_not_match_names_is_refused(tmp_path):
    _save(tmp_path / "m", np.zeros((2, 11), np.float32))
    np.save(tmp_path / "m" / "test_sim.npy", np.zeros((2, 10), np.float32))
    with pytest.raises(KitError, match=r"test_sim.npy: shape \(2, 10\) does not match its names"):
        load_run(tmp_path / "m")


def test_missing_files_are_named(tmp_path):
    with pytest.raises(KitError, match="meta.json: not found; run the model script first"):
        load_run(tmp_path / "nothing")
    _save(tmp_path / "m", np.zeros((2, 11), np.float32))
    (tmp_path / "m" / "test_sim.npy").unlink()
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
