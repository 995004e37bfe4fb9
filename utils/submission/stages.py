"""The stages of ``submit.py``, in order: target -> body (from a run, or an earlier one) -> send -> record.

Each stage raises a KitError (exit 2) for bad input, a file it cannot write
included (:func:`writing`); :func:`send` returns the exit code: 0
submitted (a score confirmed), 3 not submitted or not confirmed (the body stays
on disk). Every attempt, dry runs included, goes to the ledger
(utils.runs.ledger), written ahead of the POST.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from rich.markup import escape
from rich.table import Table

from utils.atomic import atomic_write_json
from utils.data.layout import load_layout
from utils.errors import KitError
from utils.file_hash import file_sha256
from utils.logs import console
from utils.redact import redact_url
from utils.runs import ledger
from utils.runs.data_fingerprint import refuse_other_data
from utils.runs.topk_run import load_split
from utils.submission.client import NotSubmitted, check_url, confirmed_score, post
from utils.submission.lists import TOP_K, make_body, parse_body, save_body, validate_lists
from utils.submission.preview import write_preview

log = logging.getLogger(__name__)

NOT_SUBMITTED = 3


# Filesystem errors of the outputs as one line: the path, what happened, what to do. Local to the
# submission group for now; a kit-wide OSError -> one-line mapping (utils/errors.py) can replace it.
_REASONS = {
    errno.ENOSPC: "no space left on the device: free some space or pass another --out",
    errno.EDQUOT: "the disk quota is used up: free some space or pass another --out",
    errno.EROFS: "the file system is read-only: pass a writable --out",
    errno.EFBIG: "file too large (a file-size limit, see ulimit -f): raise the limit or pass another --out",
    errno.EACCES: "permission denied: pass a folder you may write as --out",
    errno.EPERM: "operation not permitted: pass a folder you may write as --out",
    errno.ENOTDIR: "a part of the path is a file, not a folder: pass another --out",
    errno.EEXIST: "a file of that name is in the way: pass another --out",
}


def describe(err: OSError) -> str:
    """What went wrong and the fix, in a few words."""
    return _REASONS.get(err.errno or 0, f"{err.strerror or type(err).__name__}")


def write_error(path: str | Path, err: OSError, what: str) -> KitError:
    """A KitError ``<path>: cannot write <what> (<reason and fix>)``."""
    where = err.filename if err.filename else path
    return KitError(f"{where}: cannot write {what} ({describe(err)})")


@contextmanager
def writing(path: str | Path, what: str) -> Iterator[None]:
    """Turn an OSError raised inside the block into :func:`write_error`'s one line."""
    try:
        yield
    except OSError as err:
        raise write_error(path, err, what) from None


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
    if preview < 0:
        raise KitError(f"--preview {preview}: the number of queries on the page, 0 or more (0 = no page)")
    if preview and not data:
        raise KitError("--preview needs --data DIR to find the images")
    test = load_split(run, "test")  # either form: full matrices, or the top-k form's stored candidates (large galleries)
    if data:
        check_against_data(Path(data), test.query_names, test.gallery_names)
        refuse_other_data(run, Path(data))  # same names, other images (utils/runs/data_fingerprint.py)
    lists = test.top_lists(TOP_K)
    validate_lists(lists, test.query_names, test.gallery_names)
    body = make_body(lists, group, form)
    with writing(out, "the submission body"):
        body_path = save_body(body, out)
    log.info("wrote %s (%d queries, %s form)", body_path, len(lists), form)
    if preview:
        with writing(body_path.with_suffix(".html"), "the preview page"):
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


def check_resend(body: dict[str, Any], body_path: Path, group: str, out: Path, force: bool) -> None:
    """A resend goes out as the body is: a different ``--group`` is an error, and so is a body sent before without ``--force``.

    Raises:
        KitError: the group differs from the body's, or the ledger records the body as (maybe) counted.
    """
    if group and group != body.get("groupname"):
        raise KitError(f"{body_path}: --group (or COMPETITION_GROUP) {group!r} differs from the body's groupname "
                       f"{body.get('groupname')!r}; a resend sends the body as it is: drop --group, or build a new body "
                       f"with submit.py --run RUN --group {group}")
    check_not_sent(body_path, out, force)


def check_not_sent(body_path: Path, out: Path, force: bool, url: str = "") -> None:
    """A body the ledger records as (maybe) counted goes again only with ``force``: by any URL for a resend,
    to the same server (``url``) for a body built again from the same run.

    Raises:
        KitError: the ledger holds the same body as submitted, not confirmed or unknown.
    """
    if force:
        return
    earlier = ledger.sent_before(out, file_sha256(body_path))
    if url:
        earlier = [e for e in earlier if e.record.get("url") == redact_url(url)]
    if earlier:
        e = earlier[-1]
        score = e.record.get("score")
        what = f"{e.outcome}" + (f", score {score}" if score is not None else "")
        raise KitError(f"{body_path}: already sent (ledger entry {e.number}: {what}, to {e.record.get('url', '?')}); "
                       f"each resend may count on the leaderboard: check it, then add --force to send it again")


def record_dry_run(body_path: Path, url: str, group: str, out: Path) -> int:
    """Note the dry run in the ledger and say where the body is."""
    with writing(out / ledger.LEDGER_NAME, "the ledger"):
        ledger.append(out, body=body_path, url=url, group=group, outcome="dry-run", answer="nothing sent")
    console.print(f"dry run: body at {body_path}, nothing sent")
    return 0


def send(body: dict[str, Any], body_path: Path, url: str, out: Path, timeout_s: float, retries: int, backoff_s: float,
         max_backoff_s: float = 30.0, deadline_s: float = 300.0) -> int:
    """Record the attempt, POST the body, record the outcome, print the answer; the exit code."""
    group = str(body.get("groupname", ""))
    with writing(out / ledger.LEDGER_NAME, "the ledger, so nothing was sent"):
        attempt_id, number = ledger.write_attempt(out, body=body_path, url=url, group=group)
    try:
        reply = post(url, body, timeout_s, retries, backoff_s, max_backoff_s, deadline_s)
        score = confirmed_score(url, reply)
    except NotSubmitted as err:
        return _not_submitted(err, out, attempt_id, body_path)
    except KeyboardInterrupt:
        log.error("interrupted before the server's answer: it may hold the body. Ledger entry %d stays 'unknown'; "
                  "check the leaderboard before sending it again (--resend %d --force)", number, number)
        raise
    _show_reply(reply, score, body_path, url)
    problems = []
    try:
        atomic_write_json(body_path.with_suffix(".response.json"), ledger.finite(reply))
    except OSError as err:
        problems.append(f"the reply file {body_path.with_suffix('.response.json')} ({describe(err)})")
    try:
        ledger.write_outcome(out, attempt_id, "submitted", answer=reply, score=score)
    except OSError as err:
        problems.append(f"the ledger {out / ledger.LEDGER_NAME} ({describe(err)}); --history shows entry {number} as unknown")
    if problems:
        console.print(f"[bold red]the ledger could not be written[/]: {escape('; '.join(problems))}. The score above is "
                      f"the only full record: note it", soft_wrap=True)
    return 0


def _not_submitted(err: NotSubmitted, out: Path, attempt_id: str, body_path: Path) -> int:
    """Record a failed attempt and say what to do; exit code 3."""
    try:
        ledger.write_outcome(out, attempt_id, err.outcome, answer=err.answer)
    except OSError as write_err:
        log.error("the ledger could not be written (%s): %s", out / ledger.LEDGER_NAME, describe(write_err))
    head = "NOT CONFIRMED" if err.maybe_received else "NOT SUBMITTED"
    again = f"--resend {body_path} --force" if err.maybe_received else f"--resend {body_path}"
    log.error("%s: %s; the body is saved at %s (send it again with %s)", head, err, body_path, again)
    return NOT_SUBMITTED


def _show_reply(reply: dict[str, Any], score: float, body_path: Path, url: str) -> None:
    """The server's reply as a table, then the score."""
    table = Table(title="submitted")
    table.add_column("key")
    table.add_column("value", justify="right")
    table.add_row("body", str(body_path))
    table.add_row("server", redact_url(url))
    for key, val in reply.items():
        table.add_row(str(key), f"{val:.4f}" if isinstance(val, float) else str(val))
    console.print(table)
    console.print(f"[bold green]score: {score}[/]")


def show_history(out: Path) -> int:
    """Print the ledger of ``out`` as a table."""
    entries = ledger.read(out)
    if not entries:
        console.print(f"no submissions recorded in {out / ledger.LEDGER_NAME}")
        return 0
    console.print(ledger.history_table(entries, f"{out / ledger.LEDGER_NAME}: {len(entries)} attempt(s)"))
    for e in entries:
        if e.outcome == ledger.UNKNOWN:
            console.print(f"entry {e.number} ({escape(Path(e.body).name)}): no outcome recorded (killed, interrupted or "
                          f"disk full): unknown: check the leaderboard before --resend {e.number} --force", soft_wrap=True)
    return 0
