"""Gallery views on the hard face benchmark: which views, which fusion rule, per style, their time, and leave-one-style-out.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python benchmarks/faces/bench_faces_views.py            # seed 0
    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python benchmarks/faces/bench_faces_views.py --seed 1

On one draw of the hard set (benchmarks/faces/face_data.py; seed 0 is bench_faces_hard.py's):
1. time: ``infer_facenet.py --embedder dlib`` with ``--gallery-views`` (none: the recipe without
   views) and with the default views, each from an empty face cache: seconds per image of the run;
2. views x rules: every combination of no view / the detector's view / texture views at each
   ``--texture-eye-frac`` of :data:`FRACS` (alone and with the detector's view) with every fusion rule,
   from cached embeddings: score per gallery style (test gallery cut to that style), overall, and
   the validation score and mAP;
3. leave-one-style-out: for each style, the combination with the best mean score over the other
   styles' slices is chosen, and its score on the left-out style is reported beside the plain view's.
Results: rich tables, also written to benchmarks/results/bench_faces_views.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from itertools import product
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

import infer_facenet
from benchmarks.common import ROOT, write_results
from benchmarks.faces.bench_faces_hard import md_table
from benchmarks.faces.face_data import build_hard_dataset
from benchmarks.faces.face_styles import STYLES
from utils.config import config_from_args
from utils.data.task import prepare_task
from utils.embedding.step import embed_task
from utils.errors import run_cli
from utils.faces.pipeline import FacePipeline
from utils.faces.views import FUSION_RULES, fuse
from utils.logs import console, setup_logging
from utils.runs.metrics import evaluate, relevance_matrix

OUT = ROOT / "benchmarks" / "out" / "faces_views"
RESULT = ROOT / "benchmarks" / "results" / "bench_faces_views.md"
FRACS = (0.05, 0.1, 0.2, 0.4)


def timed_run(data: Path, runs: Path, name: str, flags: list[str]) -> float:
    """Seconds of one infer_facenet.py run from an empty face cache."""
    shutil.rmtree(runs / "face_cache", ignore_errors=True)
    t = time.time()
    infer_facenet.main(["--data", str(data), "--runs", str(runs), "--run-name", name, "--val-fraction", "0.5",
                        "--embedder", "dlib", "--workers", "0", *flags])
    return time.time() - t


def view_embeddings(data: Path, runs: Path):
    """The task, plain embeddings and every view's embeddings (detector, then texture per FRACS), from the cache."""
    argv = ["--data", str(data), "--runs", str(runs), "--val-fraction", "0.5", "--embedder", "dlib", "--workers", "0",
            "--gallery-views", "detector", "texture", "--texture-eye-frac", *map(str, FRACS)]
    cfg = config_from_args(infer_facenet.Config, infer_facenet.build_parser().parse_args(argv))
    task = prepare_task(cfg.data, cfg.runs, cfg.split_params())
    pipe = FacePipeline(cfg, torch.device("cpu"), cfg.runs / "face_cache")
    emb = embed_task(task, pipe.embed_set)
    views = {w: dict(zip(pipe.view_params.names(), pipe.embed_views(getattr(task, w), task.names(w), w.replace("_", " "))))
             for w in ("val_gallery", "test_gallery")}
    return task, emb, views


def combos() -> list[tuple[str, tuple[str, ...], str]]:
    """(label, view names, rule) of every studied combination."""
    sets = [("detector",), *[(f"texture{f:g}",) for f in FRACS], *[("detector", f"texture{f:g}") for f in FRACS]]
    return [("plain", (), "plain")] + [(f"{' + '.join(s)}, {r}", s, r) for s, r in product(sets, FUSION_RULES)]


def study(data: Path, runs: Path) -> tuple[list[list[str]], dict[str, dict[str, float]]]:
    task, emb, views = view_embeddings(data, runs)
    truth = json.loads((data / "test" / "ground_truth.json").read_text())
    styles = {Path(r).name: s for r, s in json.loads((data / "styles.json").read_text()).items() if r.startswith("test/")}
    q, g = task.names("test_query"), task.names("test_gallery")
    val_rel = relevance_matrix(task.names("val_query"), task.names("val_gallery"), task.relevant("val"))
    rows, per_style = [], {}
    for label, names, rule in combos():
        test = fuse(emb["test_query"], [emb["test_gallery"], *[views["test_gallery"][n] for n in names]], rule)
        val = fuse(emb["val_query"], [emb["val_gallery"], *[views["val_gallery"][n] for n in names]], rule)
        cells = {}
        for style in STYLES:
            cols = [j for j, name in enumerate(g) if styles.get(name) == style]
            cells[style] = evaluate(test[:, cols], relevance_matrix(q, [g[j] for j in cols], truth))["score"]
        full, v = evaluate(test, relevance_matrix(q, g, truth)), evaluate(val, val_rel)
        per_style[label] = cells
        rows.append([label, *[f"{cells[s]:.1f}" for s in STYLES], f"{full['score']:.2f}", f"{full['map_all']:.3f}",
                     f"{v['score']:.2f}", f"{v['map_all']:.3f}"])
    return rows, per_style


def leave_one_style_out(per_style: dict[str, dict[str, float]]) -> list[list[str]]:
    rows, chosen_scores, plain_scores = [], [], []
    for style in STYLES:
        others = [s for s in STYLES if s != style]
        best = max(per_style, key=lambda c: (np.mean([per_style[c][s] for s in others]), c == "plain"))
        chosen_scores.append(per_style[best][style])
        plain_scores.append(per_style["plain"][style])
        rows.append([style, best, f"{np.mean([per_style[best][s] for s in others]):.1f}", f"{per_style[best][style]:.1f}", f"{plain_scores[-1]:.1f}"])
    rows.append(["**mean**", "", "", f"{np.mean(chosen_scores):.1f}", f"{np.mean(plain_scores):.1f}"])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="data draw (default: %(default)s)")
    parser.add_argument("--skip-time", action="store_true", help="no timed runs (views x rules from the cache, made if missing)")
    args = parser.parse_args(argv)
    setup_logging()
    torch.set_num_threads(2)
    data = build_hard_dataset(OUT / f"seed{args.seed}" / "data", seed=args.seed)
    runs = OUT / f"seed{args.seed}" / "runs"
    tables = []
    if not args.skip_time:
        secs = {"no views (--gallery-views)": timed_run(data, runs, "dlib_plain", ["--gallery-views"]),
                "default views": timed_run(data, runs, "dlib", [])}
        meta = json.loads((runs / "dlib" / "meta.json").read_text())
        rule, n_images = meta["view_fusion"], sum(f["images"] for f in meta["faces"].values())
        tables.append(md_table(f"Time of infer_facenet.py --embedder dlib from an empty face cache ({n_images} images: val and test, "
                               f"the default run's rule: {rule['rule']}, {rule['chosen_by']})",
                               ["recipe", "seconds", "images per second"],
                               [[k, f"{v:.0f}", f"{n_images / v:.2f}"] for k, v in secs.items()]))
    rows, per_style = study(data, runs)
    tables.append(md_table("Views x fusion rules, dlib with the default TTA: score per gallery style, overall, validation",
                           ["views, rule", *[f"{s} score" for s in STYLES], "score", "mAP@All", "val score", "val mAP@All"], rows))
    tables.append(md_table("Leave one style out: the combination with the best mean over the other styles, scored on the left-out style",
                           ["left-out style", "chosen without it", "mean over the others", "left-out score", "plain view's left-out score"],
                           leave_one_style_out(per_style)))
    md = [f"## Gallery views on the hard face benchmark (seed {args.seed})", ""]
    for table, lines in tables:
        console.print(table)
        md += lines
    md += [f"Command: `HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python benchmarks/faces/bench_faces_views.py --seed {args.seed}`; "
           "shared 2-core CPU: times compare within one run only.", ""]
    write_results(RESULT, "\n".join(md))
    return 0


if __name__ == "__main__":
    run_cli(main)
