"""ensemble.py without --data: the data folder the runs' meta.json record gives the test column."""

from __future__ import annotations

import json
import logging

import numpy as np

import ensemble
from utils.runs.metrics import relevance_matrix
from utils.runs.similarity_io import SimMatrix, load_run, save_run


def runs_made_from(root, folders: dict[str, str], n_id: int = 8):
    """Two matrix runs as model scripts write them, each recording ``config.data``; the data folder has a ground truth."""
    rng = np.random.default_rng(0)
    vq = [f"train/id{i:02d}/real_{k}.jpg" for i in range(n_id) for k in range(2)]
    vg = [f"train/id{i:02d}/synth_{k}.png" for i in range(n_id) for k in range(2)]
    tq, tg = [f"q{i:03d}.jpg" for i in range(2 * n_id)], [f"g{i:03d}.png" for i in range(2 * n_id)]
    truth = {q: [tg[2 * (j // 2)], tg[2 * (j // 2) + 1]] for j, q in enumerate(tq)}
    rel = {"val": np.repeat(np.repeat(np.eye(n_id, dtype=bool), 2, axis=0), 2, axis=1), "test": relevance_matrix(tq, tg, truth)}
    names = {"val": (vq, vg), "test": (tq, tg)}
    for model, data in folders.items():
        sims = {s: SimMatrix((rel[s] + rng.standard_normal(rel[s].shape)).astype(np.float32), *names[s]) for s in names}
        save_run(root / "runs" / model, sims, {"model": model, "config": {"data": data}})
    (root / "data" / "test").mkdir(parents=True)
    (root / "data" / "test" / "ground_truth.json").write_text(json.dumps(truth))
    return root / "runs", root / "data"


def test_without_data_the_runs_recorded_folder_scores_test_and_one_line_names_it(tmp_path, caplog):
    data = tmp_path / "data"
    runs, _ = runs_made_from(tmp_path, {"a": str(data), "b": str(data)})
    with caplog.at_level(logging.INFO):
        assert ensemble.main(["--runs", str(runs), "--bootstrap", "5", "--no-plot"]) == 0
    assert "test" in load_run(runs / "ensemble").meta["metrics"]
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--data not given")]
    assert notes == [f"--data not given: using {data}, the data folder recorded in the runs' meta.json"]


def test_runs_from_different_folders_give_no_test_column_and_say_why(tmp_path, caplog):
    runs, data = runs_made_from(tmp_path, {"a": str(tmp_path / "data"), "b": str(tmp_path / "other")})
    with caplog.at_level(logging.INFO):
        assert ensemble.main(["--runs", str(runs), "--bootstrap", "5", "--no-plot"]) == 0
    assert "test" not in load_run(runs / "ensemble").meta["metrics"]
    assert any("record 2 data folders" in r.getMessage() and "pass --data DIR" in r.getMessage() for r in caplog.records)
    # --data given: it wins over what the runs record
    assert ensemble.main(["--runs", str(runs), "--data", str(data), "--bootstrap", "5", "--no-plot"]) == 0
    assert "test" in load_run(runs / "ensemble").meta["metrics"]
