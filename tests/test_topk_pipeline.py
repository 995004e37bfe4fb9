"""The top-k run form end to end: model scripts past --matrix-limit -> ensemble.py over candidate
unions -> submit.py to the local server, and the same lists as the matrix form where K covers the gallery."""

from __future__ import annotations

import json

import numpy as np
import pytest

import ensemble
import infer_facenet
import submit
import train_resnet
from tests.helpers.serving import competition_server
from utils.errors import KitError
from utils.runs.similarity_io import load_run
from utils.runs.topk_run import is_topk_run, load_topk_split, topk_lists
from utils.submission.lists import top_lists

RESNET = ["--model", "test_resnet", "--weights", "none", "--img-size", "32", "--epochs", "1", "--batch-size", "16", "--workers", "0"]
DLIB = ["--embedder", "dlib", "--detector", "none", "--tta", "--workers", "0"]


@pytest.mark.slow
def test_model_runs_past_the_limit_fuse_and_submit_in_the_topk_form(rehearsal_data_session, tmp_path, capsys):
    data = str(rehearsal_data_session)
    matrix, topk = tmp_path / "matrix", tmp_path / "topk"
    assert train_resnet.main(["--data", data, "--runs", str(matrix), *RESNET]) == 0
    # same training (reused from the matrix run's folder would be another folder: train again, same seed)
    assert train_resnet.main(["--data", data, "--runs", str(topk), *RESNET, "--matrix-limit", "1", "--topk", "16"]) == 0
    assert infer_facenet.main(["--data", data, "--runs", str(topk), *DLIB, "--matrix-limit", "1", "--topk", "16"]) == 0
    run = topk / "resnet"
    assert is_topk_run(run) and not (run / "test_sim.npy").exists()
    meta = json.loads((run / "meta.json").read_text())
    assert meta["form"] == "topk" and meta["metrics"]["test"]["score"] >= 0 and meta["splits"]["test"]["files"]
    # K = 16 covers the whole 16-image test gallery: the lists equal the matrix form's
    m = load_run(matrix / "resnet").splits["test"]
    assert topk_lists(load_topk_split(run, "test")) == top_lists(m)
    assert np.isclose(meta["metrics"]["test"]["score"], load_run(matrix / "resnet").meta["metrics"]["test"]["score"])

    assert ensemble.main(["--runs", str(topk), "--bootstrap", "20", "--grid-step", "0.25"]) == 0
    fused = topk / "ensemble"
    choice = json.loads((fused / "weights.json").read_text())
    assert is_topk_run(fused) and sorted(choice["members"]) == ["dlib", "resnet"] and np.isclose(sum(choice["weights"]), 1.0)
    with pytest.raises(KitError, match="re-ranking needs full matrices"):
        ensemble.main(["--runs", str(topk), "--qe"])

    with competition_server(rehearsal_data_session) as url:
        assert submit.main(["--run", str(fused), "--url", url, "--group", "topk", "--out", str(tmp_path / "subs"), "--data", data]) == 0
    reply = json.loads(next((tmp_path / "subs").glob("*.response.json")).read_text())
    assert 0 <= reply["accuracy"] <= 1000
    assert "score:" in capsys.readouterr().out


def test_bad_form_flags_are_one_line(rehearsal_data_session, tmp_path):
    with pytest.raises(KitError, match="--matrix-limit 0"):
        train_resnet.main(["--data", str(rehearsal_data_session), "--runs", str(tmp_path), *RESNET, "--matrix-limit", "0"])
