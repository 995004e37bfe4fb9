"""The scale target end to end: two models' top-k runs at N x N, ensemble.py over them, submit.py on the result.

    # the issue's target: 200,000 queries x 200,000 gallery images, 512-d, top-10 (about an hour on 2 shared cores)
    .venv/bin/python benchmarks/scale/bench_scale.py
    # quick checks of the same path
    .venv/bin/python benchmarks/scale/bench_scale.py --size 5000 --out benchmarks/out/bench_scale_5k.md
    .venv/bin/python benchmarks/scale/bench_scale.py --size 20000 --out benchmarks/out/bench_scale_20k.md

Targets (issue "scale and speed"): 200,000 x 200,000 top-10 at 512-d under 8 GiB peak memory; through
submit.py from one run in under 20 minutes, and through ensemble.py fusing two runs in under 45 minutes,
on 2 CPU cores.

Data (seeded, float32, 512-d): N queries and N gallery images; gallery image i is the match of query i.
Both models see the same identity signal (one vector per identity) plus their own independent noise
(``--noise``, one level per model), so the models agree in part, confuse the same look-alikes, and a
fusion can beat either. The validation split is small (``--val-queries`` identities with one query and
one gallery image each, plus distractor identities up to ``--val-gallery`` images), named
``train/<identity>/<image>`` as the kit's split names them, so ensemble.py's weight search uses it.
The test ground truth is known (``q000123.jpg`` -> ``g000123.jpg``) and given to the model runs, as
rehearsal data would, so each run's meta.json holds its test score.

Stages, each in its own process (peak RSS is that process's ``ru_maxrss``, read with ``os.wait4``):

1. model A, model B: the embeddings are generated in the process (not timed: they stand in for a
   model's inference), then ``write_embedding_run`` writes the run in the top-k form (the model
   scripts' writer: the chunked exact top-K search of val and test, the metrics, the files and hashes).
   ``--matrix-limit`` (default 1) makes every size use the top-k form; at 200,000 the kit's default
   limit chooses it anyway.
2. ``ensemble.main(["--runs", RUNS, "--auto"])`` (``--fusion`` for one fusion): weight search on the
   validation candidate unions, then the fusion of val and test, written as a fused top-k run.
3. ``submit.main([... "--dry-run"])`` on model A's run and on the ensemble: lists, validation, body.

Then, outside the timings, a check: for ``--check`` sampled queries, each model's top-10 and the fused
top-10 are recomputed by brute force in numpy from freshly generated embeddings (full rows, each
model's top-K, the union, the fusion and weights that ensemble.py chose and recorded) and compared with
what the runs hold; each submission body is scored against the known matches.

"kit wall" is the kit call alone; "process wall" adds the interpreter, the imports and, for the model
stages, generating the embeddings. The target totals count the process wall less the generation.
Writes the tables to benchmarks/results/bench_scale.md (or --out); work files go under --work and are
removed afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
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
from utils.logs import console, setup_logging
from utils.runs.metrics import competition_score

GIB = 2**30
BLOCK = 8192  # rows generated per seeded block (the data do not depend on the size they are cut from)
STAGES = ("model_a", "model_b", "ensemble", "submit_a", "submit_ensemble")
MODELS = {"model_a": 0, "model_b": 1}
TARGETS = {"submit": 20 * 60, "ensemble": 45 * 60, "memory": 8 * GIB}
RRF = 60.0  # the reciprocal-rank constant of the kit's fusions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=200_000, metavar="N", help="test queries = gallery images (default: %(default)s)")
    p.add_argument("--dim", type=int, default=512, metavar="D", help="embedding size (default: %(default)s)")
    p.add_argument("--val-queries", type=int, default=500, metavar="N", help="validation queries, one identity each (default: %(default)s)")
    p.add_argument("--val-gallery", type=int, default=2000, metavar="N",
                   help="validation gallery: the queries' matches plus distractor identities (default: %(default)s)")
    p.add_argument("--noise", type=float, nargs=2, default=[2.0, 2.2], metavar=("A", "B"),
                   help="noise level of model A and model B against the shared identity signal (default: %(default)s)")
    p.add_argument("--topk", type=int, default=100, metavar="K", help="candidates per query in the runs, as the scripts' --topk (default: %(default)s)")
    p.add_argument("--matrix-limit", type=int, default=1, metavar="CELLS",
                   help="as the scripts' --matrix-limit; 1 = the top-k form at every size (default: %(default)s)")
    p.add_argument("--fusion", default="auto", choices=["auto", "zscore", "minmax", "rank", "rrf"],
                   help="ensemble.py --auto, or one --fusion (default: %(default)s)")
    p.add_argument("--check", type=int, default=200, metavar="N", help="queries checked by brute force (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="data seed (default: %(default)s)")
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks/out", metavar="DIR",
                   help="a scratch folder is made in it for the runs and bodies (default: %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_scale.md", metavar="MD",
                   help="markdown output (default: %(default)s)")
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    p.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p


# ----------------------------------------------------------------------------
# synthetic data: identity signal + per-model noise, generated in seeded blocks


def _block(seed: int, stream: int, block: int, rows: int, dim: int) -> np.ndarray:
    return np.random.default_rng([seed, stream, block]).standard_normal((rows, dim), dtype=np.float32)


def embeddings(seed: int, model: int, noise: float, split: str, side: str, n: int, dim: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Unit rows ``identity + noise * own noise`` (each ``dim`` components of variance 1/dim), float32.

    Row i of a split's queries and row i of its gallery share identity i; ``rows`` picks rows (default all).
    """
    id_stream = {"test": 0, "val": 1}[split]
    noise_stream = 10 + 4 * model + 2 * (split == "val") + (side == "gallery")
    wanted = np.arange(n) if rows is None else np.asarray(rows)
    out = np.empty((len(wanted), dim), np.float32)
    for b in np.unique(wanted // BLOCK):
        start, stop = b * BLOCK, min(n, (b + 1) * BLOCK)
        x = _block(seed, id_stream, b, stop - start, dim)
        x += noise * _block(seed, noise_stream, b, stop - start, dim)
        sel = (wanted >= start) & (wanted < stop)
        out[sel] = x[wanted[sel] - start]
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def query_gallery_names(n: int) -> tuple[list[str], list[str]]:
    return [f"q{i:06d}.jpg" for i in range(n)], [f"g{i:06d}.jpg" for i in range(n)]


def val_names(n_query: int, n_gallery: int) -> tuple[list[str], list[str]]:
    """``train/<identity>/<image>``: identity i has query i and gallery i; the rest of the gallery are distractors."""
    q = [f"train/id{i:05d}/q.jpg" for i in range(n_query)]
    g = [f"train/id{i:05d}/g.jpg" for i in range(n_gallery)]
    return q, g


def synthetic_task(args):
    """A :class:`utils.data.task.Task` over the synthetic names (the paths are never opened)."""
    from utils.data.layout import DataLayout
    from utils.data.split import Split, SplitParams
    from utils.data.task import Task

    root = Path("/synthetic")
    tq, tg = query_gallery_names(args.size)
    vq, vg = val_names(args.val_queries, args.val_gallery)
    layout = DataLayout(root, {}, [root / "test/query" / n for n in tq], [root / "test/gallery" / n for n in tg],
                        ground_truth={q: [g] for q, g in zip(tq, tg)})
    split = Split(SplitParams(seed=args.seed), "synthetic", {}, {}, vq, vg)
    return Task(layout, split, False, [], [], [], [root / n for n in vq], [root / n for n in vg], layout.query, layout.gallery)


# ----------------------------------------------------------------------------
# stages (each in its own process)


def stage_model(args, name: str) -> dict:
    from utils.runs.model_run import RunForm, write_embedding_run

    m = MODELS[name]
    t0 = time.perf_counter()
    emb = {
        "val_query": embeddings(args.seed, m, args.noise[m], "val", "query", args.val_queries, args.dim),
        "val_gallery": embeddings(args.seed, m, args.noise[m], "val", "gallery", args.val_gallery, args.dim),
        "test_query": embeddings(args.seed, m, args.noise[m], "test", "query", args.size, args.dim),
        "test_gallery": embeddings(args.seed, m, args.noise[m], "test", "gallery", args.size, args.dim),
    }
    task = synthetic_task(args)
    gen = time.perf_counter() - t0
    data_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    form = RunForm(max_cells=args.matrix_limit, k=args.topk, backend="exact")
    config = {"synthetic": True, "noise": args.noise[m], "seed": args.seed, "dim": args.dim}
    w, c = time.perf_counter(), time.process_time()
    metrics = write_embedding_run(args.dir / "runs" / name, name, config, task, emb, {"embed": gen}, form=form)
    return {"seconds": time.perf_counter() - w, "cpu_seconds": time.process_time() - c, "generate_seconds": gen,
            "data_rss": data_rss, "metrics": metrics}


def stage_call(args, name: str) -> dict:
    import ensemble
    import submit

    runs = args.dir / "runs"
    if name == "ensemble":
        flags = ["--auto"] if args.fusion == "auto" else ["--fusion", args.fusion]
        fn, argv = ensemble.main, ["--runs", str(runs), *flags]
    else:
        run = runs / ("model_a" if name == "submit_a" else "ensemble")
        fn, argv = submit.main, ["--run", str(run), "--group", "bench", "--out", str(args.dir / f"subs_{name}"), "--dry-run"]
    w, c = time.perf_counter(), time.process_time()
    code = fn(argv)
    out = {"seconds": time.perf_counter() - w, "cpu_seconds": time.process_time() - c, "argv": argv}
    if code != 0:
        raise KitError(f"{name}: exited {code}")
    return out


def run_stage(args) -> int:
    setup_logging(False)
    out = stage_model(args, args.stage) if args.stage in MODELS else stage_call(args, args.stage)
    args.result.write_text(json.dumps(out))
    return 0


def measure(stage: str, argv: list[str], work: Path) -> dict:
    """Run one stage in a fresh process; its own peak RSS comes from os.wait4."""
    result = work / f"{stage}.json"
    cmd = [sys.executable, __file__, *argv, "--stage", stage, "--dir", str(work), "--result", str(result)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=child_env())
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise KitError(f"stage {stage} exited {code} (peak RSS {usage.ru_maxrss / 2**20:.2f} GiB); see its output above")
    out = json.loads(result.read_text())
    out.update(process_wall=wall, peak_rss=usage.ru_maxrss * 1024, process_cpu=usage.ru_utime + usage.ru_stime)
    return out


# ----------------------------------------------------------------------------
# the check: brute force in numpy on sampled queries


def _normalise(sim: np.ndarray, fusion: str) -> np.ndarray:
    """One query's fusion transform over its candidates (float64), as documented for the top-k form."""
    if fusion == "zscore":
        std = sim.std()
        return (sim - sim.mean()) / (std if std > 0 else 1.0)
    if fusion == "minmax":
        span = sim.max() - sim.min()
        return (sim - sim.min()) / (span if span > 0 else 1.0)
    ranks = np.empty(len(sim))
    ranks[np.argsort(-sim, kind="stable")] = np.arange(len(sim))
    return 1.0 - ranks / max(len(sim) - 1, 1) if fusion == "rank" else 1.0 / (RRF + 1.0 + ranks)


def brute_force_check(args, work: Path) -> dict:
    """Each model's and the fusion's top-10 for sampled queries from full rows, against the runs on disk."""
    from utils.runs.topk_run import load_topk_split

    n = args.size
    rng = np.random.default_rng(args.seed + 1)
    rows = np.unique(np.concatenate([[0, n - 1], rng.choice(n, min(n, args.check), replace=False)]))[: args.check]
    runs = work / "runs"
    choice = json.loads((runs / "ensemble" / "weights.json").read_text())
    fusion, weights = choice["fusion"], dict(zip(choice["members"], choice["weights"]))
    sims, tops, out = {}, {}, {}
    for name, m in MODELS.items():
        g = embeddings(args.seed, m, args.noise[m], "test", "gallery", n, args.dim)
        q = embeddings(args.seed, m, args.noise[m], "test", "query", n, args.dim, rows)
        sims[name] = (q @ g.T).astype(np.float64)
        del g
        order = np.argsort(-sims[name], axis=1, kind="stable")[:, : args.topk]  # ties to the lower index
        tops[name] = order
        stored = load_topk_split(runs / name, "test", with_embeddings=False).indices[rows]
        out[f"{name}_agree"] = float((stored[:, :10] == order[:, :10]).all(axis=1).mean())
    fused_run = load_topk_split(runs / "ensemble", "test", with_embeddings=False)
    agree, score_err = 0, 0.0
    for r in range(len(rows)):
        cand = np.unique(np.concatenate([tops[name][r] for name in MODELS]))
        fused = sum(weights[name] * _normalise(sims[name][r, cand], fusion) for name in MODELS)
        best = np.lexsort((cand, -fused))[:10]
        same = np.array_equal(cand[best], fused_run.indices[rows[r], :10])
        agree += same
        if same:
            score_err = max(score_err, float(np.abs(fused[best] - fused_run.scores[rows[r], :10]).max()))
    out.update(fused_agree=agree / len(rows), fused_score_err=score_err, checked=len(rows), fusion=fusion, weights=weights,
               val_scores=choice.get("val_score_by_fusion", {}))
    return out


def body_score(subs: Path) -> dict:
    """Top-1/5/10 and the competition score of the one body in ``subs`` against the known matches."""
    (body_path,) = [p for p in subs.glob("*.json") if not p.name.endswith(".response.json")]
    images = json.loads(body_path.read_text())["images"]
    first = np.array([next((r for r, g in enumerate(names) if g[1:] == q[1:]), 10) for q, names in images.items()])
    top = {f"top{k}": float((first < k).mean()) for k in (1, 5, 10)}
    return {**top, "score": competition_score(top["top1"], top["top5"], top["top10"]), "queries": len(images)}


# ----------------------------------------------------------------------------


LABELS = {
    "model_a": "model A: write_embedding_run (val + test top-{k} search, metrics, files)",
    "model_b": "model B: write_embedding_run (val + test top-{k} search, metrics, files)",
    "ensemble": "ensemble.py {flags}",
    "submit_a": "submit.py --dry-run on model A's run",
    "submit_ensemble": "submit.py --dry-run on the ensemble",
}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure_all(args, argv: list[str], work: Path) -> tuple[dict, dict, dict, dict]:
    """Every stage in its own process, then the brute-force check: (results, disk bytes, check, scores)."""
    results: dict[str, dict] = {}
    for stage in STAGES:
        console.print(f"[bold]{stage}[/bold] ({args.size:,} x {args.size:,}, {args.dim}-d) ...")
        results[stage] = measure(stage, argv, work)
        r = results[stage]
        console.print(f"{stage}: {r['seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s CPU, peak RSS {r['peak_rss'] / GIB:.2f} GiB")
    disk = {name: folder_bytes(work / "runs" / name) for name in ("model_a", "model_b", "ensemble")}
    console.print("checking against brute force ...")
    check = brute_force_check(args, work)
    scores = {"model A": body_score(work / "subs_submit_a"), "ensemble": body_score(work / "subs_submit_ensemble")}
    scores["model B"] = results["model_b"]["metrics"]["test"]
    return results, disk, check, scores


def markdown_rows(table: Table, cols: list[str], rows: list[list[str]]) -> list[str]:
    """Add ``rows`` to the rich ``table`` (its columns from ``cols``) and return them as a markdown table."""
    for c in cols:
        table.add_column(c, justify="left" if c in ("stage", "target") else "right")
    md = ["| " + " | ".join(cols) + " |", "|:--|" + "---:|" * (len(cols) - 1)]
    for row in rows:
        table.add_row(*row)
        md.append("| " + " | ".join(row) + " |")
    console.print(table)
    return md


def stage_table(args, results: dict) -> tuple[str, list[str]]:
    """The per-stage timings: (title, markdown rows)."""
    ens_flags = " ".join(results["ensemble"]["argv"][2:])
    cols = ["stage", "kit wall (s)", "kit CPU (s)", "peak RSS (GiB)", "process wall (s)", "of which data generation (s)"]
    title = f"{args.size:,} x {args.size:,}, {args.dim}-d, top-10 from top-{args.topk} runs (one process per stage)"
    rows = [[LABELS[stage].format(k=args.topk, flags=ens_flags), f"{r['seconds']:,.1f}", f"{r['cpu_seconds']:,.1f}",
             f"{r['peak_rss'] / GIB:.2f}", f"{r['process_wall']:,.1f}", f"{r.get('generate_seconds', 0.0):,.1f}"]
            for stage, r in results.items()]
    return title, markdown_rows(Table(title=title), cols, rows)


def target_table(results: dict) -> list[str]:
    """The issue's targets (submit path, ensemble path, peak memory) against the measured stages."""

    def counted(stage: str) -> float:
        r = results[stage]
        return r["process_wall"] - r.get("generate_seconds", 0.0)

    paths = {
        "submit": ("model_a", "submit_a"),
        "ensemble": ("model_a", "model_b", "ensemble", "submit_ensemble"),
    }
    peak = max(r["peak_rss"] for r in results.values())
    target_rows = []
    for key, stages in paths.items():
        wall = sum(counted(s) for s in stages)
        cpu = sum(results[s]["cpu_seconds"] for s in stages)
        what = ("submit.py from one run: model A's run (its search included) + submit.py" if key == "submit"
                else "ensemble.py fusing two runs: runs A and B (searches included) + ensemble.py + submit.py")
        target_rows.append([what, f"{wall:,.0f} s ({wall / 60:.1f} min)", f"{cpu:,.0f} s ({cpu / 120:.1f} min)",
                            f"< {TARGETS[key] // 60} min", "pass" if wall < TARGETS[key] else "FAIL"])
    target_rows.append(["peak memory, any stage", f"{peak / GIB:.2f} GiB", "", "< 8 GiB", "pass" if peak < TARGETS["memory"] else "FAIL"])
    tcols = ["target", "wall (process, less data generation)", "kit CPU (s; / 2 cores in min: idle estimate)", "limit", "result"]
    return markdown_rows(Table(title="targets (issue: scale and speed)"), tcols, target_rows)


def check_report(args, check: dict, scores: dict, disk: dict) -> tuple[list[str], bool]:
    """The brute-force agreement, the scores, the fusion chosen and the disk use: (lines, all top-10s equal)."""
    w = ", ".join(f"{k} {v:.2f}" for k, v in check["weights"].items())
    ok = check["model_a_agree"] == check["model_b_agree"] == check["fused_agree"] == 1.0
    check_lines = [
        f"- brute force on {check['checked']} sampled queries (full rows in numpy from freshly generated embeddings, "
        f"each model's top-{args.topk}, their union, the {check['fusion']} fusion with ensemble.py's weights {w}): "
        f"top-10 equal for model A {check['model_a_agree']:.3f}, model B {check['model_b_agree']:.3f}, "
        f"fused {check['fused_agree']:.3f} of the queries; largest fused-score difference {check['fused_score_err']:.1e}"
        + ("" if ok else " **MISMATCH**"),
        "- scores against the known matches (600 x top-1 + 300 x top-5 + 100 x top-10): "
        + "; ".join(f"{k} {v['score']:.1f} (top-1 {v['top1']:.3f}, top-10 {v['top10']:.3f})" for k, v in scores.items())
        + " (model A and the ensemble from their submission bodies, model B from its run's meta.json)",
        f"- ensemble.py chose the {check['fusion']} fusion, weights {w}; validation score by fusion: "
        + ", ".join(f"{k} {v:.1f}" for k, v in check["val_scores"].items()),
        f"- run folders on disk: model A {disk['model_a'] / 1e9:.2f} GB, model B {disk['model_b'] / 1e9:.2f} GB, "
        f"ensemble {disk['ensemble'] / 1e9:.2f} GB",
    ]
    for line in check_lines:
        console.print(line)
    return check_lines, ok


def report(args, argv: list[str], minutes: float, loads: tuple, tables: tuple) -> str:
    """The results file's body: the command, the machine's load, the data, then the three tables."""
    (title, md), tmd, check_lines = tables
    load_start, load_end = loads
    cmd = ".venv/bin/python benchmarks/scale/bench_scale.py " + " ".join(argv)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return "\n".join([
        "# Scale benchmark: two top-k runs -> ensemble.py -> submit.py\n",
        f"`{cmd.strip()}` ({minutes:.1f} min in all)\n",
        f"Machine: {os.cpu_count()} CPU cores shared with other jobs, {mem:.0f} GiB memory; load average "
        f"{load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end (15-minute {load_end[2]:.1f}). "
        "CPU time is the process's own (all its threads), steadier than wall time on a shared machine; "
        f"divided by the {os.cpu_count()} cores it estimates the wall time on an idle machine.\n",
        f"Data: {args.size:,} queries x {args.size:,} gallery images, {args.dim}-d float32, seeded; a shared identity "
        f"signal plus per-model noise ({args.noise[0]} for A, {args.noise[1]} for B); validation {args.val_queries} queries x "
        f"{args.val_gallery} gallery images. Runs in the top-k form with K = {args.topk} (exact search). "
        "\"kit wall\" is the kit call alone; \"process wall\" adds the interpreter, the imports and, for the model "
        "stages, generating the embeddings (a stand-in for inference, not counted in the targets).\n",
        f"## {title}\n", *md, "",
        "## Targets\n", *tmd, "",
        "## Checks\n", *check_lines, "",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.stage:
        return run_stage(args)
    setup_logging(False)
    if args.size < 10 or args.val_queries < 1 or args.val_gallery < max(10, args.val_queries) or args.topk < 10:
        raise KitError("--size >= 10, --val-gallery >= max(10, --val-queries) and --topk >= 10 are needed")
    load_start = os.getloadavg()
    args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"scale_{args.size}_", dir=args.work))
    t_start = time.time()
    try:
        results, disk, check, scores = measure_all(args, argv, work)
    finally:
        if args.keep:
            console.print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    total = time.time() - t_start
    load_end = os.getloadavg()
    stages = stage_table(args, results)
    targets = target_table(results)
    check_lines, ok = check_report(args, check, scores, disk)
    write_results(args.out, report(args, argv, total / 60, (load_start, load_end), (stages, targets, check_lines)))
    return 0 if ok else 1

if __name__ == "__main__":
    run_cli(main)
