"""The submission ledger: one JSON line per attempt in ``<out>/ledger.jsonl``, append-only.

Each line: ``time`` (UTC, ISO), ``body`` (the body file), ``sha256`` (of that
file), ``url``, ``group``, ``outcome`` (one of :data:`OUTCOMES`), ``answer``
(the server's reply or what went wrong) and ``score`` (the reply's
``accuracy``, or null). A line is written with one ``write`` on a file opened
for appending, then flushed and fsynced, so a kill leaves at most one torn last
line. Reading skips a line that does not parse, with a warning. An entry's
number is its line number, so numbers never shift (``submit.py --history``
shows them; ``--resend N`` takes one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from utils.errors import KitError

log = logging.getLogger(__name__)

LEDGER_NAME = "ledger.jsonl"
OUTCOMES = ("submitted", "not-submitted", "dry-run", "rejected")


@dataclass
class Entry:
    """One attempt as read back; ``number`` is its line in the ledger (from 1)."""

    number: int
    record: dict[str, Any]

    @property
    def body(self) -> str:
        return str(self.record.get("body", ""))


def body_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a body file."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def append(out_dir: str | Path, *, body: Path, url: str, group: str, outcome: str, answer: Any = "",
           score: float | None = None) -> dict[str, Any]:
    """Append one attempt to ``<out_dir>/ledger.jsonl`` and make it durable."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome {outcome!r} is not one of {OUTCOMES}")
    record = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "body": str(body),
        "sha256": body_sha256(body),
        "url": url,
        "group": group,
        "outcome": outcome,
        "answer": answer,
        "score": score,
    }
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    path = Path(out_dir) / LEDGER_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the umask decides the mode
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return record


def read(out_dir: str | Path) -> list[Entry]:
    """Every entry that parses, in order; a corrupt line is skipped with a warning."""
    path = Path(out_dir) / LEDGER_NAME
    if not path.is_file():
        return []
    entries = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, UnicodeDecodeError) as err:
                log.warning("%s line %d: skipped, not a ledger entry (%s)", path, number, err)
                continue
            entries.append(Entry(number, record))
    return entries


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
    if entry.record.get("sha256") and body_sha256(path) != entry.record["sha256"]:
        raise KitError(f"ledger entry {entry.number}: {path} changed since it was recorded (sha256 differs); "
                       f"pass the file itself to --resend if you mean to send it as it is now")
    return path


def history_table(entries: list[Entry], title: str) -> Table:
    """The ledger as a rich table, oldest first."""
    table = Table(title=title)
    for col, justify in (("#", "right"), ("time (UTC)", "left"), ("outcome", "left"), ("score", "right"),
                         ("group", "left"), ("url", "left"), ("body", "left"), ("sha256", "left"), ("answer", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    colour = {"submitted": "green", "rejected": "red", "not-submitted": "yellow", "dry-run": "dim"}
    for e in entries:
        r = e.record
        outcome = str(r.get("outcome", "?"))
        score = r.get("score")
        answer = r.get("answer", "")
        answer = answer if isinstance(answer, str) else json.dumps(answer, sort_keys=True)
        cells = [str(r.get("group", "")), str(r.get("url", "")), Path(e.body).name, str(r.get("sha256", ""))[:12], answer[:80]]
        table.add_row(str(e.number), escape(str(r.get("time", ""))), f"[{colour.get(outcome, 'white')}]{escape(outcome)}[/]",
                      "" if score is None else escape(str(score)), *map(escape, cells))
    return table
