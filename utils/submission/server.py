"""A local competition server that speaks the real protocol, for rehearsals and tests.

    python -m utils.submission.server --data data/rehearsal [--port 8000]

Listens on 127.0.0.1, takes ``POST`` bodies of either form (see
utils.submission.lists), scores them against ``DATA/test/ground_truth.json`` and
answers ``{"accuracy": score, "top1": ..., "top5": ..., "top10": ...}``.
A malformed body gets HTTP 400 with ``{"error": reason}``. ``--fail-first N``
answers 500 to the first N posts, to rehearse retries. The first line printed
is ``serving on http://127.0.0.1:PORT/``.
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Sequence

from utils.data.layout import load_layout
from utils.errors import KitError, run_cli
from utils.runs.metrics import competition_score
from utils.submission.lists import TOP_K


class BadBody(ValueError):
    """The request body breaks the protocol; the message is sent back with a 400."""


def parse_lists(body: Any) -> tuple[str, dict[str, list[str]]]:
    """``(group, {query: names})`` from a body of either form."""
    if not isinstance(body, dict):
        raise BadBody("body must be a JSON object with 'groupname' and 'images'")
    group = body.get("groupname")
    if not isinstance(group, str) or not group.strip():
        raise BadBody("'groupname' must be a non-empty string")
    images = body.get("images")
    if isinstance(images, list):
        lists = {}
        for i, item in enumerate(images):
            if not isinstance(item, dict) or "filename" not in item or "gallery_images" not in item:
                raise BadBody(f"images[{i}] must be {{'filename': ..., 'gallery_images': [...]}}")
            lists[item["filename"]] = item["gallery_images"]
    elif isinstance(images, dict):
        lists = images
    else:
        raise BadBody("'images' must be {query: [gallery names]} or a list of {filename, gallery_images}")
    return group, lists


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
        if not isinstance(names, list) or len(names) != TOP_K or len(set(map(str, names))) != TOP_K:
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

    def __init__(self, data: Path, host: str = "127.0.0.1", port: int = 0, fail_first: int = 0):
        layout = load_layout(data)
        if layout.ground_truth is None:
            raise KitError(f"{data / 'test' / 'ground_truth.json'}: not found; the local server needs it to score")
        self.truth = layout.ground_truth
        self.gallery = {p.name for p in layout.gallery}
        self.fail_first = fail_first
        self.received: list[Any] = []
        self.lock = threading.Lock()
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class Handler(BaseHTTPRequestHandler):
    server: CompetitionServer

    def _answer(self, code: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(200, {"status": "ok", "queries": len(self.server.truth)})

    def do_POST(self) -> None:  # noqa: N802
        with self.server.lock:
            self.server.received.append(None)
            n = len(self.server.received)
        if n <= self.server.fail_first:
            self._answer(500, {"error": f"simulated failure {n} of {self.server.fail_first}"})
            return
        try:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length) or b"null")
            self.server.received[n - 1] = body
            _, lists = parse_lists(body)
            self._answer(200, score_lists(lists, self.server.truth, self.server.gallery))
        except json.JSONDecodeError as err:
            self._answer(400, {"error": f"body is not valid JSON: {err}"})
        except BadBody as err:
            self._answer(400, {"error": str(err)})

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the client prints results
        pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, metavar="DIR", help="dataset with test/ground_truth.json")
    p.add_argument("--port", type=int, default=0, metavar="N", help="port on 127.0.0.1; 0 picks a free one (default: %(default)s)")
    p.add_argument("--fail-first", type=int, default=0, metavar="N", help="answer HTTP 500 to the first N posts (default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    server = CompetitionServer(args.data, port=args.port, fail_first=args.fail_first)
    print(f"serving on {server.url}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    run_cli(main)
