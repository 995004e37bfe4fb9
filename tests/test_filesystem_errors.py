"""File system refusals are one line naming the path and what to do, exit 2, no temp file left:
a real file-size limit (RLIMIT_FSIZE) on a real script, a real file where a folder is expected, and
read-only / full / quota / permission refusals injected at os.open / os.write (root ignores chmod)."""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

import preflight
import visualize
from tests.helpers.runs import handmade_run
from utils.atomic import atomic_write_bytes
from utils.checklist import BLOCK, OK, Checklist
from utils.errors import FILESYSTEM_ERRORS, KitError, run_cli
from utils.machine_checks import check_disk, check_writable

ROOT = Path(__file__).resolve().parent.parent
VIS_ARGS = ["--split", "val", "--queries", "1", "--k", "3", "--thumb-px", "32"]


def _script(args: list[str], fsize_bytes: int | None = None) -> subprocess.CompletedProcess:
    def limit():
        if fsize_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_bytes, fsize_bytes))

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, preexec_fn=limit, env=env, timeout=120)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_a_file_size_limit_is_one_line_and_leaves_no_temp(rehearsal_data_session, tmp_path):
    """ulimit -f of 1 kB on a real visualize.py: its first PNG is refused with EFBIG (a traceback before)."""
    run, _, _ = handmade_run(rehearsal_data_session, tmp_path / "runs")
    out = tmp_path / "look"
    out.mkdir()
    proc = _script(["visualize.py", "--run", str(run), "--out", str(out), *VIS_ARGS], fsize_bytes=1024)
    line = _one_error_line(proc)
    assert line.startswith(f"error: {out / 'val'}/") and ".png: file too large" in line and "ulimit -f" in line
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.png"))


def test_a_file_where_a_folder_is_expected_is_one_line(rehearsal_data_session, tmp_path):
    run, _, _ = handmade_run(rehearsal_data_session, tmp_path / "runs")
    blocker = tmp_path / "look"
    blocker.write_text("not a folder")
    line = _one_error_line(_script(["visualize.py", "--run", str(run), "--out", str(blocker / "sub"), *VIS_ARGS]))
    assert line == f"error: {blocker}: a file stands where a folder is expected; move that file away or choose another path"


def _refuse_under(monkeypatch, folder: Path, code: int, where: str) -> None:
    """Make os.open (where='open') or os.write (where='write') refuse with ``code`` for files under ``folder``."""
    real_open, real_write = os.open, os.write

    def under(path) -> bool:
        return str(Path(os.fsdecode(path)).absolute()).startswith(str(folder))

    def fake_open(path, flags, mode=0o777, *, dir_fd=None):
        if where == "open" and under(path):
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    def fake_write(fd, data):
        if where == "write" and under(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(code, os.strerror(code))  # as the kernel's: no file name
        return real_write(fd, data)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "write", fake_write)


@pytest.mark.parametrize("code, where", [
    (errno.EROFS, "open"), (errno.EACCES, "open"), (errno.ENOSPC, "write"), (errno.EDQUOT, "write"), (errno.EFBIG, "write"),
])
def test_refusals_from_the_file_system_are_one_line_through_run_cli(rehearsal_data_session, tmp_path, monkeypatch, capsys, code, where):
    run, _, _ = handmade_run(rehearsal_data_session, tmp_path / "runs")
    out = tmp_path / "look"
    (out / "val").mkdir(parents=True)
    _refuse_under(monkeypatch, out, code, where)
    monkeypatch.setattr(sys, "argv", ["visualize.py", "--run", str(run), "--out", str(out), *VIS_ARGS])
    with pytest.raises(SystemExit) as done:
        run_cli(visualize.main)
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    problem, fix = FILESYSTEM_ERRORS[code]
    assert "\n" not in err and err.startswith(f"error: {out / 'val'}/")
    assert err.endswith(f": {problem}; {fix}")
    if where == "write":
        assert err.split(": ")[1].endswith(".png")  # the file being written, though the kernel's error names none
    assert not list(out.rglob("*.tmp"))


def test_run_cli_maps_a_raw_os_error_and_keeps_other_tracebacks(tmp_path, capsys):
    blocker = tmp_path / "runs"
    blocker.write_text("x")

    def mkdir_main(argv):
        (blocker / "resnet").mkdir(parents=True)  # a real ENOTDIR, not through utils.atomic

    with pytest.raises(SystemExit) as done:
        run_cli(mkdir_main)
    assert done.value.code == 2
    problem, fix = FILESYSTEM_ERRORS[errno.ENOTDIR]
    assert capsys.readouterr().err.strip() == f"error: {blocker}: {problem}; {fix}"

    def bug_main(argv):
        raise OSError(errno.ECONNRESET, "reset")

    with pytest.raises(ConnectionResetError):
        run_cli(bug_main)


def test_atomic_write_names_the_file_when_the_disk_is_full(tmp_path, monkeypatch):
    _refuse_under(monkeypatch, tmp_path, errno.ENOSPC, "write")
    with pytest.raises(KitError, match=rf"^{tmp_path / 'm.npy'}: no space left on the device; free space there") as info:
        atomic_write_bytes(tmp_path / "m.npy", b"x" * 100)
    assert list(tmp_path.iterdir()) == []
    # still an OSError with its errno, for callers that go on without a cache when the disk is full
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "m.npy")


def test_preflight_blocks_a_runs_folder_it_cannot_write(rehearsal_data_session, tmp_path, monkeypatch, capsys):
    """Today preflight said 'disk ok, ready' on a read-only runs folder."""
    runs, subs = tmp_path / "runs", tmp_path / "submissions"
    runs.mkdir()
    _refuse_under(monkeypatch, runs, errno.EROFS, "open")
    assert preflight.main(["--data", str(rehearsal_data_session), "--runs", str(runs), "--submissions", str(subs)]) == 1
    out = capsys.readouterr().out
    assert "runs writable" in out and "read-only file system" in out
    cl = Checklist()
    assert not check_writable(cl, runs, "runs")
    assert check_writable(cl, subs, "submissions")  # not there yet: made in tmp_path, which is writable
    assert [c.status for c in cl.items] == [BLOCK, OK]
    assert not list(tmp_path.glob(".preflight.*"))


def test_preflight_blocks_a_file_where_runs_should_be(tmp_path):
    (tmp_path / "runs").write_text("x")
    cl = Checklist()
    assert not check_writable(cl, tmp_path / "runs" / "sub", "runs")
    assert cl.items[0].detail.startswith(f"{tmp_path / 'runs'}: a file stands where a folder is expected")


def test_preflight_blocks_when_the_matrices_will_not_fit(rehearsal_data_session, tmp_path):
    import shutil

    from utils.machine_checks import MIN_FREE_DISK, matrix_bytes

    free = shutil.disk_usage(tmp_path).free
    q = int(free // (4 * 8 * 100_000)) + 1  # 8 runs of q x 100,000 float32: just past the real free space
    cl = Checklist()
    check_disk(cl, tmp_path, matrix_bytes([(q, 100_000)]), "8 runs")
    assert cl.items[0].status == BLOCK and "the matrices need" in cl.items[0].detail
    cl = Checklist()
    check_disk(cl, tmp_path, matrix_bytes([(10, 10)]))
    assert cl.items[0].status != BLOCK or free < MIN_FREE_DISK
