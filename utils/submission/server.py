"""A local competition server that speaks the real protocol, for rehearsals and tests.

    python -m utils.submission.server --data data/rehearsal [--port 8000]
    python -m utils.submission.server --data data/rehearsal --max-body-mb 64 --read-timeout-s 10

Listens on 127.0.0.1, takes ``POST`` bodies of either form (see
utils.submission.lists), scores them against ``DATA/test/ground_truth.json`` and
answers ``{"accuracy": score, "top1": ..., "top5": ..., "top10": ...}``.
``--fail-first N`` answers 500 to the first N posts, to rehearse retries. The
first line printed is ``serving on http://127.0.0.1:PORT/``.

Whatever arrives gets an answer and the server keeps serving: a malformed body
(not UTF-8, not JSON, nested too deep, names that are not strings, a missing or
non-numeric Content-Length, fewer bytes than announced within
``--read-timeout-s``) gets HTTP 400 with ``{"error": reason}``; a body over
``--max-body-mb`` gets 413 unread. A body lives only while its request is
handled; the server keeps a short summary of each post (``received``).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Sequence

from utils.data.layout import load_layout
from utils.errors import KitError, run_cli
from utils.paths import user_path
from utils.runs.metrics import competition_score
from utils.submission.lists import TOP_K, BadBody, parse_body

log = logging.getLogger(__name__)

MAX_BODY_MB = 64
READ_TIMEOUT_S = 10.0


class HTTPProblem(Exception):
    """A request the server answers with ``code`` and ``{"error": message}``."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def parse_lists(body: Any) -> tuple[str, dict[str, list[str]]]:
    """``(group, {query: names})`` from a body of either form, names checked to be strings."""
    return parse_body(body, k=None)


def score_lists(lists: dict[str, list[str]], truth: dict[str, list[str]], gallery: set[str]) -> dict[str, float]:
    """Check ``lists`` against the protocol and score them."""
    missing = sorted(set(truth) - set(lists))
    if missing:
        raise BadBody(f"{len(missing)} queries missing, e.g. {missing[:3]}")
    unknown = sorted(set(lists) - set(truth))
    if unknown:
        raise BadBody(f"unknown queries, e.g. {unknown[:3]}")
    hits = {1: 0, 5: 0, 10: 0}
    for q, names in lists.items():
        if not isinstance(names, list) or len(names) != TOP_K or len(set(names)) != TOP_K:
            raise BadBody(f"query {q}: needs a list of {TOP_K} distinct gallery names")
        bad = [g for g in names if g not in gallery]
        if bad:
            raise BadBody(f"query {q}: not in the gallery: {bad[:3]}")
        right = set(truth[q])
        first = next((i for i, g in enumerate(names) if g in right), TOP_K)
        for k in hits:
            hits[k] += first < k
    n = len(truth)
    top = {k: hits[k] / n for k in hits}
    return {
        "accuracy": round(competition_score(top[1], top[5], top[10]), 4),
        "top1": top[1],
        "top5": top[5],
        "top10": top[10],
    }


class CompetitionServer(ThreadingHTTPServer):
    """The HTTP server with the ground truth and a log of what it received."""

    daemon_threads = True

    def __init__(self, data: Path, host: str = "127.0.0.1", port: int = 0, fail_first: int = 0,
                 max_body_mb: float = MAX_BODY_MB, read_timeout_s: float = READ_TIMEOUT_S):
        layout = load_layout(data)
        if layout.ground_truth is None:
            raise KitError(f"{data / 'test' / 'ground_truth.json'}: not found; the local server needs it to score")
        if not 0 < max_body_mb < math.inf or not 0 < read_timeout_s < math.inf:  # inf: an OverflowError traceback
            raise KitError("--max-body-mb and --read-timeout-s must be finite numbers above 0")
        self.truth = layout.ground_truth
        self.gallery = {p.name for p in layout.gallery}
        self.fail_first = fail_first
        self.max_body_bytes = int(max_body_mb * 2**20)
        self.read_timeout_s = read_timeout_s
        self.received: list[dict[str, Any]] = []  # one summary per post: status, group, queries, score or error
        self.lock = threading.Lock()
        try:
            super().__init__((host, port), Handler)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise KitError(f"port {port} on {host} is taken (another server running?); pass another --port, "
                               "or --port 0 for a free one") from None
            raise KitError(f"cannot listen on {host}:{port} ({err.strerror})") from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class Handler(BaseHTTPRequestHandler):
    server: CompetitionServer

    def setup(self) -> None:
        self.timeout = self.server.read_timeout_s  # no read, header or body, blocks longer than this
        super().setup()

    def _answer(self, code: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if code >= 400:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
            if code >= 400:
                self._linger()
        except OSError:  # the client is gone; nothing left to tell it
            self.close_connection = True

    def _linger(self, max_s: float = 2.0) -> None:
        """Close our side, then read and drop what the client still sends (for ``max_s`` at most).

        Closing a socket with unread bytes makes the kernel send a reset, which can
        destroy the answer before the client reads it (a 413 sent before the body).
        """
        self.connection.shutdown(socket.SHUT_WR)
        self.connection.settimeout(0.2)
        stop = time.monotonic() + min(max_s, self.server.read_timeout_s)
        try:
            while time.monotonic() < stop and self.connection.recv(1 << 16):
                pass
        except OSError:
            pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(200, {"status": "ok", "queries": len(self.server.truth)})

    def _read_body(self) -> bytes:
        """The body, exactly Content-Length bytes, within the size cap and the read timeout."""
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise HTTPProblem(400, "no Content-Length header; send the body with its length")
        try:
            length = int(raw)
        except ValueError:
            raise HTTPProblem(400, f"Content-Length {raw[:40]!r} is not a number") from None
        if length < 0:
            raise HTTPProblem(400, f"Content-Length {length} is negative")
        if length > self.server.max_body_bytes:
            raise HTTPProblem(413, f"body of {length} bytes is over the {self.server.max_body_bytes} byte limit")
        buf, got, t0 = bytearray(), 0, time.monotonic()
        try:
            while got < length:
                chunk = self.rfile.read1(min(length - got, 1 << 20))
                if not chunk:
                    break
                buf += chunk
                got += len(chunk)
        except (socket.timeout, TimeoutError):
            pass
        if got < length:
            raise HTTPProblem(400, f"body shorter than its Content-Length: {got} of {length} bytes arrived "
                                   f"in {time.monotonic() - t0:.1f} s")
        return bytes(buf)

    def _score(self, data: bytes) -> dict[str, Any]:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise HTTPProblem(400, f"body is not UTF-8 (byte {err.start})") from None
        try:
            body = json.loads(text or "null")
        except json.JSONDecodeError as err:
            raise HTTPProblem(400, f"body is not valid JSON: {err}") from None
        except RecursionError:
            raise HTTPProblem(400, "body nests too deep to be a submission") from None
        try:
            group, lists = parse_lists(body)
            reply = score_lists(lists, self.server.truth, self.server.gallery)
        except BadBody as err:
            raise HTTPProblem(400, str(err)) from None
        self._note(group=group, queries=len(lists), accuracy=reply["accuracy"])
        return reply

    def _note(self, **summary: Any) -> None:
        with self.server.lock:
            self.server.received[self._n - 1].update(summary)

    def do_POST(self) -> None:  # noqa: N802
        with self.server.lock:
            self.server.received.append({"status": None})
            self._n = n = len(self.server.received)
        try:
            if n <= self.server.fail_first:
                self.close_connection = True  # the body is not read: drop the connection after answering
                raise HTTPProblem(500, f"simulated failure {n} of {self.server.fail_first}")
            reply, code = self._score(self._read_body()), 200
        except HTTPProblem as err:
            reply, code = {"error": str(err)}, err.code
        except Exception as err:  # a bug here must still answer, and the server must keep serving
            log.exception("internal error on post %d", n)
            reply, code = {"error": f"internal error: {type(err).__name__}"}, 500
        self._note(status=code, **({"error": reply["error"]} if code != 200 else {}))
        self._answer(code, reply)

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the client prints results
        pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=user_path, required=True, metavar="DIR", help="dataset with test/ground_truth.json")
    p.add_argument("--port", type=int, default=0, metavar="N", help="port on 127.0.0.1; 0 picks a free one (default: %(default)s)")
    p.add_argument("--fail-first", type=int, default=0, metavar="N", help="answer HTTP 500 to the first N posts (default: %(default)s)")
    p.add_argument("--max-body-mb", type=float, default=MAX_BODY_MB, metavar="MB",
                   help="larger bodies get HTTP 413 unread (default: %(default)s)")
    p.add_argument("--read-timeout-s", type=float, default=READ_TIMEOUT_S, metavar="S",
                   help="a request whose bytes stop arriving this long gets HTTP 400 (default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    server = CompetitionServer(args.data, port=args.port, fail_first=args.fail_first,
                               max_body_mb=args.max_body_mb, read_timeout_s=args.read_timeout_s)
    print(f"serving on {server.url}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    run_cli(main)
