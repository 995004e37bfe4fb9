"""The stages of ``submit.py``, in order: target -> body (from a run, or an earlier one) -> send -> record.

Each stage raises a KitError (exit 2) for bad input; :func:`send` returns the
exit code: 0 submitted, 3 not submitted (the body stays on disk). Every attempt,
dry runs included, goes to the ledger (utils.submission.ledger).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from rich.table import Table

from utils.atomic import atomic_write_json
from utils.data.layout import load_layout
from utils.errors import KitError
from utils.logs import console
from utils.runs.similarity_io import load_run
from utils.submission import ledger
from utils.submission.client import NotSubmitted, check_url, post
from utils.submission.lists import make_body, parse_body, save_body, top_lists, validate_lists
from utils.submission.preview import write_preview

log = logging.getLogger(__name__)

NOT_SUBMITTED = 3


def resolve_target(url: str, group: str, sending: bool) -> tuple[str, str]:
    """URL and team from the flags or ``COMPETITION_URL`` / ``COMPETITION_GROUP``; the URL checked.

    Raises:
        KitError: a malformed URL (even for a dry run), or none when ``sending``.
    """
    source = "--url" if url else "COMPETITION_URL"
    url = url or os.environ.get("COMPETITION_URL", "")
    if url:
        check_url(url, source)
    elif sending:
        raise KitError("no server URL: pass --url URL or set COMPETITION_URL (or use --dry-run)")
    return url, group or os.environ.get("COMPETITION_GROUP", "")


def data_names(data: Path) -> tuple[list[str], list[str]]:
    """The file names of DATA/test/query and DATA/test/gallery."""
    layout = load_layout(data)
    return [p.name for p in layout.query], [p.name for p in layout.gallery]


def check_against_data(data: Path, query_names: list[str], gallery_names: list[str]) -> None:
    """The run's names must be exactly the files in DATA/test/{query,gallery}."""
    on_disk = dict(zip(("query", "gallery"), data_names(data)))
    for what, names in (("query", query_names), ("gallery", gallery_names)):
        if set(names) != set(on_disk[what]):
            missing, extra = sorted(set(on_disk[what]) - set(names))[:3], sorted(set(names) - set(on_disk[what]))[:3]
            raise KitError(
                f"{data / 'test' / what}: the run's {what} names differ from the folder "
                f"(not in run: {missing}, not on disk: {extra}); re-run the model on this data"
            )


def body_from_run(run: Path, data: str, group: str, form: str, out: Path, preview: int) -> tuple[dict[str, Any], Path]:
    """Top-10 lists of the run's test matrix, validated, written to ``out`` as the body."""
    if preview and not data:
        raise KitError("--preview needs --data DIR to find the images")
    test = load_run(run, splits=("test",)).splits["test"]
    if data:
        check_against_data(Path(data), test.query_names, test.gallery_names)
    lists = top_lists(test)
    validate_lists(lists, test.query_names, test.gallery_names)
    body = make_body(lists, group, form)
    body_path = save_body(body, out)
    log.info("wrote %s (%d queries, %s form)", body_path, len(lists), form)
    if preview:
        log.info("top-10 preview: %s", write_preview(body_path.with_suffix(".html"), lists, Path(data), preview))
    return body, body_path


def resend_path(resend: str, out: Path) -> Path:
    """``--resend``'s file, or the body of that ledger entry when it is a number."""
    path = Path(resend)
    if path.is_file() or not resend.isdigit():
        return path
    return ledger.body_of(out, ledger.find(out, int(resend)))


def body_to_resend(resend: str, out: Path, data: str) -> tuple[dict[str, Any], Path]:
    """An earlier body, read back and checked as a submission before anything is sent.

    Raises:
        KitError: unreadable, not JSON, or not a valid body (with --data: names not in the folders).
    """
    path = resend_path(resend, out)
    try:
        body = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise KitError(f"{path}: cannot read a saved body ({type(err).__name__}: {str(err)[:200]})") from None
    try:
        _, lists = parse_body(body)
        if data:
            validate_lists(lists, *data_names(Path(data)))
    except KitError as err:
        raise KitError(f"{path}: not a valid submission body, nothing sent ({err})") from None
    return body, path


def record_dry_run(body_path: Path, url: str, group: str, out: Path) -> int:
    """Note the dry run in the ledger and say where the body is."""
    ledger.append(out, body=body_path, url=url, group=group, outcome="dry-run", answer="nothing sent")
    console.print(f"dry run: body at {body_path}, nothing sent")
    return 0


def send(body: dict[str, Any], body_path: Path, url: str, out: Path, timeout_s: float, retries: int, backoff_s: float) -> int:
    """POST the body, record the attempt, print the answer; the exit code."""
    group = str(body.get("groupname", ""))
    try:
        reply = post(url, body, timeout_s, retries, backoff_s)
    except NotSubmitted as err:
        ledger.append(out, body=body_path, url=url, group=group, outcome=err.outcome, answer=err.answer)
        head = "NOT CONFIRMED" if err.maybe_received else "NOT SUBMITTED"
        log.error("%s: %s; the body is saved at %s (send it again with --resend %s)", head, err, body_path, body_path)
        return NOT_SUBMITTED
    score = reply.get("accuracy")
    ledger.append(out, body=body_path, url=url, group=group, outcome="submitted", answer=reply,
                  score=score if isinstance(score, (int, float)) else None)
    atomic_write_json(body_path.with_suffix(".response.json"), reply)
    table = Table(title="submitted")
    table.add_column("key")
    table.add_column("value", justify="right")
    table.add_row("body", str(body_path))
    table.add_row("server", url)
    for key, val in reply.items():
        table.add_row(str(key), f"{val:.4f}" if isinstance(val, float) else str(val))
    console.print(table)
    if score is not None:
        console.print(f"[bold green]score: {score}[/]")
    return 0


def show_history(out: Path) -> int:
    """Print the ledger of ``out`` as a table."""
    entries = ledger.read(out)
    if not entries:
        console.print(f"no submissions recorded in {out / ledger.LEDGER_NAME}")
        return 0
    console.print(ledger.history_table(entries, f"{out / ledger.LEDGER_NAME}: {len(entries)} attempt(s)"))
    return 0
