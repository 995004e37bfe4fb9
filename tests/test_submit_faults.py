"""submit.py against real local servers that misbehave (redirect, stall, trickle, hang up), bad
flags, bad --resend bodies, the ledger, and the file modes of what it writes."""

from __future__ import annotations

import json
import os
import select
import socket
import stat
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import submit
from tests.helpers.paths import ROOT
from tests.helpers.runs import make_run
from tests.helpers.serving import competition_server, serving
from utils.atomic import atomic_write_json
from utils.errors import KitError
from utils.file_hash import file_sha256
from utils.runs import ledger

STALL_S = 20  # a stalled handler gives up after this, so a test never hangs longer
TRICKLE_GAP_S = 0.05  # between the trickled bytes: far inside any per-read timeout, so only a whole-reply deadline ends it
TRICKLE_REPLY = b'{"accuracy": 1000.0}' + b" " * int(STALL_S / TRICKLE_GAP_S)  # a valid answer, STALL_S long when trickled


class Misbehaving(BaseHTTPRequestHandler):
    """Reads each POST body, counts it, then does what the server's ``mode`` says."""

    server: "FaultServer"

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.server.lock:
            self.server.posts.append(self.path)
        getattr(self, "mode_" + self.server.mode)()

    def do_GET(self) -> None:  # noqa: N802
        self.server.gets.append(self.path)
        self.reply(200, b'{"accuracy": 1000.0}')

    def reply(self, code: int, data: bytes, **headers: str) -> None:
        self.send_response(code)
        for key, val in {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}.items():
            self.send_header(key, val)
        self.end_headers()
        self.wfile.write(data)

    def mode_redirect(self) -> None:  # POST / -> 302 /landing; POST /landing -> 405; GET /landing -> 200
        if self.path == "/landing":
            self.reply(405, b'{"error": "method not allowed"}')
        else:
            self.reply(302, b"", Location="/landing")

    def mode_stall(self) -> None:  # got the body, answers long after any client timeout
        self.server.release.wait(STALL_S)
        self.reply(200, b'{"accuracy": 1000.0}')

    def mode_trickle(self) -> None:  # a valid answer, one byte at a time until it is done or the client hangs up
        data = TRICKLE_REPLY
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        for i in range(len(data)):
            try:
                self.wfile.write(data[i : i + 1])
                self.wfile.flush()
            except OSError:
                return self.client_left()
            self.server.bytes_sent += 1
            if self.server.release.is_set():
                return
            if select.select([self.connection], [], [], TRICKLE_GAP_S)[0]:  # the client sends nothing more: readable = gone
                return self.client_left()

    def client_left(self) -> None:
        """Record how much of the reply had been sent when the client hung up, and signal it."""
        self.server.left_after = self.server.bytes_sent
        self.server.hung_up.set()

    def mode_hangup(self) -> None:  # got the body, closes the connection without a word
        self.close_connection = True
        self.connection.shutdown(2)

    def log_message(self, format: str, *args) -> None:
        pass


class FaultServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, mode: str):
        self.mode, self.posts, self.gets, self.bytes_sent, self.left_after = mode, [], [], 0, None
        self.lock, self.release, self.hung_up = threading.Lock(), threading.Event(), threading.Event()
        super().__init__(("127.0.0.1", 0), Misbehaving)


@contextmanager
def fault_server(mode: str):
    with serving(FaultServer(mode), join_s=5) as srv:
        try:
            yield srv, f"http://127.0.0.1:{srv.server_address[1]}/"
        finally:
            srv.release.set()  # a handler waiting on it must not hold up the shutdown


@pytest.fixture
def run_dir(rehearsal_data_session, tmp_path):
    return make_run(rehearsal_data_session, tmp_path / "runs")


def submit_to(url: str, run_dir: Path, out: Path, *extra: str) -> int:
    return submit.main(["--run", str(run_dir), "--url", url, "--group", "t", "--out", str(out),
                        "--retries", "3", "--backoff-s", "0.01", *extra])


def last_entry(out: Path) -> dict:
    return ledger.read(out)[-1].record


def test_a_redirect_is_reported_with_its_location_and_never_followed(run_dir, tmp_path, caplog):
    out = tmp_path / "s"
    with fault_server("redirect") as (srv, url):
        code = submit_to(url, run_dir, out)
    assert code == submit.NOT_SUBMITTED
    assert srv.posts == ["/"] and srv.gets == []  # neither followed as a GET nor re-posted
    assert f"HTTP 302 redirect to {url}landing" in caplog.text and "NOT SUBMITTED" in caplog.text
    assert last_entry(out)["outcome"] == "not-submitted"
    assert json.loads(Path(last_entry(out)["body"]).read_text())["groupname"] == "t"


def test_a_405_is_reported_against_the_url_that_answered_it(run_dir, tmp_path, caplog):
    with fault_server("redirect") as (srv, url):
        code = submit_to(url + "landing", run_dir, tmp_path / "s")
    assert code == submit.NOT_SUBMITTED
    assert f"HTTP 405 from {url}landing" in caplog.text
    assert last_entry(tmp_path / "s")["outcome"] == "rejected"


def test_after_a_read_timeout_the_body_is_not_posted_again(run_dir, tmp_path, caplog):
    with fault_server("stall") as (srv, url):
        code = submit_to(url, run_dir, tmp_path / "s", "--timeout-s", "1")
    assert code == submit.NOT_SUBMITTED
    assert len(srv.posts) == 1  # the server holds it: posting it again could count twice
    assert "retrying" not in caplog.text and "NOT CONFIRMED" in caplog.text
    assert "the server may have received it; check the leaderboard before --resend" in caplog.text


def test_a_hang_up_after_the_body_is_not_posted_again(run_dir, tmp_path, caplog):
    with fault_server("hangup") as (srv, url):
        code = submit_to(url, run_dir, tmp_path / "s", "--timeout-s", "60")  # the hang-up ends it, never the timeout
    assert code == submit.NOT_SUBMITTED and len(srv.posts) == 1
    assert "may have received it" in caplog.text


def test_timeout_bounds_the_whole_reply_not_each_byte(run_dir, tmp_path, caplog):
    with fault_server("trickle") as (srv, url):
        code = submit_to(url, run_dir, tmp_path / "s", "--timeout-s", "1")
        assert srv.hung_up.wait(STALL_S), f"the client read on: {srv.bytes_sent} of {len(TRICKLE_REPLY)} bytes sent"
    assert code == submit.NOT_SUBMITTED  # a reply still arriving at the deadline is not a confirmation
    assert "did not finish within --timeout-s 1" in caplog.text
    assert srv.left_after < len(TRICKLE_REPLY)  # the server saw the client hang up before its reply was done


def test_refused_connections_are_retried_then_reported(run_dir, tmp_path, caplog):
    code = submit_to("http://127.0.0.1:9/", run_dir, tmp_path / "s", "--timeout-s", "2")
    assert code == submit.NOT_SUBMITTED
    assert caplog.text.count("retrying") == 3 and "gave up after 4 attempt(s)" in caplog.text


def test_a_connect_timeout_is_retried_because_nothing_arrived(run_dir, tmp_path, caplog):
    # a listening socket whose backlog is full: the kernel drops further SYNs, so connecting times out
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(3):
            filler = socket.socket()
            filler.settimeout(0.3)
            try:
                filler.connect(("127.0.0.1", port))
            except OSError:
                pass
            fillers.append(filler)
        try:
            code = submit_to(f"http://127.0.0.1:{port}/", run_dir, tmp_path / "s", "--timeout-s", "0.5", "--retries", "2")
        finally:
            for filler in fillers:
                filler.close()
    assert code == submit.NOT_SUBMITTED
    assert caplog.text.count("retrying") == 2 and "ConnectTimeout: cannot reach" in caplog.text
    assert "may have received" not in caplog.text


@pytest.mark.parametrize("flags, message", [
    (["--url", "127.0.0.1:8000"], "needs http:// or https://"),
    (["--url", "localhost:8000"], "needs http:// or https://"),
    (["--url", "http://127.0.0.1:80x0/"], "port is not a number"),
    (["--url", "http://127.0.0.1:8000/", "--timeout-s", "0"], "--timeout-s 0.0: must be"),
    (["--url", "http://127.0.0.1:8000/", "--timeout-s", "-3"], "--timeout-s -3.0: must be"),
    (["--url", "http://127.0.0.1:8000/", "--timeout-s", "nan"], "--timeout-s nan: must be"),
    (["--url", "http://127.0.0.1:8000/", "--retries", "-1"], "--retries -1: must be 0 or more"),
])
def test_flag_mistakes_are_one_line_before_any_work(flags, message, run_dir, tmp_path):
    with pytest.raises(KitError, match=message.replace("+", r"\+")):
        submit.main(["--run", str(run_dir), "--group", "t", "--out", str(tmp_path / "s"), *flags])
    assert not (tmp_path / "s").exists()


def test_a_flag_mistake_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "submit.py", "--url", "127.0.0.1:8000", "--group", "t", "--run", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --url '127.0.0.1:8000': needs http:// or https:// and a host, e.g. http://127.0.0.1:8000/"]


NOT_BODIES = {
    "not a body": {"a": 1},
    "no group": {"groupname": "", "images": {"q": [f"g{i}" for i in range(10)]}},
    "nine names": {"groupname": "t", "images": [{"filename": "q", "gallery_images": [f"g{i}" for i in range(9)]}]},
    "repeated names": {"groupname": "t", "images": {"q": ["g0"] * 10}},
    "names that are lists": {"groupname": "t", "images": {"q": [[f"g{i}"] for i in range(10)]}},
    "no queries": {"groupname": "t", "images": {}},
}


@pytest.mark.parametrize("what", list(NOT_BODIES))
def test_resend_refuses_what_is_not_a_submission_body(what, tmp_path):
    path = tmp_path / "body.json"
    path.write_text(json.dumps(NOT_BODIES[what]))
    with fault_server("stall") as (srv, url):
        with pytest.raises(KitError, match="not a valid submission body, nothing sent"):
            submit.main(["--resend", str(path), "--url", url, "--out", str(tmp_path / "s")])
        assert srv.posts == []


def test_resend_checks_names_against_the_data_folder(rehearsal_data_session, run_dir, tmp_path):
    submit.main(["--run", str(run_dir), "--group", "t", "--out", str(tmp_path / "s"), "--dry-run"])
    body_path = ledger.read(tmp_path / "s")[0].body
    body = json.loads(Path(body_path).read_text())
    body["images"][next(iter(body["images"]))][0] = "not-in-gallery.jpg"
    (tmp_path / "edited.json").write_text(json.dumps(body))
    with pytest.raises(KitError, match="not in the gallery"):
        submit.main(["--resend", str(tmp_path / "edited.json"), "--data", str(rehearsal_data_session), "--dry-run"])


def test_ledger_history_and_resend_by_number(rehearsal_data_session, run_dir, tmp_path, capsys, caplog):
    out = tmp_path / "s"
    assert submit.main(["--run", str(run_dir), "--group", "t", "--out", str(out), "--dry-run"]) == 0
    with open(out / ledger.LEDGER_NAME, "ab") as f:
        f.write(b'{"torn line, as a kill mid-write would leave\n')
    with competition_server(rehearsal_data_session) as url:
        assert submit.main(["--resend", "1", "--url", url, "--out", str(out)]) == 0
    entries = ledger.read(out)
    assert [(e.number, e.record["outcome"], e.record["score"]) for e in entries] == [(1, "dry-run", None), (2, "submitted", 1000.0)]
    assert entries[0].record["sha256"] == entries[1].record["sha256"] == file_sha256(entries[0].body)
    assert "line 2: skipped" in caplog.text
    capsys.readouterr()
    assert submit.main(["--history", "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "dry-run" in shown and "submitted" in shown and "1000.0" in shown and "2 attempt(s)" in shown
    with pytest.raises(KitError, match=r"already sent \(ledger entry 2: submitted, score 1000.0"):
        submit.main(["--resend", "2", "--url", url, "--out", str(out)])  # the number --history shows, not the line
    Path(entries[0].body).write_text(json.dumps({"groupname": "x", "images": {}}))
    with pytest.raises(KitError, match="changed since it was recorded"):
        submit.main(["--resend", "1", "--url", url, "--out", str(out)])
    with pytest.raises(KitError, match="no entry 7"):
        submit.main(["--resend", "7", "--url", url, "--out", str(out)])


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_outputs_get_the_umask_mode_not_0600(umask, mode, rehearsal_data_session, run_dir, tmp_path):
    old = os.umask(umask)
    try:
        with competition_server(rehearsal_data_session) as url:
            assert submit_to(url, run_dir, tmp_path / "s") == 0
        written = atomic_write_json(tmp_path / "runs" / "split.json", {"a": 1})
    finally:
        os.umask(old)
    files = [*(tmp_path / "s").iterdir(), written]
    assert {p.suffix for p in files} == {".json", ".jsonl"} and len(files) == 4
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: mode for p in files}
