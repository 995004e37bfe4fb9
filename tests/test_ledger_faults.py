"""The write-ahead ledger under real faults: Ctrl-C (a real SIGINT) and a kill while the server holds
the reply, the disk filling before and after the POST, a file-size limit and a read-only --out in a
real submit.py process, and a torn last line written by hand."""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import submit
from tests.helpers.paths import ROOT
from tests.helpers.processes import default_sigint
from tests.helpers.runs import make_run
from tests.helpers.serving import HOLD_S, local_server
from utils.errors import KitError
from utils.file_hash import file_sha256
from utils.runs import ledger


@pytest.fixture
def run_dir(rehearsal_data_session, tmp_path):
    return make_run(rehearsal_data_session, tmp_path / "runs")


def submit_args(run_dir: Path, url: str, out: Path) -> list[str]:
    return ["--run", str(run_dir), "--url", url, "--group", "t", "--out", str(out), "--retries", "0", "--timeout-s", "60"]


def history(out: Path, capsys) -> str:
    capsys.readouterr()
    assert submit.main(["--history", "--out", str(out)]) == 0
    return " ".join(capsys.readouterr().out.split())  # rich may wrap a cell; compare words


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_a_signal_while_the_server_holds_the_reply_leaves_an_unknown_attempt(sig, run_dir, tmp_path, capsys):
    out = tmp_path / "s"
    with local_server(hold=True) as (srv, url):
        proc = subprocess.Popen([sys.executable, "submit.py", *submit_args(run_dir, url, out)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
        try:
            assert srv.got_body.wait(HOLD_S), "the server never got the body"
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    [entry] = ledger.read(out)
    assert entry.outcome == ledger.UNKNOWN and entry.number == 1
    assert entry.record["sha256"] == file_sha256(entry.body)
    assert json.loads(Path(entry.body).read_bytes()) == json.loads(srv.bodies[0])  # the attempt names what was sent
    if sig == signal.SIGINT:
        assert "may hold the body" in err and "--resend 1 --force" in err and "Traceback" not in err
        assert "submit.py --history" in err and "run it again" not in err  # never "run it again": it would count twice
    shown = history(out, capsys)
    assert "unknown: check the leaderboard" in shown and "1 attempt(s)" in shown


def _enospc_once_the_server_has_the_body(monkeypatch, srv) -> None:
    """``os.write`` and ``os.fsync`` fail with ENOSPC from the moment the server has the body."""
    real_write, real_fsync = os.write, os.fsync

    def full(real):
        def call(*args):
            if srv.got_body.is_set():
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(*args)
        return call

    monkeypatch.setattr(os, "write", full(real_write))
    monkeypatch.setattr(os, "fsync", full(real_fsync))


def test_disk_full_after_the_post_still_shows_the_score(run_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "s"
    with local_server(reply=b'{"accuracy": 912.5, "rank": 3}') as (srv, url):
        _enospc_once_the_server_has_the_body(monkeypatch, srv)
        code = submit.main(submit_args(run_dir, url, out))
        monkeypatch.undo()
    assert code == 0  # the server scored it: sending it again would count twice
    shown = capsys.readouterr().out
    assert "score: 912.5" in shown and "rank" in shown
    [line] = [ln for ln in shown.splitlines() if "could not be written" in ln]
    assert "ledger.jsonl" in line and "no space left" in line and "entry 1 as unknown" in line and "reply file" in line
    assert not list(out.glob("*.response.json")) and not list(out.glob(".*.tmp"))
    [entry] = ledger.read(out)  # the attempt line went out before the POST
    assert entry.outcome == ledger.UNKNOWN
    assert "unknown: check the leaderboard" in history(out, capsys)


def test_disk_full_before_the_post_sends_nothing(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "s"
    real_write = os.write

    def full(fd, data):  # the disk fills as the ledger is written (the body, written before it, went out whole)
        if os.readlink(f"/proc/self/fd/{fd}").endswith(ledger.LEDGER_NAME):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    with local_server() as (srv, url):
        monkeypatch.setattr(ledger.os, "write", full)
        with pytest.raises(KitError, match=r"ledger.jsonl: cannot write the ledger, so nothing was sent \(no space left"):
            submit.main(submit_args(run_dir, url, out))
        monkeypatch.undo()
        assert srv.bodies == []  # no record, no POST


@pytest.mark.parametrize("torn", [b'{"kind": "attempt", "id": "x", "ti', b'{"torn'], ids=["attempt", "short"])
def test_a_torn_last_line_never_swallows_the_next_entry(torn, run_dir, tmp_path, capsys):
    out = tmp_path / "s"
    assert submit.main(["--run", str(run_dir), "--group", "t", "--out", str(out), "--dry-run"]) == 0
    with open(out / ledger.LEDGER_NAME, "ab") as f:
        f.write(torn)  # a kill mid-write: no newline at the end
    with local_server() as (srv, url):
        assert submit.main(submit_args(run_dir, url, out)) == 0
    entries = ledger.read(out)
    assert [(e.number, e.outcome, e.record["score"]) for e in entries] == [(1, "dry-run", None), (2, "submitted", 1000.0)]
    lines = (out / ledger.LEDGER_NAME).read_bytes().split(b"\n")
    assert lines[1] == torn and json.loads(lines[2])["kind"] == "attempt" and json.loads(lines[3])["kind"] == "outcome"
    assert "2 attempt(s)" in history(out, capsys)


def _run_submit(args: list[str], preamble: str = "", fsize: int | None = None) -> subprocess.CompletedProcess:
    """submit.py in its own process, after ``preamble`` (Python) and under a file-size limit of ``fsize`` bytes."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    code = f"import runpy, sys\n{preamble}\nsys.argv = ['submit.py', *sys.argv[1:]]\nrunpy.run_path('submit.py', run_name='__main__')\n"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          preexec_fn=limit if fsize is not None else None)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The ``error:`` lines of a run, after checking that it printed no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


READ_ONLY = """
import errno, os
def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(args[0]))
os.mkdir = read_only
os.open = read_only
"""


@pytest.mark.parametrize("fault", ["file-size limit", "read-only"])
def test_out_that_cannot_be_written_is_one_line(fault, run_dir, tmp_path):
    out = tmp_path / "s"
    if fault == "read-only":
        proc = _run_submit(["--run", str(run_dir), "--group", "t", "--out", str(out), "--dry-run"], preamble=READ_ONLY)
        expected = f"error: {out}: cannot write the submission body (the file system is read-only: pass a writable --out)"
    else:
        out.mkdir()
        proc = _run_submit(["--run", str(run_dir), "--group", "t", "--out", str(out), "--dry-run"], fsize=1000)
        # the write itself fails here, so the line names the body file inside --out
        expected = rf"error: {re.escape(str(out))}/\d{{8}}T\d{{6}}_\d{{6}}Z\.json: cannot write the submission body \(file too large \(a file-size limit, see ulimit -f\)"
    assert proc.returncode == 2, proc.stderr
    [line] = error_lines(proc)
    assert re.match(expected, line) if fault != "read-only" else line.startswith(expected), line
    assert not out.exists() or not list(out.iterdir())  # nothing half-written, no temp file


def test_a_file_size_limit_at_the_ledger_sends_nothing(run_dir, tmp_path):
    out = tmp_path / "s"
    assert submit.main(["--run", str(run_dir), "--group", "t", "--out", str(out), "--dry-run"]) == 0
    body_size = Path(ledger.read(out)[0].body).stat().st_size
    path = out / ledger.LEDGER_NAME
    dry_line = path.read_bytes()
    path.write_bytes(dry_line * (body_size // len(dry_line) + 1))  # a ledger longer than a body
    before = path.read_bytes()
    with local_server() as (srv, url):
        proc = _run_submit(submit_args(run_dir, url, out), fsize=len(before) + 100)  # room for a body, not one more line
        assert srv.bodies == []
    assert proc.returncode == 2, proc.stderr
    [line] = error_lines(proc)
    assert line.startswith(f"error: {path}: cannot write the ledger, so nothing was sent (file too large")
    assert path.read_bytes() == before  # the part of the line that fitted was taken back
