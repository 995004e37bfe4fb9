"""The local competition server under malformed requests sent over a raw socket: each gets an
answer (400 or 413, with the reason) within its read timeout, and the server keeps serving."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers.paths import ROOT
from tests.helpers.serving import serving
from utils.data.layout import load_layout
from utils.submission.server import CompetitionServer


@contextmanager
def running(data: Path, **kwargs):
    """The server in a thread of this process, 10 s read timeout (a loaded machine may pause a sender) and a 1 MiB cap unless told."""
    kwargs = {"read_timeout_s": 10.0, "max_body_mb": 1, **kwargs}
    with serving(CompetitionServer(data, **kwargs), join_s=5) as srv:
        yield srv


def exchange(srv: CompetitionServer, head: bytes, body: bytes = b"", keep_open: bool = True) -> tuple[int, dict]:
    """Send raw bytes, read the answer until the server closes; (status, JSON answer)."""
    with socket.create_connection(srv.server_address[:2], timeout=120) as sock:  # only bounds a server that never answers
        sock.sendall(head + body)
        if not keep_open:
            sock.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            chunk = sock.recv(65536)  # socket.timeout here means the server never answered
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data:
                headers, _, rest = data.partition(b"\r\n\r\n")
                length = next((int(h.split(b":")[1]) for h in headers.split(b"\r\n") if h.lower().startswith(b"content-length:")), None)
                if length is not None and len(rest) >= length:
                    break
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(data.partition(b"\r\n\r\n")[2])


def post_bytes(srv: CompetitionServer, body: bytes, length: str | None = None) -> tuple[int, dict]:
    cl = f"Content-Length: {len(body) if length is None else length}\r\n".encode()
    return exchange(srv, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + cl + b"\r\n", body)


def perfect_body(data: Path) -> dict:
    layout = load_layout(data)
    gallery = [p.name for p in layout.gallery]
    images = {}
    for q, right in layout.ground_truth.items():
        images[q] = [right[0]] + [g for g in gallery if g != right[0]][:9]
    return {"groupname": "t", "images": images}


BAD_BODIES = {
    "a filename that is a list": (b'{"groupname": "t", "images": [{"filename": ["q.jpg"], "gallery_images": []}]}', "not a string"),
    "invalid UTF-8": (b'{"groupname": "\xff\xfe", "images": {}}', "not UTF-8"),
    "200k-deep nesting": (b"[" * 200_000 + b"]" * 200_000, "nests too deep"),
    "not JSON": (b"{not json", "not valid JSON"),
    "a query listed twice": (b'{"groupname": "t", "images": [{"filename": "q", "gallery_images": []},'
                             b' {"filename": "q", "gallery_images": []}]}', "listed twice"),
}


def test_every_malformed_body_gets_400_with_its_reason_and_the_server_keeps_serving(rehearsal_data_session):
    names_are_lists = perfect_body(rehearsal_data_session)
    first = next(iter(names_are_lists["images"]))
    names_are_lists["images"][first] = [[g] for g in names_are_lists["images"][first]]
    bad = {**BAD_BODIES, "names that are lists": (json.dumps(names_are_lists).encode(), "strings")}
    with running(rehearsal_data_session) as srv:
        for what, (body, reason) in bad.items():
            code, answer = post_bytes(srv, body)
            assert (code, reason in answer["error"]) == (400, True), (what, code, answer)
        code, answer = post_bytes(srv, json.dumps(perfect_body(rehearsal_data_session)).encode())
        assert code == 200 and answer["accuracy"] == 1000.0
        # only a summary of each post is kept, never the body itself
        assert len(srv.received) == len(bad) + 1
        assert all(isinstance(v, (str, int, float, type(None))) for r in srv.received for v in r.values())
        assert srv.received[-1]["queries"] == len(perfect_body(rehearsal_data_session)["images"])


def test_bad_content_lengths_get_an_answer_not_a_hang(rehearsal_data_session):
    with running(rehearsal_data_session, read_timeout_s=1.0) as srv:  # each request here goes out in one send
        code, answer = post_bytes(srv, b"{}", length="abc")
        assert code == 400 and "'abc' is not a number" in answer["error"]
        code, answer = post_bytes(srv, b"{}", length="-5")
        assert code == 400 and "negative" in answer["error"]
        # announces 1000 bytes, sends 10 and waits: answered after the 1 s read timeout
        code, answer = post_bytes(srv, b'{"a": 1234', length="1000")
        assert code == 400 and "10 of 1000 bytes" in answer["error"]
        code, answer = exchange(srv, b"POST / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert code == 400 and "no Content-Length" in answer["error"]
        # over the cap: 413 without reading a byte of the body
        code, answer = post_bytes(srv, b"", length=str(2 * 2**20))
        assert code == 413 and "limit" in answer["error"]
        code, answer = exchange(srv, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert code == 200 and answer["status"] == "ok"


def test_a_taken_port_is_one_line_not_a_traceback(rehearsal_data_session):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "utils.submission.server", "--data", str(rehearsal_data_session),
                               "--port", str(port)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: port {port} on 127.0.0.1 is taken (another server running?); "
                                                "pass another --port, or --port 0 for a free one"]


@pytest.mark.parametrize("flag", [["--max-body-mb", "0"], ["--read-timeout-s", "-1"],
                                  ["--max-body-mb", "inf"], ["--read-timeout-s", "nan"]])  # inf: an OverflowError traceback
def test_limits_must_be_positive(rehearsal_data_session, flag):
    from utils.errors import KitError
    from utils.submission import server

    with pytest.raises(KitError, match="must be finite numbers above 0"):
        server.main(["--data", str(rehearsal_data_session), *flag])
