"""Benchmark of ensemble.py: every model alone, the seed's fixed-weight fusion, the searched
fusions and every re-ranking option, on validation and test of real runs; plus the time to
score 10,000 weight candidates (3 models, 1,500 x 1,500), vectorised against a per-candidate loop.

    # real runs of this project (rehearsal data: make them first, see benchmarks/results/ensemble.md)
    .venv/bin/python benchmarks/bench_ensemble.py \\
        --runs benchmarks/out/ens/runs --data benchmarks/out/ens/data \\
        --runs benchmarks/out/faces/runs --data benchmarks/out/faces/data
    # timing only
    .venv/bin/python benchmarks/bench_ensemble.py --no-quality

Each --runs gets the --data at the same position (its test/ground_truth.json
gives the test scores; the choice never sees them). The options are scored
exactly as ``ensemble.py --auto`` scores them; the chosen one is starred.
Writes the tables to benchmarks/results/ensemble.md (or --out).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from utils.atomic import atomic_write_bytes  # noqa: E402
from utils.data.layout import read_ground_truth  # noqa: E402
from utils.ensemble.fusion import FUSIONS, transform  # noqa: E402
from utils.ensemble.plan import Scorer, choose_plan, val_identities, val_relevance  # noqa: E402
from utils.ensemble.report import options_markdown, options_table  # noqa: E402
from utils.ensemble.rerank import RerankParams  # noqa: E402
from utils.ensemble.weight_search import CandidateScorer, loop_first_hit  # noqa: E402
from utils.errors import KitError, run_cli  # noqa: E402
from utils.logs import console, setup_logging  # noqa: E402
from utils.runs.metrics import relevance_matrix  # noqa: E402
from utils.runs.similarity_io import align_runs, load_run  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, action="append", default=[], metavar="DIR", help="a runs folder (repeatable)")
    p.add_argument("--data", type=Path, action="append", default=[], metavar="DIR", help="its data folder (repeatable, same order)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/ensemble.md", metavar="MD", help="markdown output (default: %(default)s)")
    p.add_argument("--quality", action=argparse.BooleanOptionalAction, default=True, help="score the options on the runs (default: on)")
    p.add_argument("--timing", action=argparse.BooleanOptionalAction, default=True, help="time the weight scoring (default: on)")
    p.add_argument("--candidates", type=int, default=10_000, metavar="N", help="weight candidates for the timing (default: %(default)s)")
    p.add_argument("--loop-candidates", type=int, default=100, metavar="N", help="of those, scored by the loop too (default: %(default)s)")
    p.add_argument("--size", type=int, default=1500, metavar="N", help="queries = gallery images of the synthetic matrices (default: %(default)s)")
    p.add_argument("--bootstrap", type=int, default=200, metavar="N", help="bootstrap resamples (default: %(default)s)")
    p.add_argument("--bootstrap-by", choices=["identity", "query"], default="query",
                   help="resample identities or single queries, as ensemble.py (default: %(default)s)")
    return p


def quality(runs_dir: Path, data: Path | None, n_boot: int, by: str = "query") -> tuple[str, list, list[str]]:
    """Every option of ensemble.py --auto on one runs folder (complete runs only)."""
    dirs = sorted(d for d in runs_dir.iterdir() if d.is_dir() and d.name != "ensemble"
                  and all((d / f).is_file() for f in ("meta.json", "val_sim.npy", "test_sim.npy")))
    if not dirs:
        raise KitError(f"{runs_dir}: no complete run folder")
    runs = [load_run(d) for d in dirs]
    names = [d.name for d in dirs]
    val, test = align_runs(runs, "val"), align_runs(runs, "test")
    test_rel = None
    if data is not None and (data / "test/ground_truth.json").is_file():
        test_rel = relevance_matrix(test[0].query_names, test[0].gallery_names, read_ground_truth(data / "test/ground_truth.json"))
    groups = val_identities(val[0].query_names) if by == "identity" else None
    scorer = Scorer(val_relevance(val[0].query_names, val[0].gallery_names), test_rel, n_boot=n_boot, groups=groups)
    t0 = time.time()
    _, rows, _ = choose_plan(names, [m.sim for m in val], [m.sim for m in test], scorer, fusions=FUSIONS, weights=None,
                             rerank_params=RerankParams(), auto=True, min_win=0.75, search={})
    title = (f"{runs_dir}: {len(names)} runs, val {val[0].sim.shape[0]} x {val[0].sim.shape[1]}, "
             f"test {test[0].sim.shape[0]} x {test[0].sim.shape[1]} ({time.time() - t0:.1f} s)")
    return title, rows, names


def synthetic(n: int, n_models: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Matrices like real ones: 2 images per identity on each side, models sharing part of their errors."""
    rng = np.random.default_rng(seed)
    ident = np.arange(n) // 2
    rel = ident[rng.permutation(n)][:, None] == ident[None, :]
    shared = rng.standard_normal((n, n), dtype=np.float32)
    mats = []
    for m in range(n_models):
        own = rng.standard_normal((n, n), dtype=np.float32)
        mats.append(transform((2.5 - 0.4 * m) * rel + 0.6 * shared + 0.8 * own, "zscore"))
    return mats, rel


def timing(args) -> tuple[Table, str]:
    mats, rel = synthetic(args.size, 3)
    weights = np.random.default_rng(1).dirichlet(np.ones(3), size=args.candidates).astype(np.float32)
    t0 = time.perf_counter()
    scorer = CandidateScorer(mats, rel, top_m=50)
    t_setup = time.perf_counter() - t0
    fast = scorer.first_hit(weights, "vectorised")
    t_fast = time.perf_counter() - t0
    n_loop = min(args.loop_candidates, args.candidates)
    t0 = time.perf_counter()
    slow = loop_first_hit(mats, rel, weights[:n_loop])
    t_loop = (time.perf_counter() - t0) / n_loop * args.candidates
    if not np.array_equal(fast[:n_loop], slow):
        raise AssertionError("vectorised first-hit ranks differ from the loop's")
    if not np.allclose(fast[:n_loop].astype(float).mean(1), slow.astype(float).mean(1)):
        raise AssertionError("scores differ")
    table = Table(title=f"{args.candidates:,} weight candidates, 3 models, {args.size:,} x {args.size:,}")
    for col in ("method", "seconds", "per candidate (ms)", "speed-up"):
        table.add_column(col, justify="left" if col == "method" else "right")
    rows = [
        (f"vectorised (setup {t_setup:.1f} s, kept width {scorer.kept_elems / args.size:.0f}/query, "
         f"{scorer.fallback_pairs / args.candidates / args.size:.2%} pairs on full rows)", t_fast),
        (f"per-candidate loop (timed on {n_loop}, scaled to {args.candidates:,})", t_loop),
    ]
    for name, t in rows:
        table.add_row(name, f"{t:.1f}", f"{1000 * t / args.candidates:.2f}", f"{t_loop / t:.1f}x")
    md = ["| method | seconds | per candidate (ms) | speed-up |", "|---|---:|---:|---:|"]
    md += [f"| {n} | {t:.1f} | {1000 * t / args.candidates:.2f} | {t_loop / t:.1f}x |" for n, t in rows]
    md.append(f"\nFirst-hit ranks of the {n_loop} candidates both scored: identical (asserted).\n")
    return table, f"### {table.title}\n\n" + "\n".join(md)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(False)
    if args.data and len(args.data) != len(args.runs):
        raise KitError(f"--data: give one per --runs ({len(args.runs)}), in the same order")
    md = ["# Ensemble benchmark\n", f"Command: `.venv/bin/python benchmarks/bench_ensemble.py {' '.join(argv or sys.argv[1:])}`\n",
          f"Validation: bootstrap mean ± std over resamples of the validation {args.bootstrap_by}s, and the plain score; "
          "test: plain score with the rehearsal ground truth (never used to choose). `*` = what `ensemble.py --auto` picks.\n"]
    if args.quality:
        for i, runs_dir in enumerate(args.runs):
            data = args.data[i] if args.data else None
            title, rows, names = quality(runs_dir, data, args.bootstrap, args.bootstrap_by)
            console.print(options_table(title, rows, names))
            md += [f"## {title}\n", options_markdown(rows, names)]
    if args.timing:
        table, text = timing(args)
        console.print(table)
        md += ["## Weight-search timing\n", text]
    atomic_write_bytes(args.out, "\n".join(md).encode())
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
