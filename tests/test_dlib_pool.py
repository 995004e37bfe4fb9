"""dlib's face model across worker processes (utils/faces/dlib_pool.py): the same descriptors as one
process (also after the main process ran dlib's CNN detector), a dead worker is one clear error, and no
worker outlives its parent (real processes, real signals)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import infer_facenet
from utils.device import cpu_count, resolve_processes
from utils.errors import KitError
from utils.faces.crop import CropParams, face_crops
from utils.faces.detect import DetectorParams, FaceDetector
from utils.faces.embedder import build_embedder

pytest.importorskip("dlib")
CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def astronaut(tmp_path_factory) -> Path:
    from skimage import data

    path = tmp_path_factory.mktemp("pool") / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return path


@pytest.fixture(scope="module")
def chips(astronaut) -> torch.Tensor:
    """Seven different 150 px chips of a real face (skimage's astronaut): the crop, mirrored, darker, brighter, noisy,
    shifted, blurred; as the embedder takes them: (7, 3, 150, 150) float 0..255."""
    crop = face_crops([astronaut], FaceDetector(DetectorParams(), CPU), CropParams(size_px=150, aligner="dlib"), workers=0).pixels[0]
    m = (crop.shape[0] - 150) // 2  # the stored crop holds context around the 150 px chip
    crop = crop[m:m + 150, m:m + 150].astype(np.float32)
    rng = np.random.default_rng(0)
    looks = [crop, crop[:, ::-1], crop * 0.6, np.clip(crop * 1.3, 0, 255), np.clip(crop + rng.normal(0, 20, crop.shape), 0, 255),
             np.roll(crop, 6, axis=1), (crop + np.roll(crop, 1, axis=0) + np.roll(crop, 1, axis=1)) / 3]
    return torch.from_numpy(np.stack(looks).astype(np.float32)).permute(0, 3, 1, 2).contiguous()


def test_descriptors_across_processes_equal_one_process_exactly(chips):
    one = build_embedder("dlib", "default", CPU)(chips).numpy()
    assert len({tuple(np.round(r, 3)) for r in one}) == len(one)  # seven different descriptors: a real test of the order
    for processes in (2, 3):
        emb = build_embedder("dlib", "default", CPU, processes=processes)
        try:
            assert np.array_equal(emb(chips).numpy(), one)  # every chip where it was, bit for bit
            assert np.array_equal(emb(chips[:1]).numpy(), one[:1])  # fewer chips than processes
            assert emb(chips[:0]).shape == (0, 128)
            assert len(emb.pool.pids) == processes
        finally:
            emb.close()
    assert emb.pool.pids == []


def test_workers_forked_after_the_main_process_ran_dlibs_detectors_do_not_hang(chips, tmp_path):
    """The cascade runs dlib's CNN (mmod) and HOG detectors in the main process before the face run forks its
    workers; a child forked after some dlib models ran can hang (its thread pool stays behind): a subprocess, so a
    hang is a failure, not a stuck test run."""
    np.save(tmp_path / "chips.npy", chips.numpy())
    script = tmp_path / "after_detectors.py"
    script.write_text("import sys, numpy as np, torch, dlib\n"
                      "from skimage import data\n"
                      "from utils.faces.crop import face_models_file\n"
                      "from utils.faces.embedder import build_embedder\n"
                      "im = np.ascontiguousarray(data.astronaut()[::2, ::2])\n"
                      "assert len(dlib.cnn_face_detection_model_v1(str(face_models_file('mmod_human_face_detector.dat')))(im, 1)) == 1\n"
                      "dlib.get_frontal_face_detector()(im, 1)\n"
                      "chips = torch.from_numpy(np.load(sys.argv[1]))\n"
                      "one = build_embedder('dlib', 'default', torch.device('cpu'))(chips).numpy()\n"
                      "two = build_embedder('dlib', 'default', torch.device('cpu'), processes=2)(chips).numpy()\n"
                      "print('equal' if np.array_equal(one, two) else 'differ')\n")
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "chips.npy")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and done.stdout.split() == ["equal"], done.stderr[-2000:]


MMOD_SCRIPT = """
import sys
from pathlib import Path
import numpy as np, torch
from utils.faces.cascade import CascadeParams, FaceCascade
from utils.faces.dlib_pool import DlibPool
paths = sorted(Path(sys.argv[1]).glob("*.png"))
params = CascadeParams(stages=("mmod",), stage_rotations=())
pooled = FaceCascade(params, torch.device("cpu"), processes=2)
first = pooled.detect(paths, workers=0)
assert isinstance(pooled._mmod, DlibPool) and len(pooled._mmod.pids) == 2
one = FaceCascade(params, torch.device("cpu")).detect(paths, workers=0)  # in this process: no mmod worker may fork now
late = FaceCascade(params, torch.device("cpu"), processes=2)
after = late.detect(paths, workers=0)
assert not isinstance(late._mmod, DlibPool)  # it ran here instead of forking a worker that would hang
for f in ("stage", "boxes", "landmarks", "probs"):
    assert np.array_equal(getattr(first, f), getattr(one, f), equal_nan=True), f
    assert np.array_equal(getattr(after, f), getattr(one, f), equal_nan=True), f
print("found", int((one.stage >= 0).sum()), "of", len(paths))
"""


def test_the_mmod_stage_across_processes_finds_the_same_faces_and_never_forks_after_running_here(astronaut, tmp_path):
    """The cascade's mmod stage in 2 workers gives the same faces as in-process; once this process has run the CNN
    detector itself, a later cascade runs it here too (a worker forked then hangs). In a subprocess: a hang fails."""
    photo = np.asarray(Image.open(astronaut).convert("RGB"))
    small = np.asarray(Image.fromarray(photo).resize((256, 256)))
    looks = {"a_photo": small, "b_inverted": 255 - small, "c_mirrored": np.ascontiguousarray(small[:, ::-1]),
             "d_blank": np.full((120, 90, 3), 40, np.uint8)}
    for name, im in looks.items():
        Image.fromarray(im).save(tmp_path / f"{name}.png")
    (tmp_path / "check.py").write_text(MMOD_SCRIPT)
    done = subprocess.run([sys.executable, str(tmp_path / "check.py"), str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    found = int(done.stdout.split()[-3])
    assert found >= 2, done.stdout  # real faces found (not only the empty case); the blank has none


def test_a_killed_worker_is_one_clear_error_not_a_hang(chips):
    emb = build_embedder("dlib", "default", CPU, processes=2)
    emb(chips[:2])
    victim = emb.pool.pids[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while not emb.pool._executor._broken and time.monotonic() < deadline:  # the executor notices the death on its own
        time.sleep(0.05)
    with pytest.raises(KitError, match="dlib embedding process died.*--dlib-processes 1"):
        emb(chips)
    assert emb.pool.pids == []  # closed: the next batch would start a fresh pool


def _first_line(proc: subprocess.Popen, seconds: float) -> str:
    """The first line ``proc`` prints, or a failure after ``seconds`` (a hung child must not hang the suite)."""
    ready, _, _ = select.select([proc.stdout], [], [], seconds)
    assert ready, f"no line from the child in {seconds} s"
    return proc.stdout.readline()


def _state(pid: int) -> str:
    """A process's state letter ('' once it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_die_with_a_parent_killed_by_sigkill(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text("import sys, time, torch\n"
                      "from utils.faces.embedder import build_embedder\n"
                      "emb = build_embedder('dlib', 'default', torch.device('cpu'), processes=2)\n"
                      "emb(torch.full((2, 3, 150, 150), 128.0))\n"
                      "print(*emb.pool.pids, flush=True)\n"
                      "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        pids = [int(p) for p in _first_line(parent, 120).split()]
        assert len(pids) == 2 and all(_state(p) not in ("", "Z") for p in pids)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 60
    while any(_state(p) not in ("", "Z") for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_state(p) in ("", "Z") for p in pids), [(p, _state(p)) for p in pids]


def test_dlib_processes_flag(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_processes(-1) == cpu_count() and resolve_processes(3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cpu_count()))  # more torchrun ranks than cores: one each
    assert resolve_processes(-1) == 1
    for bad in (0, -2, 4 * cpu_count() + 1):
        with pytest.raises(KitError, match=f"--dlib-processes {bad}"):
            resolve_processes(bad)
    with pytest.raises(SystemExit) as exit_:
        from utils.errors import run_cli

        monkeypatch.setattr(sys, "argv", ["infer_facenet.py", "--data", str(tmp_path), "--embedder", "dlib", "--dlib-processes", "0"])
        run_cli(infer_facenet.main)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("error: --dlib-processes 0")


def test_sigterm_to_the_process_group_is_the_parents_one_line(tmp_path):
    """timeout, Slurm and systemd signal the whole process group: the workers ignore it and the run ends with
    its one line (no worker traceback), exit 143, no worker left."""
    script = tmp_path / "run.py"
    script.write_text("import time, torch\n"
                      "from utils.errors import run_cli\n"
                      "from utils.faces.embedder import build_embedder\n"
                      "def main(argv=None):\n"
                      "    emb = build_embedder('dlib', 'default', torch.device('cpu'), processes=2)\n"
                      "    emb(torch.full((2, 3, 150, 150), 128.0))\n"
                      "    print(*emb.pool.pids, flush=True)\n"
                      "    time.sleep(600)\n"
                      "run_cli(main)\n")
    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    try:
        pids = [int(p) for p in _first_line(proc, 120).split()]
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and [line for line in err.splitlines() if line.strip()] == [err.strip().splitlines()[-1]], err[-2000:]
    assert "interrupted (SIGTERM)" in err
    deadline = time.monotonic() + 60
    while any(_state(p) not in ("", "Z") for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_state(p) in ("", "Z") for p in pids)
