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
- **one deadline per attempt**: ``timeout_s`` bounds each attempt from
  connecting to the last byte of the reply, so a reply trickled a byte a second
  cannot hold the client for minutes. The request runs in a worker thread; the
  caller waits for it at most ``timeout_s`` (plus half a second of grace), and
  the worker itself stops reading at the deadline.
- **bounded waits**: the wait before a retry doubles from ``backoff_s`` but never
  exceeds ``max_backoff_s``; ``deadline_s`` bounds the whole submission (no
  attempt starts, and none runs, past it).
- **a score or nothing**: a 2xx reply counts only with a finite numeric
  ``accuracy`` (a number, or a string holding one: stored as a number) and no
  ``error``; anything else is NOT CONFIRMED (the server had the body).
- **one URL check**: :func:`check_url` judges every ``--url`` (and preflight's,
  through :func:`url_problem`) in one line: scheme, host (name or IP), port,
  spaces or control characters, and whatever requests' own parser refuses.
- **no secrets on screen**: :func:`redact_url` hides the user info
  (``user:pass@``) and the value of every query parameter (``?token=...``: we
  cannot know which ones are secret) and drops the fragment; messages and the
  ledger show only that form.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import MaxRetryError, NewConnectionError

from utils.errors import KitError
from utils.redact import redact_url, shown_for_error

SCORED_STATUSES = (200, 201)  # a score counts only in these; 202 Accepted means queued, not scored
MAX_SCORE = 1000.0  # 600 x Top-1 + 300 x Top-5 + 100 x Top-10
FAILED_WORDS = frozenset({"error", "failed", "failure", "fail", "rejected", "invalid"})

log = logging.getLogger(__name__)

GRACE_S = 0.5  # the caller's extra wait, so that the worker's own timeouts report first
MAX_REPLY_BYTES = 1 << 20  # a score reply is a few hundred bytes
MAY_HAVE_ARRIVED = "the server may have received it; check the leaderboard before --resend"


_UNSAFE = re.compile(r"[\s\x00-\x1f\x7f]")  # whitespace or control characters: never part of a URL we send
_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?$")
PORT_PROBLEM = "the port is not a number from 1 to 65535"


def _host_problem(host: str) -> str:
    """What is wrong with a host name or IP address, or ``""``."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return ""
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not name:
        return "the host name is empty or over 253 characters"
    bad = [label for label in name.split(".") if len(label) > 63 or not _LABEL.match(label)]
    if bad:
        return f"the host name has an empty, over-long or non-ASCII part {bad[0][:40]!r}"
    return ""


def url_problem(url: str) -> str:
    """Why ``url`` cannot be posted to, in a few words, or ``""`` when it is a usable http(s) URL."""
    if _UNSAFE.search(url):
        return "it holds a space or a control character"
    try:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return "needs http:// or https:// and a host"
        host = parts.hostname
    except ValueError as err:
        return f"cannot be read ({err})"
    try:
        port = parts.port  # raises ValueError for a port that is not a number from 0 to 65535
    except ValueError:
        return PORT_PROBLEM
    if not host:
        return "no host name"
    if port == 0:
        return PORT_PROBLEM
    problem = _host_problem(host)
    if problem:
        return problem
    try:
        requests.Request("POST", url).prepare()  # requests' own parser: what it refuses would fail at send time
    except (requests.RequestException, ValueError, UnicodeError) as err:
        return f"cannot be read by requests ({type(err).__name__})"
    return ""


def check_url(url: str, source: str = "--url") -> str:
    """``url`` when it is an http(s) URL with a valid host and port.

    Args:
        url: the URL as given.
        source: where it came from (``--url`` or ``COMPETITION_URL``), named in the error.

    Raises:
        KitError: one line naming ``source``, the URL (redacted) and an example of the right form.
    """
    problem = url_problem(url)
    if not problem:
        return url
    shown = shown_for_error(url)
    if problem == "needs http:// or https:// and a host":
        rest = url.split("://", 1)[-1].strip("/") or "HOST:PORT"
        raise KitError(f"{source} {shown!r}: needs http:// or https:// and a host, e.g. http://{shown_for_error(rest)}/")
    if problem == PORT_PROBLEM:
        raise KitError(f"{source} {shown!r}: {problem}, e.g. http://127.0.0.1:8000/")
    raise KitError(f"{source} {shown!r}: {problem}; expected http://HOST:PORT/PATH, e.g. http://127.0.0.1:8000/")


class NotSubmitted(KitError):
    """The server did not accept the body (or we cannot know that it did); the body is on disk.

    Attributes:
        outcome: ``rejected`` (the server answered 4xx), ``not-confirmed`` (it may hold the body) or ``not-submitted``.
        answer: what the server said (its reply when it had one), or what went wrong, in one line.
        maybe_received: True when the body may have arrived (read timeout, cut reply).
    """

    def __init__(self, message: str, outcome: str = "", maybe_received: bool = False, answer: Any = None):
        super().__init__(message)
        self.outcome = outcome or ("not-confirmed" if maybe_received else "not-submitted")
        self.answer = message if answer is None else answer
        self.maybe_received = maybe_received


class _Unreached(Exception):
    """The request never reached the server: safe to send again."""


@dataclass
class _Answer:
    status: int
    location: str
    text: str


def check_send_options(timeout_s: float, retries: int, backoff_s: float, max_backoff_s: float = 30.0,
                       deadline_s: float = 300.0) -> None:
    """Raise a KitError for a timeout, retry count, backoff, backoff cap or deadline that cannot work."""
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise KitError(f"--timeout-s {timeout_s}: must be a number of seconds above 0, e.g. --timeout-s 30")
    if retries < 0:
        raise KitError(f"--retries {retries}: must be 0 or more (0 = a single attempt)")
    if not (math.isfinite(backoff_s) and backoff_s >= 0):
        raise KitError(f"--backoff-s {backoff_s}: must be 0 or more seconds")
    if not (math.isfinite(max_backoff_s) and max_backoff_s >= 0):
        raise KitError(f"--max-backoff-s {max_backoff_s}: must be 0 or more seconds, e.g. --max-backoff-s 30")
    if not (math.isfinite(deadline_s) and deadline_s > 0):
        raise KitError(f"--deadline-s {deadline_s}: must be a number of seconds above 0, e.g. --deadline-s 300")


def _reached(err: requests.ConnectionError) -> bool:
    """False only when the error proves that no byte reached the server."""
    if isinstance(err, requests.ConnectTimeout):
        return False
    cause = err.args[0] if err.args else None
    return not (isinstance(cause, MaxRetryError) and isinstance(cause.reason, NewConnectionError))


def _request(url: str, data: bytes, timeout_s: float, deadline: float, limit: str) -> _Answer:
    """One POST, no redirect followed, the reply read until ``deadline`` at most."""
    shown = redact_url(url)
    try:
        resp = requests.post(url, data=data, headers={"Content-Type": "application/json"},
                             timeout=(timeout_s, timeout_s), allow_redirects=False, stream=True)
    except requests.RequestException as err:
        if isinstance(err, requests.ConnectionError) and not _reached(err):
            raise _Unreached(f"{type(err).__name__}: cannot reach {shown}") from None
        raise NotSubmitted(f"{shown}: {type(err).__name__} before any answer within {limit}; {MAY_HAVE_ARRIVED}", maybe_received=True) from None
    try:
        chunks, size = [], 0
        while True:
            if time.monotonic() > deadline:
                raise NotSubmitted(f"{shown}: the reply did not finish within {limit}; {MAY_HAVE_ARRIVED}",
                                   maybe_received=True)
            chunk = resp.raw.read1(65536, decode_content=True)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_REPLY_BYTES:
                raise NotSubmitted(f"{shown}: the reply is over {MAX_REPLY_BYTES} bytes; is this the competition server? {MAY_HAVE_ARRIVED}",
                                   maybe_received=True)
    except (requests.RequestException, Urllib3Error, OSError) as err:
        raise NotSubmitted(f"{shown}: the reply was cut ({type(err).__name__}); {MAY_HAVE_ARRIVED}", maybe_received=True) from None
    finally:
        resp.close()
    location = _shown_location(url, resp.headers.get("Location", ""))
    return _Answer(resp.status_code, location, b"".join(chunks).decode("utf-8", "replace"))


def _attempt(url: str, data: bytes, timeout_s: float, limit: str = "") -> _Answer:
    """:func:`_request` in a worker thread, waited for ``timeout_s`` (+ grace) at most; ``limit`` names the flag that set it."""
    limit = limit or f"--timeout-s {timeout_s:g}"
    shown = redact_url(url)
    result: dict[str, Any] = {}
    done = threading.Event()
    deadline = time.monotonic() + timeout_s

    def work() -> None:
        try:
            result["answer"] = _request(url, data, timeout_s, deadline, limit)
        except BaseException as err:  # handed to the caller's thread
            result["error"] = err
        finally:
            done.set()

    threading.Thread(target=work, name="submit-post", daemon=True).start()
    if not done.wait(timeout_s + GRACE_S):
        raise NotSubmitted(f"{shown}: no complete answer within {limit}; {MAY_HAVE_ARRIVED}", maybe_received=True)
    if "error" in result:
        raise result["error"]
    return result["answer"]


def _judge(url: str, answer: _Answer) -> dict[str, Any]:
    """The reply as a dict for a 2xx JSON answer; NotSubmitted for a redirect, 4xx or non-JSON."""
    code, text = answer.status, answer.text.strip()[:300]
    shown = redact_url(url)
    if 300 <= code < 400:
        where = answer.location or "(no Location header)"
        raise NotSubmitted(f"{shown} answered HTTP {code} redirect to {where}; a POST is never followed (the body would "
                           f"be dropped), so nothing was submitted. If {where} is the right server, pass it as --url")
    if code == 405:
        raise NotSubmitted(f"HTTP 405 from {shown}: it does not take POSTs; is this the submission URL?", outcome="rejected")
    if code >= 400:
        raise NotSubmitted(f"HTTP {code} from {shown}: {text}", outcome="rejected")
    try:
        reply = json.loads(answer.text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as dup:
        raise NotSubmitted(f"{shown} answered HTTP {code} with the key {dup} twice, so no score is confirmed: {text[:200]!r}; "
                           f"{MAY_HAVE_ARRIVED}", maybe_received=True, answer=text) from None
    except (ValueError, RecursionError):  # RecursionError: arrays or objects nested past the parser's depth
        raise NotSubmitted(f"{shown} answered HTTP {code} but not JSON: {text[:200]!r}", maybe_received=True) from None
    reply = reply if isinstance(reply, dict) else {"reply": reply}
    if code not in SCORED_STATUSES:  # 202 Accepted and the like: taken, maybe queued, not scored
        raise NotSubmitted(f"{shown} answered HTTP {code}, not 200: the body may be queued but no score is confirmed; "
                           f"reply: {json.dumps(reply, default=str)[:300]}; {MAY_HAVE_ARRIVED}", maybe_received=True, answer=reply)
    return reply


class _DuplicateKey(ValueError):
    """A JSON object names one key twice: which of its values counts is anyone's guess."""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    for k in keys:
        if keys.count(k) > 1:
            raise _DuplicateKey(repr(k))
    return dict(pairs)


def _failure_flag(reply: dict[str, Any]) -> str:
    """A failure the reply reports in a key other than ``error`` (``status: error``, ``success: false``...), else ''."""
    for key in ("status", "result", "state"):
        value = reply.get(key)
        if isinstance(value, str) and value.strip().lower() in FAILED_WORDS:
            return f"{key} {value!r}"
    for key in ("success", "ok", "accepted"):
        if reply.get(key) is False:
            return f"{key} false"
    return ""


def _shown_location(url: str, location: str) -> str:
    """A redirect's target, absolute and redacted (a relative one inherits the URL's credentials)."""
    if not location:
        return ""
    target = urljoin(url, location)
    try:
        return redact_url(target)
    except ValueError:
        return target.split("?")[0]


def confirmed_score(url: str, reply: dict[str, Any]) -> float:
    """The score of a 2xx reply: its ``accuracy`` as a finite number (a numeric string is read as one).

    Raises:
        NotSubmitted: (``not-confirmed``, the reply kept as the answer) when the reply holds an
            ``error`` or another failure flag (``status: error``, ``success: false``), or no
            ``accuracy`` that is a finite number from 0 to 1000.
    """
    shown = redact_url(url)
    acc = reply.get("accuracy")
    problem, value = "", math.nan
    if reply.get("error") not in (None, "", False):
        problem = f"an error ({str(reply['error'])[:200]})"
    elif failed := _failure_flag(reply):
        problem = f"a failure ({failed})"
    elif acc is None:
        problem = "no numeric 'accuracy'"
    elif isinstance(acc, bool) or not isinstance(acc, (int, float, str)):
        problem = f"an 'accuracy' that is not a number ({json.dumps(acc, default=str)[:40]})"
    else:
        try:
            value = float(acc.strip() if isinstance(acc, str) else acc)
        except (ValueError, OverflowError):
            problem = f"an 'accuracy' that is not a number ({str(acc)[:40]!r})"
        if not problem and not math.isfinite(value):
            problem = f"'accuracy' {str(acc)[:40]} (not a finite number)"
        elif not problem and not 0.0 <= value <= MAX_SCORE:
            problem = f"'accuracy' {value:g}, outside the score's range 0 to {MAX_SCORE:g}"
    if problem:
        raise NotSubmitted(f"{shown} answered with {problem}, so no score is confirmed; reply: "
                           f"{json.dumps(reply, default=str)[:300]}; {MAY_HAVE_ARRIVED}",
                           maybe_received=True, answer=reply)
    return value


def backoff_wait_s(retry: int, backoff_s: float, max_backoff_s: float) -> float:
    """The wait before retry number ``retry`` (from 1): ``backoff_s`` doubled each time, capped at ``max_backoff_s``."""
    return min(max_backoff_s, backoff_s * 2.0 ** min(retry - 1, 64))


def post(url: str, body: dict[str, Any], timeout_s: float = 30.0, retries: int = 3, backoff_s: float = 1.0,
         max_backoff_s: float = 30.0, deadline_s: float = 300.0) -> dict[str, Any]:
    """POST ``body`` and return the server's JSON reply.

    Retries (with doubling waits from ``backoff_s``, each at most ``max_backoff_s``)
    only a request that never reached the server or that got a 5xx; 3xx and 4xx
    are final, and so is any failure after the body may have arrived. No attempt
    runs past ``deadline_s`` from the start: the last one gets what time is left.

    Raises:
        NotSubmitted: the body was refused, not delivered, or not confirmed.
    """
    data = json.dumps(body).encode()
    shown = redact_url(url)
    end = time.monotonic() + deadline_s
    last, tries = "", 0
    for attempt in range(retries + 1):
        if attempt:
            wait = backoff_wait_s(attempt, backoff_s, max_backoff_s)
            if time.monotonic() + wait >= end:
                break
            log.warning("retrying in %.3g s (%s)", wait, last)
            time.sleep(wait)
        left = end - time.monotonic()
        if left <= 0:
            break
        tries += 1
        try:
            limit = f"--timeout-s {timeout_s:g}" if timeout_s <= left else f"--deadline-s {deadline_s:g}"
            answer = _attempt(url, data, min(timeout_s, left), limit)
        except _Unreached as err:
            last = str(err)
            continue
        if answer.status >= 500:
            last = f"HTTP {answer.status} from {shown}: {answer.text.strip()[:200]}"
            continue
        return _judge(url, answer)
    if tries < retries + 1:
        raise NotSubmitted(f"gave up after {tries} attempt(s): --deadline-s {deadline_s:g} reached ({last})")
    raise NotSubmitted(f"gave up after {retries + 1} attempt(s) ({last})")
