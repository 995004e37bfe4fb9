"""A run folder is complete and consistent or refused: a re-run killed with SIGKILL, and
ensemble.py leaving out (with a reason) every run it cannot trust."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ensemble
from tests.helpers.paths import ROOT
from tests.helpers.processes import lines_until
from utils.data.layout import load_layout
from utils.errors import KitError
from utils.runs.similarity_io import SimMatrix, invalidate_run, load_run, save_run

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TIMM_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def complete_run(data: Path, run_dir: Path, seed: int, query_names: list[str] | None = None) -> Path:
    """A complete run folder (as a model script leaves it) on the data's test names."""
    layout = load_layout(data)
    q, g = query_names or [p.name for p in layout.query], [p.name for p in layout.gallery]
    vq = [f"train/id{i:02d}/q{i}.png" for i in range(8)]
    vg = [f"train/id{j % 8:02d}/g{j}.png" for j in range(16)]
    rng = np.random.default_rng(seed)
    return save_run(run_dir, {
        "val": SimMatrix(rng.normal(size=(len(vq), len(vg))).astype(np.float32), vq, vg),
        "test": SimMatrix(rng.normal(size=(len(q), len(g))).astype(np.float32), q, g),
    }, {"model": run_dir.name})


# train_resnet.py as a model script runs, except that once epoch 1's checkpoints are saved (as epoch 2 begins) it
# says so on stdout and waits, holding the run folder as a training run does, until it is killed: the kill always
# lands mid-run, however slow or fast the machine. Its one seam is the Trainer's public on_epoch callback.
HELD_AFTER_EPOCH_1 = """
import os, sys
import train_resnet
from utils.training.loop import Trainer

fit = Trainer.fit


def fit_then_hold(self, loader, on_epoch=None):
    def hold(epoch):
        if epoch == 1:
            print("epoch 1 saved", flush=True)
            sys.stdin.read()  # returns only when the test is gone; never goes on training
            os._exit(3)
        if on_epoch is not None:
            on_epoch(epoch)
    return fit(self, loader, hold)


Trainer.fit = fit_then_hold
sys.exit(train_resnet.main(sys.argv[1:]))
"""


def kill_once_training(argv: list[str], log: Path) -> None:
    """Run ``train_resnet.py argv``; SIGKILL it once it has saved epoch 1's checkpoint (training has begun)."""
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", HELD_AFTER_EPOCH_1, *argv], cwd=ROOT, env=ENV, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            lines_until(proc, "epoch 1 saved", stream=proc.stdout)
            proc.send_signal(signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-2000:]


@pytest.mark.slow
def test_killed_rerun_is_left_out_and_cannot_be_submitted(rehearsal_data_session, tmp_path, caplog):
    data, runs = rehearsal_data_session, tmp_path / "runs"
    complete_run(data, runs / "resnet", seed=0)  # the earlier, complete run of the same model
    complete_run(data, runs / "clip", seed=1)
    before = load_run(runs / "resnet")
    assert not (runs / "resnet" / "last.pt").exists()

    kill_once_training(["--data", str(data), "--runs", str(runs), "--model", "resnet18", "--weights", "none",
                        "--img-size", "32", "--epochs", "3", "--batch-size", "16", "--workers", "0"], tmp_path / "train.log")
    assert (runs / "resnet" / "last.pt").is_file()  # killed with training under way
    # the old matrices are still on disk beside the new checkpoint ...
    assert np.array_equal(np.load(runs / "resnet" / "test_sim.npy"), before.splits["test"].sim)

    # ... but ensemble.py leaves the folder out, says why, and fuses the complete run
    with caplog.at_level(logging.WARNING):
        assert ensemble.main(["--runs", str(runs), "--bootstrap", "5", "--no-plot"]) == 0
    assert f"leaving out {runs / 'resnet'}: {runs / 'resnet' / 'meta.json'}: not found; the run is incomplete" in caplog.text
    assert load_run(runs / "ensemble").meta["choice"]["models"] == ["clip"]
    with pytest.raises(KitError, match="--models resnet: .*meta.json: not found; the run is incomplete"):
        ensemble.main(["--runs", str(runs), "--models", "resnet", "clip"])

    # ... and submit.py refuses it with one line, exit 2
    res = subprocess.run([sys.executable, "submit.py", "--run", str(runs / "resnet"), "--group", "team",
                          "--dry-run", "--out", str(tmp_path / "subs")], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "meta.json: not found; the run is incomplete" in lines[0]
    assert not (tmp_path / "subs").exists()


def test_ensemble_says_which_runs_it_leaves_out_and_why(rehearsal_data_session, tmp_path, caplog):
    data, runs = rehearsal_data_session, tmp_path / "runs"
    for i, name in enumerate(("a", "b", "killed", "tampered")):
        complete_run(data, runs / name, seed=i)
    stale_queries = [p.name for p in load_layout(data).query][:-1] + ["gone.jpg"]
    complete_run(data, runs / "old_data", seed=9, query_names=stale_queries)
    invalidate_run(runs / "killed")
    (runs / "tampered" / "test_sim.npy").write_bytes((runs / "a" / "test_sim.npy").read_bytes())
    with caplog.at_level(logging.WARNING):
        assert ensemble.main(["--runs", str(runs), "--bootstrap", "5", "--no-plot", "--grid-step", "0.5"]) == 0
    assert sorted(load_run(runs / "ensemble").meta["choice"]["models"]) == ["a", "b"]
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("leaving out")]
    assert len(warnings) == 3
    assert any("killed" in w and "the run is incomplete" in w for w in warnings)
    assert any("tampered/test_sim.npy: does not match the sha256" in w and "written by another run" in w for w in warnings)
    assert any("old_data: its test query names differ" in w and "extra ['gone.jpg']" in w for w in warnings)
    with pytest.raises(KitError, match=r"--models tampered: .*test_sim.npy: does not match the sha256"):
        ensemble.main(["--runs", str(runs), "--models", "a", "tampered"])


@pytest.mark.parametrize("damage,problem", [
    (b'{"model": "\xff\xfe', r"not valid JSON \('utf-8' codec can't decode byte 0xff"),
    (b"[" * 100_000 + b"]" * 100_000, r"not valid JSON \(nested too deep to read\)"),
])
def test_a_damaged_meta_json_is_left_out_or_one_line_in_every_reader(damage, problem, rehearsal_data_session, tmp_path,
                                                                     caplog, capsys):
    """A meta.json with bytes that are not UTF-8, or nested past the JSON parser's depth: ensemble.py, preflight.py,
    submit.py and visualize.py died with a UnicodeDecodeError or RecursionError traceback. Now ensemble.py leaves the
    run out naming the file, preflight blocks on it, and a script pointed at that run stops with one line."""
    import preflight
    import submit
    import visualize

    data, runs = rehearsal_data_session, tmp_path / "runs"
    for i, name in enumerate(("a", "b", "damaged")):
        complete_run(data, runs / name, seed=i)
    (runs / "damaged" / "meta.json").write_bytes(damage)
    with caplog.at_level(logging.WARNING):
        assert ensemble.main(["--runs", str(runs), "--bootstrap", "5", "--no-plot", "--grid-step", "0.5"]) == 0
    assert sorted(load_run(runs / "ensemble").meta["choice"]["models"]) == ["a", "b"]
    assert any(r.getMessage().startswith("leaving out") and "damaged/meta.json: not valid JSON (" in r.getMessage()
               for r in caplog.records)
    capsys.readouterr()
    assert preflight.main(["--data", str(data), "--runs", str(runs)]) == 1
    assert any("damaged" in line and "BLOCKER" in line and "meta.json: not valid JSON" in line
               for line in capsys.readouterr().out.splitlines())
    for call in (lambda: submit.main(["--run", str(runs / "damaged"), "--group", "t", "--dry-run", "--out", str(tmp_path / "s")]),
                 lambda: visualize.main(["--run", str(runs / "damaged"), "--data", str(data)])):
        with pytest.raises(KitError, match=rf"damaged/meta.json: {problem}"):
            call()
    assert not (tmp_path / "s").exists() and not (runs / "damaged" / "visual").exists()
