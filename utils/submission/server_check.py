"""Preflight check of the competition server: a GET with a short timeout (never a POST)."""

from __future__ import annotations

import time

import requests

from utils.checklist import Checklist
from utils.redact import redact_url, shown_for_error
from utils.submission.client import url_problem


def check_server(cl: Checklist, url: str, group: str, timeout_s: float = 5.0) -> None:
    """Does ``url`` answer a GET within ``timeout_s``, and is a team name set?

    Any HTTP answer means the server is up (405 is usual for a POST-only
    endpoint); a redirect is a warning (a POST must not follow it); no answer
    is a blocker.
    """
    if not url:
        cl.skip("server", "answers", "no --url (or COMPETITION_URL): not checked")
        return
    problem = url_problem(url)  # the same check as submit.py's --url
    if problem:
        shown = shown_for_error(url)
        cl.block("server", "url", f"--url {shown!r}: {problem}; expected http://HOST:PORT/...")
        return
    full, url = url, redact_url(url)  # what is shown from here on carries no credentials
    if group.strip():
        cl.ok("server", "group", f"team {group!r}")
    else:
        cl.block("server", "group", "no --group TEAM (or COMPETITION_GROUP): submit.py needs it")
    t0 = time.monotonic()
    try:
        reply = requests.get(full, timeout=(timeout_s, timeout_s), allow_redirects=False)
    except requests.Timeout:
        cl.block("server", "answers", f"{url}: no answer within {timeout_s:g} s")
        return
    except requests.RequestException as err:
        cl.block("server", "answers", f"{url}: does not answer ({type(err).__name__}: connection refused or host unknown)")
        return
    ms = (time.monotonic() - t0) * 1000
    code = reply.status_code
    if 300 <= code < 400:
        cl.warn("server", "answers", f"{url}: HTTP {code} redirect to {reply.headers.get('Location')!r}; submit to that URL instead")
    elif code >= 500:
        cl.warn("server", "answers", f"{url}: HTTP {code} in {ms:.0f} ms; it is up but failing")
    elif code == 404:
        cl.warn("server", "answers", f"{url}: HTTP 404 in {ms:.0f} ms; check the path of --url")
    else:
        cl.ok("server", "answers", f"{url}: HTTP {code} in {ms:.0f} ms (GET only, nothing submitted)")
