"""Top-10 lists, their validation, and the request body (building, saving, reading it back).

Body forms (docs/design.md): ``dict`` -> ``{"groupname": G, "images": {query: [10 names]}}``;
``list`` (earlier rounds) -> ``{"groupname": G, "images": [{"filename": q,
"gallery_images": [10 names]}]}``. The body is always written to disk first;
:func:`parse_body` reads either form back and checks its shape (``--resend`` and
the local server use it). Posting it is utils.submission.client.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from utils.atomic import atomic_write_bytes
from utils.errors import KitError
from utils.runs.similarity_io import SimMatrix

log = logging.getLogger(__name__)

TOP_K = 10
FORMATS = ("dict", "list")


class BadBody(KitError):
    """A request body that breaks the protocol (its shape, not its names)."""


def top_lists(m: SimMatrix, k: int = TOP_K) -> dict[str, list[str]]:
    """Each query's ``k`` best gallery names, best first (:meth:`SimMatrix.top_lists`)."""
    return m.top_lists(k)


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
    known = set(query_names)  # built once: rebuilding it per query made this quadratic
    extra = [q for q in lists if q not in known]
    if extra:
        raise KitError(f"{len(extra)} list(s) for unknown queries, e.g. {extra[:3]}")
    gallery = set(gallery_names)
    for q, names in lists.items():
        if len(names) != k or len(set(names)) != k:
            raise KitError(f"query {q}: needs {k} distinct gallery names, got {len(set(names))} of {len(names)}")
        if not gallery.issuperset(names):
            unknown = [g for g in names if g not in gallery]
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


def parse_body(body: Any, k: int | None = TOP_K) -> tuple[str, dict[str, list[str]]]:
    """``(group, {query: names})`` from a body of either form, its shape checked.

    A group name, at least one query, each query once, each list made of strings
    and (unless ``k`` is None) ``k`` distinct ones. Whether the names exist is
    :func:`validate_lists`' job.

    Raises:
        BadBody: naming the first rule broken.
    """
    if not isinstance(body, dict):
        raise BadBody("body must be a JSON object with 'groupname' and 'images'")
    group = body.get("groupname")
    if not isinstance(group, str) or not group.strip():
        raise BadBody("'groupname' must be a non-empty string")
    images = body.get("images")
    if isinstance(images, list):
        pairs = []
        for i, item in enumerate(images):
            if not isinstance(item, dict) or "filename" not in item or "gallery_images" not in item:
                raise BadBody(f"images[{i}] must be {{'filename': ..., 'gallery_images': [...]}}")
            pairs.append((item["filename"], item["gallery_images"]))
    elif isinstance(images, dict):
        pairs = list(images.items())
    else:
        raise BadBody("'images' must be {query: [gallery names]} or a list of {filename, gallery_images}")
    if not pairs:
        raise BadBody("'images' is empty: no query has a list")
    lists: dict[str, list[str]] = {}
    for q, names in pairs:
        if not isinstance(q, str):
            raise BadBody(f"query name {str(q)[:80]} is not a string")
        if q in lists:
            raise BadBody(f"query {q} is listed twice")
        if not isinstance(names, list) or not all(isinstance(g, str) for g in names):
            raise BadBody(f"query {q}: needs a list of {k or TOP_K} gallery names (strings)")
        if k is not None and (len(names) != k or len(set(names)) != k):
            raise BadBody(f"query {q}: needs {k} distinct gallery names, got {len(set(names))} of {len(names)}")
        lists[q] = names
    return group, lists
