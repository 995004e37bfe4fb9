"""Benchmark of ensemble.py: every model alone, the seed's fixed-weight fusion, the searched
fusions and every re-ranking option, on validation and test of real runs; plus the time to
score 10,000 weight candidates (3 models, 1,500 x 1,500), vectorised against a per-candidate loop.

    # real runs of this project (rehearsal data: bash benchmarks/ensemble/make_ensemble_runs.sh makes them)
    .venv/bin/python benchmarks/ensemble/bench_ensemble.py \\
        --runs benchmarks/out/ens/runs --data benchmarks/out/ens/data \\
        --runs benchmarks/out/faces/runs --data benchmarks/out/faces/data
    # timing only
    .venv/bin/python benchmarks/ensemble/bench_ensemble.py --no-quality
    # peak memory of the weight search and of applying the plan, 3 models at 5,000 x 5,000,
    # this tree against the code of an earlier commit (--before), each in its own process
    .venv/bin/python benchmarks/ensemble/bench_ensemble.py --memory --memory-size 5000 --before dde7b30

Each --runs gets the --data at the same position (its test/ground_truth.json
gives the test scores; the choice never sees them). The options are scored
exactly as ``ensemble.py --auto`` scores them; the chosen one is starred.
Writes the tables to benchmarks/results/ensemble.md (--no-quality: ensemble_timing.md; --memory:
ensemble_memory.md; or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from rich.table import Table

from benchmarks.common import ROOT, write_results
from utils.data.layout import read_ground_truth
from utils.ensemble.fusion import FUSIONS, transform
from utils.ensemble.plan import Scorer, choose_plan, val_identities, val_relevance
from utils.ensemble.report import options_markdown, options_table
from utils.ensemble.rerank import RerankParams
from utils.ensemble.weight_search import CandidateScorer, loop_first_hit
from utils.errors import KitError, run_cli
from utils.logs import console, setup_logging
from utils.runs.metrics import relevance_matrix
from utils.runs.similarity_io import align_runs, load_run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, action="append", default=[], metavar="DIR", help="a runs folder (repeatable)")
    p.add_argument("--data", type=Path, action="append", default=[], metavar="DIR", help="its data folder (repeatable, same order)")
    p.add_argument("--out", type=Path, default=None, metavar="MD",
                   help="markdown output (default: benchmarks/results/ensemble.md; --no-quality: ensemble_timing.md; --memory: ensemble_memory.md)")
    p.add_argument("--quality", action=argparse.BooleanOptionalAction, default=True, help="score the options on the runs (default: on)")
    p.add_argument("--timing", action=argparse.BooleanOptionalAction, default=True, help="time the weight scoring (default: on)")
    p.add_argument("--candidates", type=int, default=10_000, metavar="N", help="weight candidates for the timing (default: %(default)s)")
    p.add_argument("--loop-candidates", type=int, default=100, metavar="N", help="of those, scored by the loop too (default: %(default)s)")
    p.add_argument("--size", type=int, default=1500, metavar="N", help="queries = gallery images of the synthetic matrices (default: %(default)s)")
    p.add_argument("--bootstrap", type=int, default=200, metavar="N", help="bootstrap resamples (default: %(default)s)")
    p.add_argument("--bootstrap-by", choices=["identity", "query"], default="query",
                   help="resample identities or single queries, as ensemble.py (default: %(default)s)")
    p.add_argument("--memory", action="store_true", help="only the peak-memory comparison (search + apply), nothing else")
    p.add_argument("--memory-size", type=int, default=5000, metavar="N", help="queries = gallery images per split for --memory (default: %(default)s)")
    p.add_argument("--memory-models", type=int, default=3, metavar="N", help="models for --memory (default: %(default)s)")
    p.add_argument("--before", default="dde7b30", metavar="REF",
                   help="git commit whose utils/ is measured as 'before' with --memory ('' for this tree only) (default: %(default)s)")
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


# One process per measurement: build the inputs (val and test matrices of every model, float32),
# then trace the weight search and the plan's application separately. tracemalloc sees numpy's
# allocations; ru_maxrss is the process's whole high-water mark (inputs included).
MEMORY_DRIVER = r"""
import hashlib, json, resource, sys, time, tracemalloc
import numpy as np
from utils.ensemble.plan import Plan, Scorer, search_fusion
n, n_models, fusion = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
def split():
    ident = np.arange(n) // 2
    rel = ident[rng.permutation(n)][:, None] == ident[None, :]
    shared = rng.standard_normal((n, n), dtype=np.float32)
    mats = []
    for m in range(n_models):
        x = rng.standard_normal((n, n), dtype=np.float32)
        x *= 0.8
        x += 0.6 * shared
        np.add(x, 2.5 - 0.4 * m, out=x, where=rel)
        mats.append(x)
    return mats, rel
val, val_rel = split()
test, _ = split()
inputs_mib = sum(m.nbytes for m in val + test) / 2**20
tracemalloc.start()
t0 = time.perf_counter()
res = search_fusion(fusion, val, Scorer(val_rel, None, n_boot=50), {})
search_peak = tracemalloc.get_traced_memory()[1]
t1 = time.perf_counter()
tracemalloc.reset_peak()
fused = Plan(fusion, [float(w) for w in res.weights]).apply(test)
apply_peak = tracemalloc.get_traced_memory()[1]
t2 = time.perf_counter()
print(json.dumps({"inputs_mib": inputs_mib, "search_mib": search_peak / 2**20, "apply_mib": apply_peak / 2**20,
                  "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "search_s": t1 - t0, "apply_s": t2 - t1,
                  "weights": [float(w) for w in res.weights], "fused_sha": hashlib.sha256(fused.tobytes()).hexdigest()}))
"""


def memory_run(tree: Path, size: int, n_models: int, fusion: str) -> dict:
    """The driver in its own process on the utils/ of ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, "-c", MEMORY_DRIVER, str(size), str(n_models), fusion], cwd=tree, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise KitError(f"memory driver failed in {tree}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory(args) -> tuple[Table, str]:
    """Peak memory of the weight search and of applying the plan, before (``--before``) and now."""
    trees = {"now": ROOT}
    with tempfile.TemporaryDirectory() as tmp:
        if args.before:
            old = Path(tmp) / "before"
            old.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before, "utils"], capture_output=True)
            if archive.returncode != 0:
                raise KitError(f"--before {args.before}: git archive failed: {archive.stderr.decode().strip()}")
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
            trees = {f"before ({args.before})": old, "now": ROOT}
        results = {}
        for fusion in ("zscore", "rank"):
            for label, tree in trees.items():
                console.print(f"memory: {label}, {fusion} ...")
                results[(label, fusion)] = memory_run(tree, args.memory_size, args.memory_models, fusion)
    n = args.memory_size
    table = Table(title=f"peak memory, {args.memory_models} models, val and test {n:,} x {n:,} float32 "
                        f"(inputs {results[('now', 'zscore')]['inputs_mib']:.0f} MiB)")
    cols = ("code", "fusion", "search extra MiB", "apply extra MiB", "process maxrss MiB", "search s", "apply s")
    for c in cols:
        table.add_column(c, justify="left" if c in ("code", "fusion") else "right")
    md = ["| " + " | ".join(cols) + " |", "|---|---|" + "---:|" * (len(cols) - 2)]
    for (label, fusion), r in results.items():
        row = (label, fusion, f"{r['search_mib']:.0f}", f"{r['apply_mib']:.0f}", f"{r['maxrss_mib']:.0f}", f"{r['search_s']:.1f}", f"{r['apply_s']:.1f}")
        table.add_row(*row)
        md.append("| " + " | ".join(row) + " |")
    notes = []
    if len(trees) == 2:
        before = next(k for k in trees if k != "now")
        for fusion in ("zscore", "rank"):
            b, a = results[(before, fusion)], results[("now", fusion)]
            same = b["weights"] == a["weights"] and b["fused_sha"] == a["fused_sha"]
            if not same:
                raise AssertionError(f"{fusion}: the chosen weights or the fused test matrix differ between {before} and now")
            notes.append(f"{fusion}: search extra memory {b['search_mib'] / a['search_mib']:.1f}x lower, apply {b['apply_mib'] / a['apply_mib']:.1f}x lower, "
                         f"process peak {b['maxrss_mib'] / a['maxrss_mib']:.2f}x lower; chosen weights and fused test matrix byte-identical (asserted).")
    text = "\n".join(md) + "\n\n" + "\n".join(f"- {x}" for x in notes) + "\n"
    return table, f"### {table.title}\n\n'extra' = tracemalloc peak above the inputs during the stage.\n\n" + text


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(False)
    if args.data and len(args.data) != len(args.runs):
        raise KitError(f"--data: give one per --runs ({len(args.runs)}), in the same order")
    md = ["# Ensemble benchmark\n", f"Command: `.venv/bin/python benchmarks/ensemble/bench_ensemble.py {' '.join(argv or sys.argv[1:])}`\n",
          f"Validation: bootstrap mean ± std over resamples of the validation {args.bootstrap_by}s, and the plain score; "
          "test: plain score with the rehearsal ground truth (never used to choose). `*` = what `ensemble.py --auto` picks.\n"]
    if args.memory:
        out = args.out or ROOT / "benchmarks/results/ensemble_memory.md"
        table, text = memory(args)
        console.print(table)
        md = ["# Ensemble memory benchmark\n", f"Command: `.venv/bin/python benchmarks/ensemble/bench_ensemble.py {' '.join(argv or sys.argv[1:])}`\n", text]
        console.print(text)
        write_results(out, "\n".join(md))
        return 0
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
    out = args.out or ROOT / "benchmarks/results" / ("ensemble.md" if args.quality else "ensemble_timing.md")
    write_results(out, "\n".join(md))
    return 0


if __name__ == "__main__":
    run_cli(main)
