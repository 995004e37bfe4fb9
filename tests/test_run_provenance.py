"""Runs that know what they were made from, one writer per run folder, and an ensemble that never
shrinks or mixes silently. Every fault is injected for real: member files re-written, second writer
processes, writers killed with SIGKILL, temp files left by a killed process, a file-size limit."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ensemble
import submit
from tests.helpers.paths import ROOT
from tests.helpers.processes import lines_until
from tests.helpers.runs import write_runs
from utils.checklist import BLOCK, OK, Checklist
from utils.errors import KitError
from utils.file_hash import file_sha256
from utils.runs.model_run import begin_inference_run
from utils.runs.run_checks import check_runs
from utils.runs.run_lock import LOCK_NAME, acquire_run_lock, release_run_lock
from utils.runs.similarity_io import SimMatrix, invalidate_run, load_run, save_run
from utils.runs.topk_run import load_topk_split, make_topk_split, save_topk_run

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TIMM_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
FAST = ["--bootstrap", "10", "--grid-step", "0.25"]


def script(*args: str, **kw) -> subprocess.CompletedProcess:
    """Run a kit script (or ``-c CODE``) as its own process, from the repository root."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, **kw)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line a refused script ends with (exit 2, no traceback; log lines may come before)."""
    lines = proc.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert proc.returncode == 2 and errors == lines[-1:] and "Traceback" not in proc.stderr, (proc.returncode, proc.stderr[-3000:])
    return lines[-1]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def start_holder(code: str, *args: str) -> subprocess.Popen:
    """``python -c code args`` as a writer that says "held" on stdout once it holds what it holds, then waits
    for a line on stdin (:func:`let_go`); returns after the "held" line, however slow the machine."""
    holder = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=ENV, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines_until(holder, "held", stream=holder.stdout)
    except BaseException:
        holder.kill()
        holder.communicate()
        raise
    return holder


def let_go(holder: subprocess.Popen) -> tuple[int, str]:
    """Tell a holder to go on (or, if it is already dead, collect it); its exit code and stderr."""
    if holder.poll() is None and not holder.stdin.closed:
        _, err = holder.communicate("go\n", timeout=300)
    else:
        holder.kill()
        _, err = holder.communicate()
    return holder.returncode, err


def rerun(run_dir: Path, seed: int) -> None:
    """Re-write a complete run in ``run_dir`` with other matrices, as a model script's --retrain does."""
    old = load_run(run_dir)
    rng = np.random.default_rng(seed)
    save_run(run_dir, {s: SimMatrix(rng.standard_normal(m.sim.shape).astype(np.float32), m.query_names, m.gallery_names)
                       for s, m in old.splits.items()}, {"model": run_dir.name})


# ------------------------------------------------------------------ point 2: a stale ensemble is refused
def test_the_file_hash_streams_a_file_over_many_reads_and_names_a_missing_one(tmp_path):
    """One helper (utils/file_hash.py) hashes member files, top-k files and preflight's duplicates."""
    big = tmp_path / "big.bin"
    data = np.random.default_rng(0).bytes(5 * (1 << 20) + 17)  # several read buffers, and a ragged tail
    big.write_bytes(data)
    (tmp_path / "empty.bin").write_bytes(b"")
    assert file_sha256(big) == hashlib.sha256(data).hexdigest()
    assert file_sha256(tmp_path / "empty.bin") == hashlib.sha256(b"").hexdigest()
    with pytest.raises(FileNotFoundError):  # check_members tells "missing" from "cannot be read" by this
        file_sha256(tmp_path / "gone.bin")


def test_an_ensemble_whose_member_was_rerun_is_refused_by_submit_and_preflight(tmp_path):
    runs, _ = write_runs(tmp_path)
    assert ensemble.main(["--runs", str(runs), *FAST]) == 0
    meta = json.loads((runs / "ensemble" / "meta.json").read_text())
    recorded = {m["name"]: m["files"] for m in meta["members"]}
    assert meta["fused"] is True and recorded["a"] == {f: sha(runs / "a" / f) for f in ("val_sim.npy", "test_sim.npy")}
    cl = Checklist()
    check_runs(cl, runs, None)
    assert _items(cl)[("runs", "ensemble")][0] == OK and "members unchanged" in _items(cl)[("runs", "ensemble")][1]
    subs = tmp_path / "subs"
    assert submit.main(["--run", str(runs / "ensemble"), "--group", "t", "--dry-run", "--out", str(subs)]) == 0

    rerun(runs / "a", seed=9)  # train_resnet.py --retrain: a new, complete, self-consistent run a
    proc = script("submit.py", "--run", str(runs / "ensemble"), "--group", "t", "--dry-run", "--out", str(subs))
    line = one_error_line(proc)
    assert "member 'a' changed since it was fused" in line and f"{runs / 'a' / 'test_sim.npy'} changed" in line
    cl = Checklist()
    check_runs(cl, runs, None)
    blocked = [(k, v) for k, v in _items(cl).items() if v[0] == BLOCK]
    assert [k for k, _ in blocked] == [("runs", "ensemble")] and "member 'a'" in blocked[0][1][1]
    # the re-run ensemble is fresh again
    assert ensemble.main(["--runs", str(runs), *FAST]) == 0
    assert load_run(runs / "ensemble").meta["members"][0]["files"]["test_sim.npy"] == sha(runs / "a" / "test_sim.npy")


def test_an_ensemble_whose_member_is_gone_and_an_old_one_without_hashes_are_refused(tmp_path):
    runs, _ = write_runs(tmp_path)
    assert ensemble.main(["--runs", str(runs), *FAST]) == 0
    (runs / "b" / "test_sim.npy").unlink()
    with pytest.raises(KitError, match=r"member 'b' changed since it was fused: .*test_sim.npy is missing"):
        load_run(runs / "ensemble")
    meta = json.loads((runs / "ensemble" / "meta.json").read_text())
    for m in meta["members"]:
        del m["files"]  # as the previous kit wrote it
    (runs / "ensemble" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(KitError, match="records no hashes of its members"):
        load_run(runs / "ensemble")


def _items(cl: Checklist) -> dict:
    return {(c.group, c.name): (c.status, c.detail) for c in cl.items}


def topk_runs(root: Path, models=("p", "q"), n_id: int = 10) -> Path:
    """Runs in the top-k form: val names train/<identity>/<image>, embeddings with an identity signal."""
    runs = root / "runs"
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((n_id, 8)).astype(np.float32)
    vq = [f"train/id{i:02d}/real_{k}.jpg" for i in range(n_id) for k in range(2)]
    vg = [f"train/id{i:02d}/synth_{k}.png" for i in range(n_id) for k in range(2)]
    tq, tg = [f"q{i:03d}.jpg" for i in range(2 * n_id)], [f"g{i:03d}.png" for i in range(2 * n_id)]
    ident = np.repeat(np.arange(n_id), 2)
    for name in models:
        emb = lambda: centres[ident] + rng.standard_normal((2 * n_id, 8)).astype(np.float32)  # noqa: E731
        splits = {s: make_topk_split(emb(), emb(), q, g, k=12) for s, (q, g) in {"val": (vq, vg), "test": (tq, tg)}.items()}
        save_topk_run(runs / name, splits, {"model": name})
    return runs


def test_a_topk_ensemble_records_its_members_and_refuses_a_changed_one(tmp_path):
    runs = topk_runs(tmp_path)
    assert ensemble.main(["--runs", str(runs), *FAST]) == 0
    meta = json.loads((runs / "ensemble" / "meta.json").read_text())
    assert [m["name"] for m in meta["members"]] == ["p", "q"] and meta["members"][1]["files"]["test_topk_idx.npy"] == sha(runs / "q" / "test_topk_idx.npy")
    load_topk_split(runs / "ensemble", "test", with_embeddings=False)
    save_topk_run(runs / "q", {s: load_topk_split(runs / "p", s) for s in ("val", "test")}, {"model": "q"})  # q re-run
    proc = script("submit.py", "--run", str(runs / "ensemble"), "--group", "t", "--dry-run", "--out", str(tmp_path / "subs"))
    assert "member 'q' changed since it was fused" in one_error_line(proc)


# ------------------------------------------------------------------ point 6: one writer per run folder
HOLD = """
import sys, pathlib
from utils.runs.similarity_io import invalidate_run
invalidate_run(pathlib.Path(sys.argv[1]))  # what every model script calls as it begins writing its run folder
print("held", flush=True)
sys.stdin.readline()  # "go", or the test is gone
"""

HOLD_ENSEMBLE = """
import sys
import ensemble
real_save = ensemble.save_run
def save_when_told(*args, **kw):
    print("held", flush=True)
    sys.stdin.readline()  # "go", or the test is gone
    return real_save(*args, **kw)
ensemble.save_run = save_when_told
sys.exit(ensemble.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_second_ensemble_writer_stops_with_one_line_naming_the_holder(tmp_path):
    runs, _ = write_runs(tmp_path)
    holder = start_holder(HOLD_ENSEMBLE, "--runs", str(runs), *FAST)
    try:
        line = one_error_line(script("ensemble.py", "--runs", str(runs), *FAST))
        assert f"{runs / 'ensemble'}: in use by pid {holder.pid} on " in line and "-c" in line
        lock = json.loads((runs / "ensemble" / LOCK_NAME).read_text())
        assert lock["pid"] == holder.pid and lock["host"] and lock["command"]
        code, err = let_go(holder)
        assert code == 0, err[-2000:]
    finally:
        let_go(holder)
    assert not (runs / "ensemble" / LOCK_NAME).exists()  # released once written
    load_run(runs / "ensemble")


@pytest.mark.slow
def test_model_scripts_and_the_training_loop_are_refused_while_another_process_writes_the_run(tmp_path):
    runs, data = write_runs(tmp_path)
    holder = start_holder(HOLD, str(runs / "a"))
    try:
        # a real model script, second writer of runs/a
        line = one_error_line(script("train_resnet.py", "--data", str(data), "--runs", str(runs), "--run-name", "a", "--workers", "0"))
        assert f"in use by pid {holder.pid}" in line
        # begin_inference_run (every inference script) and the training loop, in this process
        cfg = type("Cfg", (), {"runs": runs, "run_name": "a", "device": "cpu", "seed": 0, "deterministic": False, "dist_timeout_min": 60.0})()
        with pytest.raises(KitError, match=f"in use by pid {holder.pid}"):
            begin_inference_run(cfg)
        from tests.helpers.toy_training import toy_trainer

        with pytest.raises(KitError, match=f"in use by pid {holder.pid}"):
            toy_trainer(runs / "a")
        assert not (runs / "a" / "last.pt").exists()
    finally:
        let_go(holder)
    assert not (runs / "a" / LOCK_NAME).exists()  # the holder exited: atexit released it


def test_the_lock_of_a_killed_writer_is_taken_over(tmp_path):
    run_dir = tmp_path / "runs" / "a"
    holder = start_holder(HOLD, str(run_dir))
    try:
        with pytest.raises(KitError, match=f"in use by pid {holder.pid}"):
            acquire_run_lock(run_dir)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    finally:
        let_go(holder)
    assert holder.returncode == -signal.SIGKILL
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == holder.pid  # left behind by the killed process
    assert acquire_run_lock(run_dir) is True
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == os.getpid()
    release_run_lock(run_dir)
    assert not (run_dir / LOCK_NAME).exists()


# ------------------------------------------------------------------ point 8: mixed run forms
@pytest.mark.slow
def test_a_matrix_run_and_a_topk_run_are_refused_in_one_line_not_dropped(tmp_path):
    runs = topk_runs(tmp_path, models=("p",))
    write_runs(tmp_path, models=(("a", 1.5),))
    line = one_error_line(script("ensemble.py", "--runs", str(runs), *FAST))
    assert f"{runs / 'p'}: is in the top-k form and {runs / 'a'} in the matrix form" in line
    assert not (runs / "ensemble" / "meta.json").exists()
    with pytest.raises(KitError, match="top-k form"):
        ensemble.main(["--runs", str(runs), "--models", "a", "p", *FAST])
    assert ensemble.main(["--runs", str(runs), "--models", "p", *FAST]) == 0  # one form, chosen: fused, recorded
    assert [m["name"] for m in json.loads((runs / "ensemble" / "meta.json").read_text())["members"]] == ["p"]


# ------------------------------------------------------------------ point 9: --out and fused runs
@pytest.mark.slow
def test_out_may_not_name_a_member_or_a_model_run(tmp_path):
    runs, _ = write_runs(tmp_path, models=(("a", 1.5), ("b", 1.0), ("c", 0.5)))
    before = {f: sha(runs / "a" / f) for f in ("meta.json", "test_sim.npy")}
    line = one_error_line(script("ensemble.py", "--runs", str(runs), "--out", str(runs / "a"), *FAST))
    assert f"--out {runs / 'a'}: holds a model's run" in line
    with pytest.raises(KitError, match="is the member run a"):
        ensemble.main(["--runs", str(runs), "--models", "a", "b", "--out", str(runs / "a"), *FAST])
    with pytest.raises(KitError, match="holds a model's run"):
        ensemble.main(["--runs", str(runs), "--models", "a", "b", "--out", str(runs / "c"), *FAST])
    assert {f: sha(runs / "a" / f) for f in before} == before


def test_a_fused_run_inside_runs_is_never_fused_again(tmp_path):
    runs, _ = write_runs(tmp_path)
    assert ensemble.main(["--runs", str(runs), "--out", str(runs / "ens2"), *FAST]) == 0
    assert ensemble.main(["--runs", str(runs), *FAST]) == 0
    assert [m["name"] for m in load_run(runs / "ensemble").meta["members"]] == ["a", "b"]
    with pytest.raises(KitError, match="ens2 is a fused run"):
        ensemble.main(["--runs", str(runs), "--models", "a", "ens2", *FAST])
    assert ensemble.main(["--runs", str(runs), "--out", str(runs / "ens2"), *FAST]) == 0  # replacing a fused run is fine


# ------------------------------------------------------------------ point 14: temp files of killed writers
KILLED_WRITE = """
import os, sys, pathlib
from utils.atomic import atomic_write_bytes
held = pathlib.Path(sys.argv[1])
def stop(fd):
    held.touch()
    os.kill(os.getpid(), 9)  # killed in the middle of the write, before the rename
os.fsync = stop
atomic_write_bytes(sys.argv[2], b"x" * 4096)
"""


def killed_temp(tmp_path: Path, target: Path) -> Path:
    """The temp file a real writer process leaves when SIGKILLed before its rename, aged past the cleaner's 60 s."""
    held = tmp_path / f"held_{target.parent.name}"
    proc = script("-c", KILLED_WRITE, str(held), str(target))
    assert proc.returncode == -signal.SIGKILL and held.exists(), proc.stderr
    (tmp,) = target.parent.glob(f".{target.name}.*.tmp")
    old = time.time() - 3600
    os.utime(tmp, (old, old))  # a writer still at work keeps a fresh temp; this one is an hour old
    return tmp


def test_temps_of_killed_writers_are_cleaned_in_runs_cache_and_ensemble(tmp_path):
    runs, _ = write_runs(tmp_path)
    left = [killed_temp(tmp_path, runs / "split.json"), killed_temp(tmp_path, runs / "ensemble" / "test_sim.npy"),
            killed_temp(tmp_path, runs / "a" / "cache" / "emb_x.npy")]
    fresh = runs / ".split.json.live.tmp"
    fresh.write_bytes(b"a writer at work")
    assert ensemble.main(["--runs", str(runs), *FAST]) == 0
    assert not left[0].exists() and not left[1].exists() and fresh.exists()
    invalidate_run(runs / "a")  # a model script beginning its re-run of runs/a
    assert not left[2].exists()
    release_run_lock(runs / "a")
    # an --out outside the runs folder: the folder above it is not the kit's to clean
    theirs = killed_temp(tmp_path, tmp_path / "elsewhere" / "notes.txt")
    assert ensemble.main(["--runs", str(runs), "--out", str(tmp_path / "elsewhere" / "ens"), *FAST]) == 0
    assert theirs.exists()


# ------------------------------------------------------------------ point 16: the ensemble never shrinks silently
KILLED_RERUN = """
import os, sys
from utils.runs.similarity_io import invalidate_run
invalidate_run(sys.argv[1])  # a model re-run begins...
os.kill(os.getpid(), 9)      # ...and is killed
"""


@pytest.mark.slow
def test_an_ensemble_is_not_replaced_without_a_member_that_is_now_incomplete(tmp_path):
    runs, _ = write_runs(tmp_path)
    assert ensemble.main(["--runs", str(runs), *FAST]) == 0
    out = runs / "ensemble"
    good = sha(out / "test_sim.npy")
    assert script("-c", KILLED_RERUN, str(runs / "b")).returncode == -signal.SIGKILL
    line = one_error_line(script("ensemble.py", "--runs", str(runs), "--auto", *FAST))
    assert f"{runs / 'b'}: used by the current ensemble in {out} but now left out" in line and "--allow-missing" in line
    assert sha(out / "test_sim.npy") == good and json.loads((out / "meta.json").read_text())["members"][1]["name"] == "b"
    with pytest.raises(KitError, match="member 'b' changed since it was fused"):  # kept, but never submitted as it is
        load_run(out)
    proc = script("ensemble.py", "--runs", str(runs), "--allow-missing", *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("left out: b (")
    assert [m["name"] for m in load_run(out).meta["members"]] == ["a"]


def test_a_rerun_clears_the_old_artefacts_and_says_nothing_was_left_out(tmp_path, capsys):
    runs, _ = write_runs(tmp_path)
    assert ensemble.main(["--runs", str(runs), *FAST]) == 0
    out = runs / "ensemble"
    (out / "visual").mkdir()
    (out / "visual" / "q0.png").write_bytes(b"png")
    (out / "notes.txt").write_text("mine")
    assert (out / "simplex.png").exists()
    capsys.readouterr()
    assert ensemble.main(["--runs", str(runs), "--models", "a", *FAST]) == 0  # one model: no simplex
    assert capsys.readouterr().out.strip().splitlines()[-1] == "left out: none"
    assert not (out / "simplex.png").exists() and not (out / "visual").exists() and (out / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------ point 7: file-size limit
def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))


@pytest.mark.slow
def test_ensemble_under_a_file_size_limit_is_one_line(tmp_path):
    runs, _ = write_runs(tmp_path, n_id=30)  # matrices of 60 x 60 float32: 14 kB each
    proc = script("ensemble.py", "--runs", str(runs), "--no-plot", *FAST, preexec_fn=_limit_file_size)
    line = one_error_line(proc)
    assert "file too large" in line.lower() and str(runs / "ensemble") in line and line.count("error:") == 1
    assert not (runs / "ensemble" / "meta.json").exists() and not list((runs / "ensemble").glob(".*.tmp"))


@pytest.mark.slow
def test_a_run_still_being_written_is_named_with_its_writer_when_left_out(tmp_path):
    runs, _ = write_runs(tmp_path, models=(("a", 1.5), ("b", 1.0), ("c", 0.5)))
    holder = start_holder(HOLD, str(runs / "c"))
    try:
        proc = script("ensemble.py", "--runs", str(runs), *FAST)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip().splitlines()[-1].startswith(f"left out: c (still being written by pid {holder.pid} on ")
        cl = Checklist()
        check_runs(cl, runs, None)
        assert _items(cl)[("runs", "c")][1].startswith(f"being written by pid {holder.pid}")
    finally:
        let_go(holder)


def test_out_may_not_hold_the_runs_folder(tmp_path):
    runs, _ = write_runs(tmp_path)
    for out in (runs, tmp_path):
        with pytest.raises(KitError, match="holds the runs folder"):
            ensemble.main(["--runs", str(runs), "--out", str(out), *FAST])
    assert not (runs / "val_sim.npy").exists()
