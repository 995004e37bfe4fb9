"""train_resnet.py end to end on generated data with timm's tiny test model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

import train_resnet
from tests.helpers.paths import ROOT
from utils.embedding.backbone import create_backbone
from utils.errors import KitError
from utils.runs.similarity_io import load_run

TINY = ["--model", "test_resnet", "--weights", "none", "--img-size", "32", "--batch-size", "16",
        "--lr", "3e-3", "--workers", "0", "--tta", "flip"]


def _run(data, runs, *extra):
    assert train_resnet.main(["--data", str(data), "--runs", str(runs), *TINY, *extra]) == 0
    return load_run(runs / "resnet")


@pytest.mark.slow
def test_writes_a_valid_run_and_same_command_gives_same_npy(rehearsal_data_session, tmp_path):
    a = _run(rehearsal_data_session, tmp_path / "a", "--epochs", "2", "--max-steps", "8")
    b = _run(rehearsal_data_session, tmp_path / "b", "--epochs", "2", "--max-steps", "8")
    for split in ("val", "test"):
        assert np.array_equal(a.splits[split].sim, b.splits[split].sim)
    test = a.splits["test"]
    assert test.sim.shape == (16, 16) and test.sim.dtype == np.float32
    assert np.isfinite(test.sim).all() and np.abs(test.sim).max() <= 1 + 1e-5  # cosines
    assert a.meta["config"]["model"] == "test_resnet" and a.meta["commit"]
    assert {"val", "test"} <= set(a.meta["metrics"]) and 0 <= a.meta["metrics"]["test"]["score"] <= 1000
    losses = [h["loss"] for h in a.meta["history"]]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert (tmp_path / "a" / "resnet" / "last.pt").is_file() and (tmp_path / "a" / "resnet" / "best.pt").is_file()
    assert (tmp_path / "a" / "split.json").is_file()


@pytest.mark.slow
def test_loss_falls(rehearsal_data_session, tmp_path):
    run = _run(rehearsal_data_session, tmp_path, "--epochs", "4", "--eval-every", "0", "--aug-strength", "0")
    losses = [h["loss"] for h in run.meta["history"]]
    assert losses[-1] < losses[0] * 0.9


@pytest.mark.slow
def test_resume_continues_exactly(rehearsal_data_session, tmp_path):
    straight = _run(rehearsal_data_session, tmp_path / "s", "--epochs", "2", "--eval-every", "0")
    _run(rehearsal_data_session, tmp_path / "r", "--epochs", "1", "--eval-every", "0")
    ckpt = torch.load(tmp_path / "r" / "resnet" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["kit_version"]
    resumed = _run(rehearsal_data_session, tmp_path / "r", "--epochs", "2", "--eval-every", "0", "--resume")
    # the history covers the whole run, not just the epochs after the resume
    assert [h["epoch"] for h in resumed.meta["history"]] == [1, 2]
    assert resumed.meta["history"] == straight.meta["history"]
    assert np.array_equal(resumed.splits["test"].sim, straight.splits["test"].sim)


@pytest.mark.slow
def test_broken_training_image_is_skipped(rehearsal_data, tmp_path, caplog):
    bad = sorted((rehearsal_data / "train" / "id003").iterdir())[0]
    bad.write_bytes(bad.read_bytes()[:100])
    _run(rehearsal_data, tmp_path, "--epochs", "1", "--max-steps", "1", "--eval-every", "0")
    assert f"{bad}: cannot decode" in caplog.text


def test_two_training_identities_stop_before_training_one_class(rehearsal_data, tmp_path):
    """With 2 identities one is held out: --loss ce trained a classifier of one class without a word (val 1000.00)."""
    import shutil

    for ident in sorted((rehearsal_data / "train").iterdir())[2:]:
        shutil.rmtree(ident)
    with pytest.raises(KitError, match=r"data/train: 1 training identity with readable images once the validation split "
                                       r"holds out 1 of 2; training needs at least 2: add identities \(one is always held out\)"):
        train_resnet.main(["--data", str(rehearsal_data), "--runs", str(tmp_path), *TINY, "--epochs", "1"])
    assert not (tmp_path / "resnet" / "last.pt").exists()


def test_local_weights_file_is_loaded(rehearsal_data_session, tmp_path):
    torch.manual_seed(5)
    ref = timm.create_model("test_resnet", num_classes=0)
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    cfg = train_resnet.Config(model="test_resnet", weights=str(tmp_path / "w.pth"))
    model = create_backbone(cfg.model, cfg.weights)
    for (k, v), w in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(v, w), k


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "w.pth: weights file not found"),
        (b"garbage", "w.pth: not a readable torch checkpoint"),
        ("other", r"w.pth: only \d+ of \d+ tensors match the model"),
    ],
)
def test_bad_weights_file_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "w.pth"
    if content == "other":
        torch.save({"foo.weight": torch.zeros(3)}, path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(KitError, match=message):
        create_backbone("test_resnet", str(path))


def test_hub_weights_offline_say_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KitError, match="pass --weights PATH to a local file, or --weights none"):
        create_backbone("test_resnet", "default")


@pytest.mark.slow
def test_cli_user_errors_are_one_line_without_traceback(rehearsal_data, tmp_path):
    bad = sorted((rehearsal_data / "test" / "gallery").iterdir())[3]
    bad.write_bytes(b"")
    cases = [
        (["--data", str(tmp_path / "missing")], "missing: data folder not found"),
        (["--data", str(rehearsal_data), "--runs", str(tmp_path / "r"), "--model", "no_such_model", "--weights", "none"],
         "--model 'no_such_model': not a timm model"),
        (["--data", str(rehearsal_data), "--runs", str(tmp_path / "r")], f"{bad}: empty file"),
    ]
    for argv, message in cases:
        proc = subprocess.run([sys.executable, "train_resnet.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert proc.returncode == 2, proc.stderr
        assert len(lines) == 1 and message in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr


def test_unknown_flag_is_rejected():
    with pytest.raises(SystemExit):
        train_resnet.build_parser().parse_args(["--no-such-flag"])
    assert json.dumps(train_resnet.build_parser().parse_args([]).tta) == '["flip"]'


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["multi-similarity", "contrastive", "triplet"])
def test_pair_losses_train_the_embedding_on_m_per_class_batches(rehearsal_data_session, tmp_path, loss):
    flags = ["--loss", loss, "--m-per-class", "4", "--eval-every", "0", "--aug-strength", "0"]
    one_step = _run(rehearsal_data_session, tmp_path / "one_step", *flags, "--epochs", "1", "--max-steps", "1")
    run = _run(rehearsal_data_session, tmp_path, *flags, "--epochs", "3")
    losses = [h["loss"] for h in run.meta["history"]]
    assert len(losses) == 3 and all(np.isfinite(losses))
    if loss != "triplet":  # a semi-hard miner's triplets all lie inside the margin: their mean loss need not fall
        assert losses[-1] < losses[0]
    for split in ("val", "test"):  # the embedding itself got better at the task than after one step
        assert run.meta["metrics"][split]["map_all"] > one_step.meta["metrics"][split]["map_all"] + 0.05
    ckpt = torch.load(tmp_path / "resnet" / "last.pt", weights_only=True)
    assert "head" not in ckpt and ckpt["config"]["loss"] == loss  # no classifier: the embedding itself is trained
    with pytest.raises(KitError, match="multiple of --m-per-class 3"):
        train_resnet.main(["--data", str(rehearsal_data_session), "--runs", str(tmp_path / "x"), *TINY, "--loss", loss, "--m-per-class", "3"])
