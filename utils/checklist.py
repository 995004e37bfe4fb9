"""A checklist of named checks, each ok, a warning or a blocker, printed as one rich table.

    >>> cl = Checklist()
    >>> cl.ok("data", "queries", "1500 images")
    >>> cl.block("server", "answers", "http://host:8000/: connection refused")
    >>> cl.exit_code()
    1

Used by ``preflight.py``; each group of checks lives with its concern
(``utils/data/data_checks.py``, ``utils/runs/run_checks.py``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.table import Table

OK, WARN, BLOCK, SKIP = "ok", "warning", "BLOCKER", "skipped"
_STYLE = {OK: "green", WARN: "yellow", BLOCK: "bold red", SKIP: "dim"}


@dataclass
class Check:
    """One line of the checklist."""

    group: str
    name: str
    status: str
    detail: str


@dataclass
class Checklist:
    """Checks in the order they ran; blockers make the exit code 1, warnings do not."""

    items: list[Check] = field(default_factory=list)

    def add(self, group: str, name: str, status: str, detail: str = "") -> None:
        if status not in _STYLE:
            raise ValueError(f"status {status!r}: choose one of {list(_STYLE)}")
        self.items.append(Check(group, name, status, detail))

    def ok(self, group: str, name: str, detail: str = "") -> None:
        self.add(group, name, OK, detail)

    def warn(self, group: str, name: str, detail: str) -> None:
        self.add(group, name, WARN, detail)

    def block(self, group: str, name: str, detail: str) -> None:
        self.add(group, name, BLOCK, detail)

    def skip(self, group: str, name: str, detail: str) -> None:
        self.add(group, name, SKIP, detail)

    def count(self, status: str) -> int:
        return sum(c.status == status for c in self.items)

    def exit_code(self) -> int:
        """1 when any check is a blocker, else 0."""
        return 1 if self.count(BLOCK) else 0

    def table(self, title: str) -> Table:
        table = Table(title=title)
        for col in ("group", "check", "status", "detail"):
            table.add_column(col, overflow="fold")
        for c in self.items:
            table.add_row(c.group, c.name, f"[{_STYLE[c.status]}]{c.status}[/]", c.detail)
        return table
