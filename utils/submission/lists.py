"""Top-10 lists, their validation, the request body, and posting it with retries.

Body forms (DESIGN.md): ``dict`` -> ``{"groupname": G, "images": {query: [10 names]}}``;
``list`` (earlier rounds) -> ``{"groupname": G, "images": [{"filename": q,
"gallery_images": [10 names]}]}``. The body is always written to disk first.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import requests

from utils.atomic import atomic_write_bytes
from utils.errors import KitError
from utils.runs.similarity_io import SimMatrix
from utils.runs.topk import topk

log = logging.getLogger(__name__)

TOP_K = 10
FORMATS = ("dict", "list")


class NotSubmitted(KitError):
    """The server did not accept the submission; the body is on disk."""


def top_lists(m: SimMatrix, k: int = TOP_K) -> dict[str, list[str]]:
    """Each query's ``k`` best gallery names, best first."""
    if len(m.gallery_names) < k:
        raise KitError(f"the gallery has {len(m.gallery_names)} images; a top-{k} needs at least {k}")
    idx = topk(m.sim, k)
    return {q: [m.gallery_names[j] for j in row] for q, row in zip(m.query_names, idx.tolist())}


def validate_lists(
    lists: dict[str, list[str]], query_names: list[str], gallery_names: list[str], k: int = TOP_K
) -> None:
    """Every query present, ``k`` distinct names each, all from the gallery.

    Raises:
        KitError: naming the first query that breaks a rule.
    """
    missing = [q for q in query_names if q not in lists]
    if missing:
        raise KitError(f"{len(missing)} query image(s) have no list, e.g. {missing[:3]}")
    extra = [q for q in lists if q not in set(query_names)]
    if extra:
        raise KitError(f"{len(extra)} list(s) for unknown queries, e.g. {extra[:3]}")
    gallery = set(gallery_names)
    for q, names in lists.items():
        if len(names) != k or len(set(names)) != k:
            raise KitError(f"query {q}: needs {k} distinct gallery names, got {len(set(names))} of {len(names)}")
        unknown = [g for g in names if g not in gallery]
        if unknown:
            raise KitError(f"query {q}: {unknown[:3]} not in the gallery")


def make_body(lists: dict[str, list[str]], group: str, form: str = "dict") -> dict[str, Any]:
    """The JSON body in the ``dict`` or ``list`` form."""
    if not group:
        raise KitError("no group name: pass --group NAME or set COMPETITION_GROUP")
    if form == "dict":
        images: Any = lists
    elif form == "list":
        images = [{"filename": q, "gallery_images": g} for q, g in lists.items()]
    else:
        raise KitError(f"--format {form!r}: choose one of {FORMATS}")
    return {"groupname": group, "images": images}


def save_body(body: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``body`` to ``<out_dir>/<UTC timestamp>.json``; never overwrites one."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S_%fZ")
    path = out_dir / f"{stamp}.json"
    n = 1
    while path.exists():
        path = out_dir / f"{stamp}_{n}.json"
        n += 1
    return atomic_write_bytes(path, json.dumps(body, indent=1).encode())


def post(url: str, body: dict[str, Any], timeout_s: float = 30.0, retries: int = 3, backoff_s: float = 1.0) -> dict[str, Any]:
    """POST ``body``; retry connection errors, timeouts and 5xx with exponential backoff.

    4xx answers are final (the body is wrong; sending it again cannot help).

    Raises:
        NotSubmitted: the server refused the body, or never answered well.
    """
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            wait = backoff_s * 2 ** (attempt - 1)
            log.warning("retrying in %.1f s (%s)", wait, last)
            time.sleep(wait)
        try:
            resp = requests.post(url, json=body, timeout=timeout_s)
        except (requests.ConnectionError, requests.Timeout) as err:
            last = f"{type(err).__name__}: cannot reach {url}"
            continue
        if resp.status_code >= 500:
            last = f"HTTP {resp.status_code} from {url}"
            continue
        if resp.status_code >= 400:
            raise NotSubmitted(f"HTTP {resp.status_code} from {url}: {resp.text.strip()[:300]}")
        try:
            reply = resp.json()
        except ValueError:
            raise NotSubmitted(f"{url} answered HTTP {resp.status_code} but not JSON: {resp.text[:200]!r}") from None
        return reply if isinstance(reply, dict) else {"reply": reply}
    raise NotSubmitted(f"gave up after {retries + 1} attempts ({last})")
