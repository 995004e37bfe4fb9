"""Smoke test of the whole pipeline, every script's main() in order, on generated data:
three model scripts -> ensemble.py --auto -> the local server (own process) -> submit.py.
The score the server gives must be the one the ensemble measured on the same matrix."""

from __future__ import annotations

import json

import numpy as np
import pytest

import ensemble
import infer_facenet
import submit
import train_clip_arcface
import train_resnet
from tests.helpers.serving import competition_server
from tests.helpers.tiny_models import TINY_VIT
from utils.runs.similarity_io import align_runs, load_run


@pytest.mark.slow
def test_every_script_in_order_then_submit(rehearsal_data_session, tmp_path, capsys):
    data, runs = str(rehearsal_data_session), tmp_path / "runs"
    common = ["--data", data, "--runs", str(runs)]
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_VIT))

    assert train_resnet.main([*common, "--model", "test_resnet", "--weights", "none", "--img-size", "32",
                              "--epochs", "2", "--batch-size", "16", "--lr", "3e-3", "--workers", "0"]) == 0
    assert train_clip_arcface.main([*common, "--model", str(tmp_path / "tiny.json"), "--weights", "none",
                                    "--epochs", "2", "--batch-size", "16", "--embed-dim", "32", "--unfreeze", "-1",
                                    "--lr", "1e-3", "--scale", "16", "--margin-deg", "15", "--workers", "0"]) == 0
    assert infer_facenet.main([*common, "--embedder", "dlib", "--detector", "none", "--tta", "--workers", "0"]) == 0
    assert ensemble.main(["--runs", str(runs), "--data", data, "--auto", "--bootstrap", "20"]) == 0

    members = [load_run(runs / n) for n in ("resnet", "clip_arcface", "dlib")]
    align_runs(members, "test")  # the three scripts agree on names
    fused = load_run(runs / "ensemble")
    assert sorted(fused.meta["choice"]["models"]) == ["clip_arcface", "dlib", "resnet"]
    assert np.isclose(sum(fused.meta["plan"]["weights"]), 1.0)

    with competition_server(rehearsal_data_session) as url:
        code = submit.main(["--run", str(runs / "ensemble"), "--url", url, "--group", "smoke",
                            "--out", str(tmp_path / "subs"), "--data", data])
    assert code == 0
    reply = json.loads(next((tmp_path / "subs").glob("*.response.json")).read_text())
    assert np.isclose(reply["accuracy"], fused.meta["metrics"]["test"]["score"])
    assert f"score: {reply['accuracy']}" in capsys.readouterr().out
