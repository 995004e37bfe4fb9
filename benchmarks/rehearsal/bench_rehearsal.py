"""The whole rehearsal, first run (cold: data generated, model trained, everything embedded) vs a
second run on the same folder (warm: every cache answers).

    .venv/bin/python benchmarks/rehearsal/bench_rehearsal.py              # 2 cold/warm pairs in fresh folders
    .venv/bin/python benchmarks/rehearsal/bench_rehearsal.py --pairs 3

Each pair runs `bash scripts/rehearsal.sh` twice into a new REHEARSAL_DIR and checks that the
two runs submitted the same score. Prints a rich table (wall seconds per run, warm/cold ratio,
median over pairs) and writes benchmarks/results/bench_rehearsal.md.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.table import Table

from benchmarks.common import ROOT, write_results
from utils.logs import console


def run_once(folder: Path) -> tuple[float, str]:
    env = {**os.environ, "REHEARSAL_DIR": str(folder)}
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", "scripts/rehearsal.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: the rehearsal failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    score = re.findall(r"score: ([0-9.]+)", proc.stdout)
    return seconds, score[-1] if score else "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2, help="cold/warm pairs (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_rehearsal.md", help="table file (default: %(default)s)")
    args = ap.parse_args()
    subprocess.run(["bash", "scripts/setup.sh"], cwd=ROOT, check=True)  # the venv exists before timing starts
    rows = []
    for i in range(args.pairs):
        with tempfile.TemporaryDirectory() as tmp:
            cold, s1 = run_once(Path(tmp) / "rehearsal")
            warm, s2 = run_once(Path(tmp) / "rehearsal")
        if s1 != s2:
            raise SystemExit(f"error: the warm run scored {s2}, the cold one {s1}: a cache changed the result")
        rows.append((i + 1, cold, warm, cold / warm, s1))
    table = Table(title="rehearsal: first run vs second run on the same folder")
    md = ["| pair | cold s | warm s | cold / warm | score |", "|---:|---:|---:|---:|---:|"]
    for col in ("pair", "cold s", "warm s", "cold / warm", "score"):
        table.add_column(col, justify="right")
    for r in rows:
        cells = (str(r[0]), f"{r[1]:.1f}", f"{r[2]:.1f}", f"{r[3]:.2f}x", r[4])
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    med = statistics.median(r[3] for r in rows)
    table.add_row("median", "", "", f"{med:.2f}x", "")
    md.append(f"| median | | | {med:.2f}x | |")
    console.print(table)
    write_results(args.out, "\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
