"""Benchmark of submit.py's validation and of a whole dry run at scale.

    # validate_lists on 50k queries x 10 names over a 50k gallery (and the old quadratic
    # version up to 10k queries, for the ratio), then a whole dry run on a 20k x 20k run:
    .venv/bin/python benchmarks/scale/bench_submit.py
    # smaller and quicker (no 1.6 GB matrix on disk):
    .venv/bin/python benchmarks/scale/bench_submit.py --dry-run-size 5000 --old-max 5000

The dry run writes a random float32 run folder (size x size, 1.6 GB at 20k) under
--work, times ``submit.main([... "--dry-run"])`` end to end, and each stage inside
it (loading and checking the matrix, top-10, validation, writing the body), in
wall and CPU seconds: on a shared machine CPU seconds are the steadier figure. A 50k x 50k matrix would be 10 GB on disk; the
validation figure for 50k queries comes from the first table instead, which
runs the same function on lists of the same size. Writes the tables to
benchmarks/results/bench_submit.md (or --out).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from rich.table import Table

import submit
from benchmarks.common import ROOT, write_results
from utils.errors import KitError, run_cli
from utils.logs import console, setup_logging
from utils.submission import stages
from utils.submission.lists import validate_lists


def quadratic_validate(lists: dict[str, list[str]], query_names: list[str], gallery_names: list[str], k: int = 10) -> None:
    """The validation as it was before issue 9 (a set of the queries rebuilt for every list)."""
    missing = [q for q in query_names if q not in lists]
    if missing:
        raise KitError("missing")
    extra = [q for q in lists if q not in set(query_names)]
    if extra:
        raise KitError("extra")
    gallery = set(gallery_names)
    for q, names in lists.items():
        if len(names) != k or len(set(names)) != k or any(g not in gallery for g in names):
            raise KitError(q)


def random_lists(n_query: int, n_gallery: int, seed: int = 0) -> tuple[dict[str, list[str]], list[str], list[str]]:
    rng = np.random.default_rng(seed)
    q = [f"q{i:06d}.jpg" for i in range(n_query)]
    g = [f"g{i:06d}.jpg" for i in range(n_gallery)]
    picks = np.stack([rng.choice(n_gallery, 10, replace=False) for _ in range(min(n_query, 1000))])
    rows = picks[np.arange(n_query) % len(picks)]
    return {name: [g[j] for j in row] for name, row in zip(q, rows.tolist())}, q, g


def _timed(fn, *args) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fn(*args)``."""
    w, c = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - w, time.process_time() - c


def time_validation(sizes: list[int], n_gallery: int, old_max: int) -> tuple[Table, list[str]]:
    """validate_lists against the old quadratic check, wall and CPU seconds, same lists."""
    table = Table(title=f"validate_lists: N queries x 10 names over a {n_gallery:,} gallery (seconds: wall / CPU)")
    for col in ("queries", "linear (now)", "quadratic (before)", "speed-up (CPU)"):
        table.add_column(col, justify="right")
    md = ["| queries | linear (now) wall / CPU s | quadratic (before) wall / CPU s | speed-up (CPU) |", "|---:|---:|---:|---:|"]
    for n in sizes:
        lists, q, g = random_lists(n, n_gallery)
        now = _timed(validate_lists, lists, q, g)
        old = _timed(quadratic_validate, lists, q, g) if n <= old_max else None
        cells = [f"{n:,}", f"{now[0]:.3f} / {now[1]:.3f}", f"{old[0]:.2f} / {old[1]:.2f}" if old else "(skipped)",
                 f"{old[1] / now[1]:.0f}x" if old else ""]
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    return table, md


def write_run(run_dir: Path, size: int, seed: int = 0) -> None:
    """A random run folder in the model-run format, written in row blocks (never all in memory twice)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    q = [f"q{i:06d}.jpg" for i in range(size)]
    g = [f"g{i:06d}.jpg" for i in range(size)]
    rng = np.random.default_rng(seed)
    mat = np.lib.format.open_memmap(run_dir / "test_sim.npy", mode="w+", dtype=np.float32, shape=(size, size))
    for start in range(0, size, 2048):
        stop = min(size, start + 2048)
        mat[start:stop] = rng.random((stop - start, size), dtype=np.float32)
    mat.flush()
    del mat
    meta = {"model": "bench", "splits": {"test": {"query_names": q, "gallery_names": g}}}
    (run_dir / "meta.json").write_text(json.dumps(meta))


STAGES = ("load_split", "validate_lists", "save_body")  # names looked up in utils.submission.stages


def time_dry_run(size: int, work: Path) -> tuple[Table, list[str]]:
    """Write the run, then time ``submit.py --dry-run`` and each stage inside it (wall and CPU seconds)."""
    run_dir = work / "run"
    t0 = time.perf_counter()
    write_run(run_dir, size)
    t_write = time.perf_counter() - t0
    spent = {name: [0.0, 0.0] for name in STAGES}
    originals = {name: getattr(stages, name) for name in STAGES}

    def timed(name):
        def call(*args, **kwargs):
            w, c = time.perf_counter(), time.process_time()
            try:
                return originals[name](*args, **kwargs)
            finally:
                spent[name][0] += time.perf_counter() - w
                spent[name][1] += time.process_time() - c
        return call

    for name in STAGES:
        setattr(stages, name, timed(name))
    try:
        w, c = time.perf_counter(), time.process_time()
        code = submit.main(["--run", str(run_dir), "--group", "bench", "--out", str(work / "subs"), "--dry-run"])
        spent["whole dry run"] = [time.perf_counter() - w, time.process_time() - c]
    finally:
        for name, fn in originals.items():
            setattr(stages, name, fn)
    if code != 0:
        raise KitError(f"submit.py --dry-run exited {code}")
    gb = (run_dir / "test_sim.npy").stat().st_size / 1e9
    table = Table(title=f"submit.py --dry-run on a {size:,} x {size:,} float32 run ({gb:.2f} GB; writing it took {t_write:.1f} s)")
    for col in ("stage", "wall s", "CPU s (this process)"):
        table.add_column(col, justify="right")
    md = ["| stage | wall s | CPU s (this process) |", "|---|---:|---:|"]
    for name, (wall, cpu) in spent.items():
        table.add_row(name, f"{wall:.3f}", f"{cpu:.3f}")
        md.append(f"| {name} | {wall:.3f} | {cpu:.3f} |")
    return table, md


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[5_000, 10_000, 50_000], metavar="N",
                   help="query counts for the validation timing (default: %(default)s)")
    p.add_argument("--gallery", type=int, default=50_000, metavar="N", help="gallery size for it (default: %(default)s)")
    p.add_argument("--old-max", type=int, default=10_000, metavar="N",
                   help="time the old quadratic validation up to this many queries (default: %(default)s)")
    p.add_argument("--dry-run-size", type=int, default=20_000, metavar="N",
                   help="queries = gallery images of the dry-run matrix; 0 skips it (default: %(default)s)")
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks/out/submit", metavar="DIR",
                   help="scratch folder for the run and its body, removed after (default: %(default)s)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_submit.md", metavar="MD",
                   help="markdown output (default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(False)
    md = ["# submit.py benchmark\n", f"Command: `.venv/bin/python benchmarks/scale/bench_submit.py {' '.join(argv or sys.argv[1:])}`\n",
          "Shared machine (2 CPU cores, about 8 agents at once): absolute seconds are noisy, ratios within one run less so.\n"]
    table, rows = time_validation(args.sizes, args.gallery, args.old_max)
    console.print(table)
    md += [f"## {table.title}\n", *rows, ""]
    if args.dry_run_size:
        try:
            table, rows = time_dry_run(args.dry_run_size, args.work)
        finally:
            shutil.rmtree(args.work, ignore_errors=True)
        console.print(table)
        md += [f"## {table.title}\n", *rows, ""]
    write_results(args.out, "\n".join(md))
    return 0


if __name__ == "__main__":
    run_cli(main)
