"""Every script knows torchrun: embedding shards across ranks, rank 0 alone writes the run, and the
scripts that run as one process only refuse to start under torchrun with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import infer_caption_match
import infer_cnn_features
import infer_facenet
import train_face_adapter
import train_resnet
from utils.errors import KitError
from utils.runs.similarity_io import load_run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "test_resnet", "--weights", "none", "--img-size", "32", "--workers", "0", "--pixel-k", "0", "--device", "cpu"]


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "cache" not in p.parts}


def test_infer_cnn_features_on_two_gloo_ranks_equals_one_process_and_rank_1_writes_nothing(rehearsal_data_session, tmp_path):
    data, one, two = str(rehearsal_data_session), tmp_path / "one", tmp_path / "two"
    assert infer_cnn_features.main(["--data", data, "--runs", str(one), *TINY]) == 0
    log = tmp_path / "rank1_writes.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "tests" / "helpers" / "rank_writes.py"), str(two), str(log),
         str(ROOT / "infer_cnn_features.py"), "--data", data, "--runs", str(two), *TINY],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(log.read_text()) == []  # rank 1 opened nothing for writing under the runs folder
    assert _files(two) == _files(one)  # rank 0 wrote the same run (and the shared split)
    solo, sharded = load_run(one / "cnn_features"), load_run(two / "cnn_features")
    for split in ("val", "test"):
        a, b = solo.splits[split], sharded.splits[split]
        assert a.query_names == b.query_names and a.gallery_names == b.gallery_names
        assert np.allclose(a.sim, b.sim, atol=1e-6)
    for split, metrics in solo.meta["metrics"].items():
        assert sharded.meta["metrics"][split] == pytest.approx(metrics, abs=1e-6)


@pytest.mark.parametrize("script, argv", [
    (infer_facenet, []),
    (infer_caption_match, []),
    (train_face_adapter, []),
    (train_resnet, ["--weights", "none"]),
])
def test_single_process_scripts_refuse_torchrun_before_touching_anything(script, argv, rehearsal_data_session, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    runs = tmp_path / "runs"
    name = Path(script.__file__).name
    with pytest.raises(KitError, match=rf"^{name}: runs as one process only \(.+\); start it with python, not torchrun \(WORLD_SIZE=2\)$"):
        script.main(["--data", str(rehearsal_data_session), "--runs", str(runs), *argv])
    assert not runs.exists()


def test_the_refusal_is_one_line_and_exit_2(rehearsal_data_session, tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1"}
    proc = subprocess.run([sys.executable, "infer_facenet.py", "--data", str(rehearsal_data_session), "--runs", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: infer_facenet.py: runs as one process only")
