"""Which default weights the weights folder holds: the preflight check and the ``list`` table.

    >>> cl = Checklist(); check_weights(cl)     # preflight.py: one line, ok or a warning naming what is missing
    >>> rows = default_status()                 # [(spec, 'present' | 'missing: ...'), ...]
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from utils.checklist import Checklist
from utils.errors import KitError
from utils.weights.catalog import WeightSpec, default_specs
from utils.weights.resolve import FETCH_HINT
from utils.weights.store import Entry, read_manifest, weights_dir


def default_status(root: Path | None = None, verify: bool = False) -> list[tuple[WeightSpec, str, Entry | None]]:
    """Each default spec with '' when present in the folder, else what is wrong, and its entry.

    Raises:
        KitError: a damaged manifest.
    """
    root = root or weights_dir()
    entries = read_manifest(root)
    rows = []
    for spec in default_specs():
        record = entries.get(spec.name)
        if record is None:
            rows.append((spec, "not fetched", None))
            continue
        entry = Entry(spec.name, root, record)
        rows.append((spec, entry.problem(verify), entry))
    return rows


def status_table(rows: list[tuple[WeightSpec, str, Entry | None]], root: Path) -> Table:
    table = Table(title=f"default weights in {root}")
    for col in ("weights", "used by", "status", "MB"):
        table.add_column(col)
    for spec, problem, entry in rows:
        size = sum(f["size"] for f in entry.record["files"]) / 1e6 if entry and not problem else 0
        table.add_row(spec.name, spec.used_by, "[green]present[/]" if not problem else f"[yellow]{problem}[/]",
                      f"{size:,.0f}" if size else "-")
    return table


def check_weights(cl: Checklist, root: Path | None = None) -> None:
    """Preflight, one line: ok when the weights folder holds every default, else a warning naming those that would need the hub."""
    root = root or weights_dir()
    try:
        rows = default_status(root)
    except KitError as err:
        cl.warn("weights", "default weights", str(err))
        return
    missing = [f"{spec.name} ({spec.used_by})" for spec, problem, _ in rows if problem]
    present = f"{len(rows) - len(missing)} of {len(rows)} in {root}"
    if missing:
        cl.warn("weights", "default weights", f"{present}; these would need the hub: {'; '.join(missing)} "
                f"(run {FETCH_HINT} where there is internet, or pass --weights PATH)")
    else:
        cl.ok("weights", "default weights", present)
