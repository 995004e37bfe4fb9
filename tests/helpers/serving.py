"""An HTTP server of the tests (the kit's competition server, or a misbehaving one) run in a thread."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from socketserver import BaseServer
from typing import Iterator, TypeVar

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
