"""day.py: the day to the dry run, resumed from its stamps, and after a real SIGTERM in a model run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import day
from tests.conftest import ROOT
from tests.helpers.processes import lines_until
from utils.errors import KitError

TINY = """
[models.a]
script = "train_resnet.py"
model = "test_resnet"
weights = "none"
img_size = 32
batch_size = 16
lr = 3e-3
workers = 0
epochs = 2

[models.b]
script = "train_resnet.py"
model = "test_resnet"
weights = "none"
img_size = 32
batch_size = 16
lr = 3e-3
workers = 0
epochs = EPOCHS_B
aug_strength = 0.5

[models.absent]
script = "train_resnet.py"
weights = "/nowhere/resnet50.safetensors"

[adapters.ghost_adapted]
script = "train_face_adapter.py"
source = "ghost"

[ensemble]
bootstrap = 20
plot = false

[visualize]
queries = 4
thumb_px = 32

[submit]
group = "tests"
"""


def recipe(tmp_path: Path, epochs_b: int = 2) -> Path:
    path = tmp_path / "day.toml"
    path.write_text(TINY.replace("EPOCHS_B", str(epochs_b)))
    return path


def day_argv(data: Path, tmp_path: Path, rec: Path) -> list[str]:
    return ["--data", str(data), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "subs"), "--recipe", str(rec)]


def last_day(runs: Path) -> dict[str, str]:
    """Stage -> status of the newest invocation in runs/day.log (its progress lines, not timings)."""
    lines = (runs / "day.log").read_text().splitlines()
    start = max(i for i, line in enumerate(lines) if " day started:" in line)
    out = {}
    for line in lines[start + 1:]:
        parts = line.split()
        if len(parts) >= 3 and parts[2] in ("ran", "reused", "skipped", "failed", "blocked", "stopped", "written"):
            out[parts[1]] = parts[2]
    return out


@pytest.mark.slow
def test_day_runs_then_reuses_then_redoes_only_a_deleted_run(rehearsal_data_session, tmp_path, one_torch_thread):
    argv, runs = day_argv(rehearsal_data_session, tmp_path, recipe(tmp_path)), tmp_path / "runs"
    assert day.main(argv) == 0
    assert last_day(runs) == {"preflight": "ran", "a": "ran", "b": "ran", "absent": "skipped", "ghost_adapted": "skipped", "ensemble": "ran",
                              "visualize": "ran", "dry-run": "ran", "submit": "stopped", "report": "written"}
    log = (runs / "day.log").read_text()
    assert "weights file /nowhere/resnet50.safetensors not found" in log and "no finished face run 'ghost'" in log
    assert (runs / "report.html").is_file() and (runs / "ensemble" / "visual" / "val.html").is_file()
    ensemble_meta = (runs / "ensemble" / "meta.json").read_bytes()

    assert day.main(argv) == 0  # again: nothing is redone
    assert last_day(runs) == {"preflight": "ran", "a": "reused", "b": "reused", "absent": "skipped", "ghost_adapted": "skipped", "ensemble": "reused",
                              "visualize": "reused", "dry-run": "reused", "submit": "stopped", "report": "written"}
    assert (runs / "ensemble" / "meta.json").read_bytes() == ensemble_meta

    import shutil

    b_meta = (runs / "b" / "meta.json").read_bytes()
    shutil.rmtree(runs / "b")  # only b and what reads it run again
    assert day.main(argv) == 0
    # a stage is redone when what it reads changed: b's re-run can write the same meta.json bytes (the same matrices
    # within the same second, with the same rounded timings, as on a fast machine), and then the ensemble is reused;
    # an ensemble that ran clears its pictures (visualize runs again), and the dry run reads the ensemble's meta.json
    ensemble = "reused" if (runs / "b" / "meta.json").read_bytes() == b_meta else "ran"
    dry = "reused" if (runs / "ensemble" / "meta.json").read_bytes() == ensemble_meta else "ran"
    assert last_day(runs) == {"preflight": "ran", "a": "reused", "b": "ran", "absent": "skipped", "ghost_adapted": "skipped", "ensemble": ensemble,
                              "visualize": ensemble, "dry-run": dry, "submit": "stopped", "report": "written"}
    assert "b                started  (redone: its output is missing or incomplete)" in (runs / "day.log").read_text()


# day.py as run on the day, except that model b, once its epoch 1 is saved (as epoch 2 begins), says so on stdout and
# waits there: the SIGTERM always lands mid-run, however slow or fast the machine (the Trainer's public on_epoch seam).
DAY_HELD_IN_B = """
import os, sys
import day
from utils.errors import run_cli
from utils.training.loop import Trainer

fit = Trainer.fit


def fit_held_in_b(self, loader, on_epoch=None):
    def hold(epoch):
        if epoch == 1 and self.run_dir.name == "b":
            print("b: epoch 1 saved", flush=True)
            sys.stdin.read()  # the SIGTERM handler raises here; returns only when the test is gone
            os._exit(3)
        if on_epoch is not None:
            on_epoch(epoch)
    return fit(self, loader, hold)


Trainer.fit = fit_held_in_b
sys.argv[0] = "day.py"
run_cli(day.main)  # as day.py's __main__ guard does: SIGTERM -> one line, exit 130
"""


@pytest.mark.slow
def test_sigterm_in_a_model_run_then_resume_gives_the_same_ensemble(rehearsal_data_session, tmp_path, one_torch_thread):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    clean.mkdir()
    killed.mkdir()
    assert day.main(day_argv(rehearsal_data_session, clean, recipe(clean, epochs_b=6))) == 0

    argv = day_argv(rehearsal_data_session, killed, recipe(killed, epochs_b=6))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TIMM_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", DAY_HELD_IN_B, *argv], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines_until(proc, "b: epoch 1 saved", stream=proc.stdout)  # b is in the middle of its training, and stays there
    assert (killed / "runs" / "b" / "last.pt").exists()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted (SIGTERM); to go on, run it again"), err[-2000:]
    log = (killed / "runs" / "day.log").read_text()
    assert "interrupted (SIGTERM)" in log and last_day(killed / "runs") == {"preflight": "ran", "a": "ran"}
    assert not (killed / "runs" / "b" / "meta.json").exists()

    assert day.main(argv) == 0  # resumes: a is reused, b runs again, then the rest
    assert last_day(killed / "runs") == {"preflight": "ran", "a": "reused", "b": "ran", "absent": "skipped", "ghost_adapted": "skipped", "ensemble": "ran",
                                         "visualize": "ran", "dry-run": "ran", "submit": "stopped", "report": "written"}
    np.testing.assert_array_equal(np.load(killed / "runs" / "ensemble" / "test_sim.npy"),
                                  np.load(clean / "runs" / "ensemble" / "test_sim.npy"))


# day.py as run on the day, held at the start of its stages until the test's SIGTERM lands (no model is trained)
DAY_HELD_AT_START = """
import sys
import day
from utils.errors import run_cli


def held(*args):
    print("day: stages started", flush=True)
    sys.stdin.read()  # the SIGTERM handler raises here; returns only when the test is gone
    raise SystemExit(3)


day.run_day = held
sys.argv[0] = "day.py"
run_cli(day.main)
"""


def test_sigterm_is_named_sigterm_in_the_line_and_the_log(tmp_path):
    """The one line on stderr and day.log both say SIGTERM (not Ctrl-C); the day's exit code stays 130."""
    (tmp_path / "data").mkdir()
    argv = day_argv(tmp_path / "data", tmp_path, recipe(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", DAY_HELD_AT_START, *argv], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines_until(proc, "day: stages started", stream=proc.stdout)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted (SIGTERM); to go on, run it again") and last.endswith(f"day.py {' '.join(argv)}"), err[-2000:]
    assert "interrupted (SIGTERM): run the same command again to resume" in (tmp_path / "runs" / "day.log").read_text()


def test_recipe_mistakes_are_one_line_errors(tmp_path, rehearsal_data_session, monkeypatch):
    monkeypatch.delenv("COMPETITION_GROUP", raising=False)
    monkeypatch.delenv("COMPETITION_URL", raising=False)
    bad = tmp_path / "bad.toml"
    cases = {
        "[models.x]\nscript = \"rm.py\"\n": "needs script = one of",
        "[models.x]\nscript = \"train_resnet.py\"\nruns = \"elsewhere\"\n": "are set by day.py",
        "[modles.x]\n": "unknown section",
        "[models.x\n": "not valid TOML",
        "[adapters.y]\nscript = \"train_face_adapter.py\"\n": "needs source",
        # failed only after every model had trained: 'resnet/meta.json: not a face run of infer_facenet.py'
        "[models.x]\nscript = \"train_resnet.py\"\n[adapters.y]\nscript = \"train_face_adapter.py\"\nsource = \"x\"\n":
            r"bad.toml: \[adapters.y\]: source = 'x' runs train_resnet.py; an adapter adapts a face run",
        "[models.x]\nscript = \"train_resnet.py\"\nimg_sise = 3\n": "rejects these flags",
        "": r"bad.toml: no \[models.NAME\] table, so the day has nothing to run",  # was: preflight, then exit 1
        "[ensemble]\n[submit]\ngroup = \"t\"\n": r"no \[models.NAME\] table",
        # were found only after every model had trained (hours on the day): now before any stage
        "[models.x]\nscript = \"train_resnet.py\"\n[ensemble]\nfusion = \"bogus\"\n[submit]\ngroup = \"t\"\n":
            r"bad.toml: \[ensemble\]: ensemble.py rejects these flags",
        "[models.x]\nscript = \"train_resnet.py\"\n[visualize]\nnope = 1\n[submit]\ngroup = \"t\"\n":
            r"bad.toml: \[visualize\]: visualize.py rejects these flags",
        "[models.x]\nscript = \"train_resnet.py\"\n[submit]\ngroup = \"t\"\ntimeout_s = \"abc\"\n":
            r"bad.toml: \[submit\]: submit.py rejects these flags",
    }
    for text, message in cases.items():
        bad.write_text(text)
        with pytest.raises(KitError, match=message):
            day.main(["--data", str(rehearsal_data_session), "--runs", str(tmp_path / "runs"), "--recipe", str(bad)])
    bad.write_text("[models.x]\nscript = \"train_resnet.py\"\n")
    with pytest.raises(KitError, match=r"--models \['y'\]: not in"):
        day.main(["--data", str(rehearsal_data_session), "--recipe", str(bad), "--models", "y"])
    with pytest.raises(KitError, match="no team name for the dry run"):
        day.main(["--data", str(rehearsal_data_session), "--recipe", str(bad)])
    with pytest.raises(KitError, match="--submit needs --url"):
        day.main(["--data", str(rehearsal_data_session), "--recipe", str(bad), "--group", "t", "--submit"])
    assert not (tmp_path / "runs").exists()  # nothing written before the recipe is sound



def test_a_recipe_run_name_that_is_no_folder_name_stops_before_the_day(tmp_path, rehearsal_data_session):
    """[models."../evil"] passed the recipe check, preflight ran, and the model stage failed at its turn
    ('--run-name ...: one folder name inside --runs') with the day's exit 1: a recipe mistake is exit 2 up front."""
    bad = tmp_path / "bad.toml"
    for name in ("../evil", "<b>x</b>", ".hidden", " x"):
        bad.write_text(f'[models."{name}"]\nscript = "train_resnet.py"\nweights = "none"\n')
        with pytest.raises(KitError, match=r"bad.toml: \[models\..*\]: NAME is the run's folder under --runs; "
                                           r"--run-name .*: one folder name inside --runs"):
            day.main(["--data", str(rehearsal_data_session), "--runs", str(tmp_path / "runs"), "--recipe", str(bad),
                      "--group", "t"])
    assert not (tmp_path / "runs").exists() and not (tmp_path / "evil").exists()


def test_a_recipe_saved_by_notepad_is_read_and_one_in_latin_1_is_one_line(tmp_path):
    """A recipe with a byte-order mark (Windows Notepad, VS Code's 'UTF-8 with BOM') read as 'not valid TOML
    (Invalid statement (at line 1, column 1))'; one in Latin-1 died with a UnicodeDecodeError traceback."""
    text = (ROOT / "recipes" / "rehearsal.toml").read_text()
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode())
    read, plain = day.load_recipe(bom, []), day.load_recipe(ROOT / "recipes" / "rehearsal.toml", [])
    assert (read.models, read.adapters, read.sections) == (plain.models, plain.adapters, plain.sections)
    assert read.sections["submit"]["group"] == "rehearsal"
    latin = tmp_path / "latin.toml"
    latin.write_bytes(text.replace('"rehearsal"', '"r\xe9hearsal"').encode("latin-1"))
    with pytest.raises(KitError, match=r"latin.toml: not UTF-8 text \(byte \d+: invalid continuation byte\); save it as UTF-8"):
        day.load_recipe(latin, [])

def test_weights_missing_decides_from_the_recipe_value(tmp_path, monkeypatch):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert day.weights_missing(day.Step("r", "train_resnet.py", {"weights": "none"})) == ""
    assert day.weights_missing(day.Step("r", "train_resnet.py", {"weights": str(f)})) == ""
    assert "not found" in day.weights_missing(day.Step("r", "train_resnet.py", {"weights": str(tmp_path / "gone.pt")}))
    assert "not in the weights folder" in day.weights_missing(day.Step("r", "train_resnet.py", {}))
    # the weights folder's copy of the default tag (python -m utils.weights fetch) makes it runnable offline
    from utils.weights.catalog import spec_of
    from utils.weights.store import write_entry

    folder = tmp_path / "weights"
    name = spec_of("timm", "resnet50", "default").name
    (folder / name).mkdir(parents=True)
    (folder / name / "model.safetensors").write_bytes(b"12345")
    write_entry(folder, name, {"path": f"{name}/model.safetensors", "files": [{"path": f"{name}/model.safetensors", "size": 5, "sha256": "x"}]})
    monkeypatch.setenv("KIT_WEIGHTS_DIR", str(folder))
    assert day.weights_missing(day.Step("r", "train_resnet.py", {})) == ""
    assert "not in the weights folder" in day.weights_missing(day.Step("r", "train_resnet.py", {"model": "resnet18"}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TIMM_OFFLINE", "0")
    assert day.weights_missing(day.Step("r", "train_resnet.py", {"weights": "default"})) == ""


def test_to_argv_spells_every_kind_of_value():
    assert day.to_argv({"img_size": 64, "amp": False, "worst": True, "tta": ["flip", "blur"], "lr": 1e-3}, "x") == [
        "--img-size", "64", "--no-amp", "--worst", "--tta", "flip", "blur", "--lr", "0.001"]
    with pytest.raises(KitError, match="a flag's value is"):
        day.to_argv({"x": {"y": 1}}, "x")


def test_a_preflight_blocker_stops_the_day_before_any_model(rehearsal_data, tmp_path):
    query = sorted((rehearsal_data / "test" / "query").iterdir())[0]
    query.write_bytes(b"not an image")  # a broken query image: no submission can be made
    runs = tmp_path / "runs"
    assert day.main(day_argv(rehearsal_data, tmp_path, recipe(tmp_path))) == 1
    assert last_day(runs) == {"preflight": "blocked"}
    assert not (runs / "a").exists() and not (runs / "ensemble").exists()
