"""Top-10 from embeddings at scale: the kit's chunked exact search, FAISS, scikit-learn and a full argsort.

    # the default: 1,500 / 20,000 / 50,000 / 200,000 queries x gallery, 512-d (about 7 minutes on 2 idle cores)
    .venv/bin/python benchmarks/scale/bench_topk.py
    # one size, one method, every query searched (no extrapolation)
    .venv/bin/python benchmarks/scale/bench_topk.py --sizes 200000 --methods exact --query-subset 0

Data: random unit vectors (seeded), as many queries as gallery images. Each
(size, method) runs in its own process; the time is from the embeddings in
memory to the (n_query, 10) indices, and the peak memory is that process's
maximum resident set size (``ru_maxrss`` of the child, read with ``os.wait4``),
embeddings included (the "data" column says how much of it they are).

From ``--subset-from`` images on, only the first ``--query-subset`` queries are
searched (all queries and the whole gallery are still in memory) and the time
is scaled linearly to all queries; the table marks such rows "extrapolated".
Methods too slow or too big for a size are left out: scikit-learn above
``--sklearn-max``, the full argsort above ``--argsort-max`` (its matrix and
index array alone are 12 bytes per cell). "agree" is the share of the first
200 queries whose 10 indices equal the exact search's.

Writes the table to benchmarks/results/bench_topk.md (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from rich.table import Table

from benchmarks.common import ROOT, child_env, write_results
from utils.errors import KitError, run_cli
from utils.logs import console
from utils.runs.search import has_faiss, search_topk

METHODS = ("exact", "faiss", "sklearn", "argsort")
LABELS = {
    "exact": "kit: chunked exact search",
    "faiss": "FAISS IndexFlatIP",
    "sklearn": "scikit-learn NearestNeighbors (cosine, brute)",
    "argsort": "full matrix + argsort",
    "fuse": "fuse_topk: 2 models' top-K runs, union scored exactly",
}
N_CHECK = 200  # queries whose lists are compared with the exact search


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1500, 20000, 50000, 200000], metavar="N",
                   help="queries = gallery images (default: %(default)s)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to run (default: all)")
    p.add_argument("--dim", type=int, default=512, metavar="D", help="embedding size (default: %(default)s)")
    p.add_argument("--k", type=int, default=10, metavar="K", help="results per query (default: %(default)s)")
    p.add_argument("--query-subset", type=int, default=5000, metavar="N",
                   help="from --subset-from on, search only N queries and scale the time; 0 = all (default: %(default)s)")
    p.add_argument("--subset-from", type=int, default=100000, metavar="N", help="size where the subset starts (default: %(default)s)")
    p.add_argument("--fast-only-from", type=int, default=100000, metavar="N",
                   help="from this size on, run only exact and faiss (default: %(default)s)")
    p.add_argument("--sklearn-max", type=int, default=50000, metavar="N", help="largest size for scikit-learn (default: %(default)s)")
    p.add_argument("--argsort-max", type=int, default=20000, metavar="N", help="largest size for the full argsort (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="data seed (default: %(default)s)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_topk.md", metavar="MD",
                   help="markdown output (default: %(default)s)")
    p.add_argument("--fuse-sizes", type=int, nargs="*", default=[], metavar="N",
                   help="also time fuse_topk on two models' top-k runs at N x N (default: none)")
    p.add_argument("--fuse-candidates", type=int, default=100, metavar="K", help="candidates per query and model for --fuse-sizes (default: %(default)s)")
    p.add_argument("--worker", nargs=3, metavar=("METHOD", "N", "N_SEARCHED"), help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def run_method(method: str, q: np.ndarray, g: np.ndarray, k: int) -> np.ndarray:
    """(n_query, k) gallery indices, best first."""
    if method == "exact":
        return search_topk(q, g, k)[1]
    elif method == "faiss":
        return search_topk(q, g, k, backend="faiss")[1]
    elif method == "sklearn":
        from sklearn.neighbors import NearestNeighbors

        return NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(g).kneighbors(q, return_distance=False)
    elif method == "argsort":
        sim = q @ g.T
        return np.argsort(-sim, axis=1)[:, :k]
    else:
        raise KitError(f"--methods {method!r}: unknown; use one of {', '.join(METHODS)}")


def fuse_worker(args, n: int, n_searched: int) -> int:
    """Child process: two models' top-K runs at n x n, fused by fuse_topk (candidate union scored exactly)."""
    from utils.runs.topk_run import TopkSplit, fuse_topk

    k = args.fuse_candidates
    rng = np.random.default_rng(args.seed)
    first = rng.integers(0, n, size=(n, 1))
    # stand-in candidate lists (the fusion's cost does not depend on which images they name): half shared
    idx_a = (first + 7919 * np.arange(k)) % n
    idx_b = idx_a.copy()
    idx_b[:, k // 2 :] = (first + 7907 * np.arange(k // 2, k) + 1) % n
    names = [str(i) for i in range(n)]
    runs = []
    for m, idx in enumerate((idx_a, idx_b)):
        q, g = unit_vectors(n, args.dim, args.seed + 2 * m), unit_vectors(n, args.dim, args.seed + 2 * m + 1)
        runs.append(TopkSplit(idx[:n_searched], np.zeros(idx[:n_searched].shape, np.float32), names[:n_searched], names, q[:n_searched], g))
    data_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0, c0 = time.perf_counter(), time.process_time()
    fuse_topk(runs, [0.5, 0.5], "zscore", k=args.k)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    args.result.write_text(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "data_rss": data_rss, "check": []}))
    return 0


def worker(args) -> int:
    """Child process: make the data, time one method, write the result as JSON."""
    method, n, n_searched = args.worker[0], int(args.worker[1]), int(args.worker[2])
    if method == "fuse":
        return fuse_worker(args, n, n_searched)
    q = unit_vectors(n, args.dim, args.seed)
    g = unit_vectors(n, args.dim, args.seed + 1)
    if method == "sklearn":
        import sklearn.neighbors  # noqa: F401  (imported before the clock starts)
    data_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0, c0 = time.perf_counter(), time.process_time()
    idx = run_method(method, q[:n_searched], g, args.k)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {"seconds": seconds, "cpu_seconds": cpu, "data_rss": data_rss, "check": np.asarray(idx[:N_CHECK]).tolist()}
    args.result.write_text(json.dumps(out))
    return 0


def measure(method: str, n: int, n_searched: int, args, tmp: Path) -> dict:
    """Run one method in a fresh process; its own peak RSS comes from os.wait4."""
    result = tmp / f"{method}_{n}.json"
    cmd = [sys.executable, __file__, "--worker", method, str(n), str(n_searched), "--dim", str(args.dim),
           "--k", str(args.k), "--seed", str(args.seed), "--fuse-candidates", str(args.fuse_candidates), "--result", str(result)]
    proc = subprocess.Popen(cmd, env=child_env())
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}"}
    out = json.loads(result.read_text())
    out["peak_rss"] = usage.ru_maxrss * 1024  # kilobytes on Linux
    return out


def plan(args) -> list[tuple[int, str]]:
    jobs = []
    for n in args.sizes:
        for m in args.methods:
            if m == "faiss" and not has_faiss:
                continue
            if n >= args.fast_only_from and m not in ("exact", "faiss"):
                continue
            if (m == "sklearn" and n > args.sklearn_max) or (m == "argsort" and n > args.argsort_max):
                continue
            jobs.append((n, m))
    return jobs + [(n, "fuse") for n in args.fuse_sizes]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker(args)
    jobs = plan(args)
    table = Table(title=f"top-{args.k} of random {args.dim}-d unit vectors, queries = gallery (one process per row)")
    cols = ["queries x gallery", "method", "queries searched", "wall time, all queries (s)", "CPU time, all queries (s)",
            "peak RSS (GiB)", "data (GiB)", "agree"]
    for c in cols:
        table.add_column(c, justify="left" if c == "method" else "right")
    md = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + [":--"] + ["---:"] * (len(cols) - 2)) + "|"]
    reference: dict[int, np.ndarray] = {}
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for n, m in jobs:
            n_searched = min(n, args.query_subset) if args.query_subset and n >= args.subset_from else n
            console.print(f"{n:,} x {n:,}: {LABELS[m]} ({n_searched:,} queries) ...")
            r = measure(m, n, n_searched, args, Path(tmp))
            if "error" in r:
                row = [f"{n:,}", LABELS[m], f"{n_searched:,}", r["error"], "", "", "", ""]
            else:
                check = np.array(r["check"])
                if m == "exact":
                    reference[n] = check
                agree = f"{(check == reference[n]).all(axis=1).mean():.3f}" if n in reference and m != "fuse" else "-"
                scale = n / n_searched
                note = " (extrapolated)" if n_searched < n else ""
                row = [f"{n:,}", LABELS[m], f"{n_searched:,}", f"{r['seconds'] * scale:,.1f}{note}", f"{r['cpu_seconds'] * scale:,.1f}",
                       f"{r['peak_rss'] / 2**30:.2f}", f"{(4 if m == 'fuse' else 2) * n * args.dim * 4 / 2**30:.2f}", agree]
            table.add_row(*row)
            md.append("| " + " | ".join(row) + " |")
    console.print(table)
    cmd = "python benchmarks/scale/bench_topk.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load = os.getloadavg()[0]
    text = (f"# Top-{args.k} search benchmark\n\n`{cmd.strip()}` ({time.time() - t_start:.0f} s in all, "
            f"{os.cpu_count()} CPU cores, shared machine, load average {load:.1f} at the end)\n\n"
            "CPU time is the process's own (all its threads): on a busy shared machine it is the steadier figure; "
            f"divided by the {os.cpu_count()} cores it estimates the wall time on an idle machine.\n\n"
            + "\n".join(md) + "\n")
    write_results(args.out, text)
    return 0


if __name__ == "__main__":
    run_cli(main)
