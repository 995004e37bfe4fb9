"""HTTP servers of the tests: any server run in a thread, the kit's competition server as its own
process, and a server that reads each body, says so, and holds or answers the reply on cue."""

from __future__ import annotations

import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from socketserver import BaseServer
from typing import Iterator, TypeVar

from tests.helpers.paths import ROOT

HOLD_S = 60  # a held reply is released by the test; this only bounds a broken test

S = TypeVar("S", bound=BaseServer)


@contextmanager
def serving(server: S, join_s: float = 10.0) -> Iterator[S]:
    """Serve ``server`` in a daemon thread; shut it down, close it and join the thread on exit."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=join_s)


@contextmanager
def competition_server(data: Path, *extra: str) -> Iterator[str]:
    """The competition server (``python -m utils.submission.server``) in a subprocess on a free port; yields its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "utils.submission.server", "--data", str(data), *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving on http://127.0.0.1:"), line
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class _HoldingHandler(BaseHTTPRequestHandler):
    """Reads the body, signals ``got_body``, then holds the reply (``hold``) or answers ``reply``."""

    server: "HoldingServer"

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self.server.bodies.append(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self.server.got_body.set()
        if self.server.hold:
            self.server.release.wait(HOLD_S)
        data = self.server.reply
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the client is gone (killed)

    def log_message(self, format: str, *args) -> None:
        pass


class HoldingServer(ThreadingHTTPServer):
    """Records each POST body in ``bodies`` and sets ``got_body``; with ``hold`` the reply waits for ``release``."""

    daemon_threads = True

    def __init__(self, reply: bytes = b'{"accuracy": 1000.0}', hold: bool = False):
        self.reply, self.hold, self.bodies = reply, hold, []
        self.got_body, self.release = threading.Event(), threading.Event()
        super().__init__(("127.0.0.1", 0), _HoldingHandler)


@contextmanager
def local_server(**kwargs) -> Iterator[tuple[HoldingServer, str]]:
    """A :class:`HoldingServer` in a thread; yields (server, URL) and releases a held reply on exit."""
    with serving(HoldingServer(**kwargs), join_s=5) as srv:
        try:
            yield srv, f"http://127.0.0.1:{srv.server_address[1]}/"
        finally:
            srv.release.set()
