"""The submission ledger ``<out>/ledger.jsonl``: written ahead of every POST, append-only, one JSON object a line.

Write-ahead: before a body is posted, an **attempt** line (``kind: attempt``,
``id``, ``time`` (UTC, ISO), ``body`` (the file), ``sha256`` (of that file),
``url`` (redacted: no credentials, no query values), ``group``) is written,
flushed and fsynced. After the answer an **outcome** line (``kind: outcome``, the
attempt's ``id``, ``outcome`` (one of :data:`OUTCOMES`), ``answer`` (the
server's reply or what went wrong), ``score`` (a number, or null)) follows. A dry
run writes one line holding both. :func:`read` joins them: an attempt whose
outcome never came (the process was killed, Ctrl-C, the disk filled) reads as
``unknown``: the server may hold the body, so check the leaderboard.

Each line goes out in one ``write`` on a file opened for appending, then
fsync; when the file does not end with a newline (a torn line left by a kill),
the new line starts with one, so a torn line never swallows the next entry.
Reading skips a line that does not parse, with a warning. Numbers are stored as
JSON numbers; NaN and infinities as null. Entries are numbered 1..n in the order of
their attempts (outcome lines and skipped lines take no number); the ledger is only
appended to, so numbers never shift (``submit.py --history`` shows them; ``--resend N``
takes one). Lines without ``kind`` (older ledgers) are complete entries.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from utils.errors import KitError
from utils.file_hash import file_sha256
from utils.redact import redact_url

log = logging.getLogger(__name__)

LEDGER_NAME = "ledger.jsonl"
OUTCOMES = ("submitted", "not-confirmed", "not-submitted", "dry-run", "rejected")
UNKNOWN = "unknown"  # an attempt without an outcome line: read back only, never written
MAY_COUNT = ("submitted", "not-confirmed", UNKNOWN)  # outcomes after which the server may hold the body


@dataclass
class Entry:
    """One attempt as read back (joined with its outcome); ``number`` is its place among the attempts (from 1)."""

    number: int
    record: dict[str, Any]

    @property
    def body(self) -> str:
        return str(self.record.get("body", ""))

    @property
    def outcome(self) -> str:
        return str(self.record.get("outcome", UNKNOWN))


def finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float (at any depth) replaced by None, for strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_line(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one line, on a line of its own, fsynced.

    Raises:
        OSError: the folder or the file cannot be written (read-only, full, too large).
    """
    line = (json.dumps(finite(record), sort_keys=True, default=str, allow_nan=False) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)  # the umask decides the mode
    try:
        size = os.fstat(fd).st_size
        before = os.pread(fd, size, 0) if size else b""
        if before and not before.endswith(b"\n"):
            line = b"\n" + line  # a torn last line stays alone; ours starts on the next
        view = memoryview(line)
        try:
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            _take_back(fd, size, len(line) - len(view))
            raise
    finally:
        os.close(fd)


def _take_back(fd: int, size: int, written: int) -> None:
    """Cut a line that could not be written whole (file full, size limit) back off, if nobody appended since."""
    try:
        if written and os.fstat(fd).st_size == size + written:
            os.ftruncate(fd, size)
    except OSError:
        pass  # a torn line is skipped by read() and the next append starts on a new line


def append(out_dir: str | Path, *, body: Path, url: str, group: str, outcome: str, answer: Any = "",
           score: float | None = None) -> dict[str, Any]:
    """Append one complete entry (attempt and outcome in one line, as a dry run has) and make it durable."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome {outcome!r} is not one of {OUTCOMES}")
    record = {**_attempt_record(body, url, group), "outcome": outcome, "answer": answer, "score": score}
    _write_line(Path(out_dir) / LEDGER_NAME, record)
    return record


def _attempt_record(body: Path, url: str, group: str) -> dict[str, Any]:
    return {"kind": "attempt", "id": uuid.uuid4().hex, "time": _now(), "body": str(body), "sha256": file_sha256(body),
            "url": redact_url(url) if url else "", "group": group}


def write_attempt(out_dir: str | Path, *, body: Path, url: str, group: str) -> tuple[str, int]:
    """Record that ``body`` is about to be posted, before the POST; ``(attempt id, entry number)``.

    Raises:
        OSError: the ledger cannot be written (then nothing may be sent).
    """
    record = _attempt_record(body, url, group)
    path = Path(out_dir) / LEDGER_NAME
    _write_line(path, record)
    return record["id"], next(e.number for e in _entries(path, warn=False) if e.record.get("id") == record["id"])


def write_outcome(out_dir: str | Path, attempt_id: str, outcome: str, answer: Any = "", score: float | None = None) -> None:
    """Record how the attempt ``attempt_id`` ended.

    Raises:
        OSError: the ledger cannot be written; the attempt then reads back as ``unknown``.
    """
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome {outcome!r} is not one of {OUTCOMES}")
    record = {"kind": "outcome", "id": attempt_id, "time": _now(), "outcome": outcome, "answer": answer, "score": score}
    _write_line(Path(out_dir) / LEDGER_NAME, record)


def _lines(path: Path, warn: bool = True) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of each line that parses as a JSON object; others skipped (with a warning)."""
    records = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, UnicodeDecodeError, RecursionError) as err:
                if warn:
                    log.warning("%s line %d: skipped, not a ledger entry (%s)", path, number, str(err)[:120])
                continue
            records.append((number, record))
    return records


def read(out_dir: str | Path) -> list[Entry]:
    """Every entry, in order, each attempt joined with its outcome (``unknown`` when it has none)."""
    path = Path(out_dir) / LEDGER_NAME
    return _entries(path) if path.is_file() else []


def _entries(path: Path, warn: bool = True) -> list[Entry]:
    """The entries of the ledger at ``path``, numbered 1..n in the order of their attempts."""
    entries: list[Entry] = []
    by_id: dict[str, Entry] = {}
    for line, record in _lines(path, warn):
        if record.get("kind") == "outcome":
            entry = by_id.get(str(record.get("id")))
            if entry is None:
                if warn:
                    log.warning("%s line %d: an outcome of no recorded attempt, skipped", path, line)
                continue
            entry.record.update({k: v for k, v in record.items() if k in ("outcome", "answer", "score")})
            entry.record["outcome_time"] = record.get("time")
            continue
        entry = Entry(len(entries) + 1, dict(record))
        entry.record.setdefault("outcome", UNKNOWN)
        entries.append(entry)
        if record.get("id"):
            by_id[str(record["id"])] = entry
    return entries


def sent_before(out_dir: str | Path, sha256: str) -> list[Entry]:
    """The entries that posted a body with this hash and that the server may have counted."""
    return [e for e in read(out_dir) if e.record.get("sha256") == sha256 and e.outcome in MAY_COUNT]


def find(out_dir: str | Path, number: int) -> Entry:
    """The entry with that number (as ``--history`` shows it).

    Raises:
        KitError: no such entry.
    """
    for entry in read(out_dir):
        if entry.number == number:
            return entry
    raise KitError(f"{Path(out_dir) / LEDGER_NAME}: no entry {number}; list them with submit.py --history --out {out_dir}")


def body_of(out_dir: str | Path, entry: Entry) -> Path:
    """The body file an entry names (or the same name in ``out_dir``), unchanged since it was sent.

    Raises:
        KitError: the file is gone or its content changed.
    """
    path = Path(entry.body)
    if not path.is_file() and (Path(out_dir) / path.name).is_file():
        path = Path(out_dir) / path.name
    if not path.is_file():
        raise KitError(f"ledger entry {entry.number}: body file {entry.body} not found")
    if entry.record.get("sha256") and file_sha256(path) != entry.record["sha256"]:
        raise KitError(f"ledger entry {entry.number}: {path} changed since it was recorded (sha256 differs); "
                       f"pass the file itself to --resend if you mean to send it as it is now")
    return path


def history_table(entries: list[Entry], title: str) -> Table:
    """The ledger as a rich table, oldest first."""
    table = Table(title=title)
    for col, justify in (("#", "right"), ("time (UTC)", "left"), ("outcome", "left"), ("score", "right"),
                         ("group", "left"), ("url", "left"), ("body", "left"), ("sha256", "left"), ("answer", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    colour = {"submitted": "green", "rejected": "red", "not-submitted": "yellow", "not-confirmed": "yellow",
              "dry-run": "dim", UNKNOWN: "bold yellow"}
    for e in entries:
        r = e.record
        outcome = e.outcome if e.outcome != UNKNOWN else "unknown: check the leaderboard"
        score = r.get("score")
        answer = r.get("answer", "")
        answer = answer if isinstance(answer, str) else json.dumps(answer, sort_keys=True)
        cells = [str(r.get("group", "")), _shown_url(str(r.get("url", ""))), Path(e.body).name, str(r.get("sha256", ""))[:12], answer[:80]]
        table.add_row(str(e.number), escape(str(r.get("time", ""))), f"[{colour.get(e.outcome, 'white')}]{escape(outcome)}[/]",
                      "" if score is None else escape(str(score)), *map(escape, cells))
    return table


def _shown_url(url: str) -> str:
    """A URL of the ledger as shown: redacted again, for lines written before redaction existed."""
    try:
        return redact_url(url) if url else ""
    except ValueError:
        return url.split("@")[-1].split("?")[0]
