"""Secrets kept off screens and files: a URL with its user info and query values hidden.

The submission client, the ledger and preflight show and store URLs only through
:func:`redact_url` (or :func:`shown_for_error` for one that does not parse).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

HIDDEN = "***"


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
