"""POST a submission body: never follow a redirect, one deadline per attempt, retry only when safe.

A submission must either be known to have arrived or be reported as not
arrived; nothing in between may read as "submitted". So:

- **redirects** (3xx) are never followed: a client that follows a 302 sends a
  GET without the body, and the page it lands on may answer 200. The answer is
  reported with its ``Location``; nothing was submitted.
- **retries** happen only when the request provably never reached the server
  (connection refused, no connection within the time) or the server answered
  5xx. After a read timeout, a dropped connection or a cut reply, the server may
  well hold the body: we stop and say so instead of posting it again.
- **one deadline**: ``timeout_s`` bounds each attempt from connecting to the
  last byte of the reply, so a reply trickled a byte a second cannot hold the
  client for minutes. The request runs in a worker thread; the caller waits for
  it at most ``timeout_s`` (plus half a second of grace), and the worker itself
  stops reading at the deadline.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import MaxRetryError, NewConnectionError

from utils.errors import KitError

log = logging.getLogger(__name__)

GRACE_S = 0.5  # the caller's extra wait, so that the worker's own timeouts report first
MAX_REPLY_BYTES = 1 << 20  # a score reply is a few hundred bytes
MAY_HAVE_ARRIVED = "the server may have received it; check the leaderboard before --resend"


class NotSubmitted(KitError):
    """The server did not accept the body (or we cannot know that it did); the body is on disk.

    Attributes:
        outcome: ``rejected`` (the server answered 4xx) or ``not-submitted``.
        answer: what the server said, or what went wrong, in one line.
        maybe_received: True when the body may have arrived (read timeout, cut reply).
    """

    def __init__(self, message: str, outcome: str = "not-submitted", maybe_received: bool = False):
        super().__init__(message)
        self.outcome = outcome
        self.answer = message
        self.maybe_received = maybe_received


class _Unreached(Exception):
    """The request never reached the server: safe to send again."""


@dataclass
class _Answer:
    status: int
    location: str
    text: str


def check_url(url: str, source: str = "--url") -> str:
    """``url`` if it is an http(s) URL with a host and a numeric port.

    Raises:
        KitError: naming ``source`` (the flag or environment variable) and the fix.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        rest = url.split("://", 1)[-1].strip("/") or "HOST:PORT"
        raise KitError(f"{source} {url!r}: needs http:// or https:// and a host, e.g. http://{rest}/")
    try:
        _ = parts.port  # raises ValueError for a port that is not a number
    except ValueError:
        raise KitError(f"{source} {url!r}: the port is not a number from 0 to 65535, e.g. http://{parts.hostname}:8000/") from None
    if not parts.hostname:
        raise KitError(f"{source} {url!r}: no host name, e.g. http://127.0.0.1{parts.netloc}/")
    return url


def check_send_options(timeout_s: float, retries: int, backoff_s: float) -> None:
    """Raise a KitError for a timeout, retry count or backoff that cannot work."""
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise KitError(f"--timeout-s {timeout_s}: must be a number of seconds above 0, e.g. --timeout-s 30")
    if retries < 0:
        raise KitError(f"--retries {retries}: must be 0 or more (0 = a single attempt)")
    if not (math.isfinite(backoff_s) and backoff_s >= 0):
        raise KitError(f"--backoff-s {backoff_s}: must be 0 or more seconds")


def _reached(err: requests.ConnectionError) -> bool:
    """False only when the error proves that no byte reached the server."""
    if isinstance(err, requests.ConnectTimeout):
        return False
    cause = err.args[0] if err.args else None
    return not (isinstance(cause, MaxRetryError) and isinstance(cause.reason, NewConnectionError))


def _request(url: str, data: bytes, timeout_s: float, deadline: float) -> _Answer:
    """One POST, no redirect followed, the reply read until ``deadline`` at most."""
    try:
        resp = requests.post(url, data=data, headers={"Content-Type": "application/json"},
                             timeout=(timeout_s, timeout_s), allow_redirects=False, stream=True)
    except requests.RequestException as err:
        if isinstance(err, requests.ConnectionError) and not _reached(err):
            raise _Unreached(f"{type(err).__name__}: cannot reach {url}") from None
        raise NotSubmitted(f"{url}: {type(err).__name__} before any answer; {MAY_HAVE_ARRIVED}", maybe_received=True) from None
    try:
        chunks, size = [], 0
        while True:
            if time.monotonic() > deadline:
                raise NotSubmitted(f"{url}: the reply did not finish within --timeout-s {timeout_s:g}; {MAY_HAVE_ARRIVED}",
                                   maybe_received=True)
            chunk = resp.raw.read1(65536, decode_content=True)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_REPLY_BYTES:
                raise NotSubmitted(f"{url}: the reply is over {MAX_REPLY_BYTES} bytes; is this the competition server?")
    except (requests.RequestException, Urllib3Error, OSError) as err:
        raise NotSubmitted(f"{url}: the reply was cut ({type(err).__name__}); {MAY_HAVE_ARRIVED}", maybe_received=True) from None
    finally:
        resp.close()
    location = urljoin(url, resp.headers.get("Location", "")) if resp.headers.get("Location") else ""
    return _Answer(resp.status_code, location, b"".join(chunks).decode("utf-8", "replace"))


def _attempt(url: str, data: bytes, timeout_s: float) -> _Answer:
    """:func:`_request` in a worker thread, waited for ``timeout_s`` (+ grace) at most."""
    result: dict[str, Any] = {}
    done = threading.Event()
    deadline = time.monotonic() + timeout_s

    def work() -> None:
        try:
            result["answer"] = _request(url, data, timeout_s, deadline)
        except BaseException as err:  # handed to the caller's thread
            result["error"] = err
        finally:
            done.set()

    threading.Thread(target=work, name="submit-post", daemon=True).start()
    if not done.wait(timeout_s + GRACE_S):
        raise NotSubmitted(f"{url}: no complete answer within --timeout-s {timeout_s:g}; {MAY_HAVE_ARRIVED}", maybe_received=True)
    if "error" in result:
        raise result["error"]
    return result["answer"]


def _judge(url: str, answer: _Answer) -> dict[str, Any]:
    """The reply as a dict for a 2xx JSON answer; NotSubmitted for a redirect, 4xx or non-JSON."""
    code, text = answer.status, answer.text.strip()[:300]
    if 300 <= code < 400:
        where = answer.location or "(no Location header)"
        raise NotSubmitted(f"{url} answered HTTP {code} redirect to {where}; a POST is never followed (the body would "
                           f"be dropped), so nothing was submitted. If {where} is the right server, pass it as --url")
    if code == 405:
        raise NotSubmitted(f"HTTP 405 from {url}: it does not take POSTs; is this the submission URL?", outcome="rejected")
    if code >= 400:
        raise NotSubmitted(f"HTTP {code} from {url}: {text}", outcome="rejected")
    try:
        reply = json.loads(answer.text)
    except ValueError:
        raise NotSubmitted(f"{url} answered HTTP {code} but not JSON: {text[:200]!r}", maybe_received=True) from None
    return reply if isinstance(reply, dict) else {"reply": reply}


def post(url: str, body: dict[str, Any], timeout_s: float = 30.0, retries: int = 3, backoff_s: float = 1.0) -> dict[str, Any]:
    """POST ``body`` and return the server's JSON reply.

    Retries (with doubling waits from ``backoff_s``) only a request that never
    reached the server or that got a 5xx; 3xx and 4xx are final, and so is any
    failure after the body may have arrived.

    Raises:
        NotSubmitted: the body was refused, not delivered, or not confirmed.
    """
    data = json.dumps(body).encode()
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            wait = backoff_s * 2 ** (attempt - 1)
            log.warning("retrying in %.1f s (%s)", wait, last)
            time.sleep(wait)
        try:
            answer = _attempt(url, data, timeout_s)
        except _Unreached as err:
            last = str(err)
            continue
        if answer.status >= 500:
            last = f"HTTP {answer.status} from {url}: {answer.text.strip()[:200]}"
            continue
        return _judge(url, answer)
    raise NotSubmitted(f"gave up after {retries + 1} attempt(s) ({last})")
