"""The server URL: one check for every malformed kind, and a redacted form for the ledger and the screen.

:func:`check_url` is the single place where a ``--url`` (or ``COMPETITION_URL``)
is judged; ``submit.py`` and preflight both call it, so a URL is refused the same
way, in one line, before any work or network call. :func:`redact_url` hides what
may be a secret: the user name and password (``user:pass@``) and the value of
every query parameter (``?token=...``), since we cannot know which ones are
secrets; the fragment is dropped. The ledger and every message show only that form.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

import requests

from utils.errors import KitError

_UNSAFE = re.compile(r"[\s\x00-\x1f\x7f]")  # whitespace or control characters: never part of a URL we send
_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?$")
HIDDEN = "***"
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


def shown_for_error(url: str) -> str:
    """``url`` as typed (so a stray character stays visible) with the user info and query values hidden."""
    text = re.sub(r"^([^/?#]*//)?[^/?#]*@", lambda m: (m.group(1) or "") + f"{HIDDEN}@", url, count=1)
    if "?" in text:
        head, query = text.split("?", 1)
        keys = [pair.split("=", 1)[0] for pair in query.split("#", 1)[0].split("&") if pair]
        text = head + "?" + "&".join(f"{key}={HIDDEN}" for key in keys)
    return text


def redact_url(url: str) -> str:
    """``url`` with its user info and query values hidden and its fragment dropped.

    ``http://user:pw@host:8000/s?token=abc&team=x`` -> ``http://***@host:8000/s?token=***&team=***``.

    Raises:
        ValueError: ``url`` does not parse (call :func:`check_url` first).
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{HIDDEN}@" + netloc.rsplit("@", 1)[1]
    text = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else netloc + parts.path
    if parts.query:
        keys = [pair.split("=", 1)[0] for pair in parts.query.split("&") if pair]
        text += "?" + "&".join(f"{key}={HIDDEN}" for key in keys)
    return text
