"""Time per image of the default face recipe against the recipe without gallery views, round by round.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/faces/bench_faces_time.py               # 2 rounds, the whole test set of a draw
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/faces/bench_faces_time.py --rounds 3 --n-test 12

Issue 25's bound: the gallery views may cost at most 1.5x the time per image of the recipe without
them. Each round runs ``infer_facenet.py --embedder dlib --gallery-views`` (none: the recipe before
the views), the views with a fixed rule (``--view-fusion zmax``), the default (``--view-fusion
auto``, which embeds renders of the validation queries for its harder validation where rules tie)
and the default with dlib in the main process alone (``--dlib-processes 1``; the others run dlib's
model on every core), each as its own process from an empty face cache, one after the other (reversed on odd rounds), on
one draw of the hard set (benchmarks/faces/face_data.py). The machine is shared and its load drifts:
the ratio is taken round by round (the runs of a round meet about the same load) and its median is
the figure to quote; the seconds themselves compare only within this file.
Results: benchmarks/results/bench_faces_time.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from benchmarks.common import ROOT, child_env, write_results
from benchmarks.faces.bench_faces_hard import md_table
from benchmarks.faces.face_data import build_hard_dataset
from utils.errors import KitError, run_cli
from utils.logs import console, setup_logging

OUT = ROOT / "benchmarks" / "out" / "faces_time"
RESULT = ROOT / "benchmarks" / "results" / "bench_faces_time.md"
RECIPES = {"without views (--gallery-views)": ["--gallery-views"],
           "views, a fixed rule (--view-fusion zmax)": ["--view-fusion", "zmax"],
           "default (views, --view-fusion auto: a harder validation where rules tie)": [],
           "default in one process (--dlib-processes 1)": ["--dlib-processes", "1"]}
BASE, DEFAULT, ONE = "without views (--gallery-views)", "default (views, --view-fusion auto: a harder validation where rules tie)", \
    "default in one process (--dlib-processes 1)"


def timed(data: Path, runs: Path, flags: list[str]) -> tuple[float, int]:
    """Wall seconds of one infer_facenet.py process from an empty face cache, and the images it read."""
    shutil.rmtree(runs, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "infer_facenet.py"), "--data", str(data), "--runs", str(runs), "--val-fraction", "0.5",
           "--embedder", "dlib", "--workers", "0", *flags]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env={**child_env(), "HF_HUB_OFFLINE": "1", "KIT_PROGRESS": "off"}, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise KitError(f"{' '.join(cmd)}: exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    meta = json.loads((runs / "dlib" / "meta.json").read_text())
    return seconds, sum(f["images"] for f in meta["faces"].values())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds, each recipe once per round (default: %(default)s)")
    parser.add_argument("--n-train", type=int, default=4, help="training people of the draw (default: %(default)s)")
    parser.add_argument("--n-test", type=int, default=20, help="test people of the draw (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="data draw (default: %(default)s)")
    args = parser.parse_args(argv)
    setup_logging()
    data = build_hard_dataset(OUT / "data", n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    names = list(RECIPES)
    secs: dict[str, list[float]] = {n: [] for n in names}
    n_images = 0
    for k in range(args.rounds):
        for name in (names if k % 2 == 0 else names[::-1]):
            s, n_images = timed(data, OUT / "runs", RECIPES[name])
            secs[name].append(s)
            console.print(f"round {k + 1}/{args.rounds}: {name}: {s:.1f} s ({n_images} images)")
    rows = [[n, *[f"{s:.1f}" for s in secs[n]], f"{np.median(secs[n]):.1f}", f"{n_images / np.median(secs[n]):.3f}"] for n in names]
    for label, num, den in [*((f"ratio: {n.split(' (')[0]} / without views", n, BASE) for n in names[1:3]),
                            ("speed-up of dlib on every core: default in one process / default", ONE, DEFAULT)]:
        ratios = np.array(secs[num]) / np.array(secs[den])
        rows.append([label, *[f"{r:.2f}" for r in ratios], f"{np.median(ratios):.2f}", ""])
    table, lines = md_table(f"infer_facenet.py --embedder dlib, whole process from an empty face cache, {n_images} images "
                            f"(val and test of a draw with {args.n_train} training and {args.n_test} test people), {args.rounds} rounds",
                            ["recipe", *[f"round {k + 1} s" for k in range(args.rounds)], "median s", "images per second (median)"], rows)
    console.print(table)
    write_results(RESULT, "\n".join(["## Time per image: gallery views against none", "",
                                     "Issue 25's bound: at most 1.5x the time per image of the recipe without views. Rounds alternate "
                                     "the order of the recipes; the ratio is taken within each round.", "", *lines]))
    return 0


if __name__ == "__main__":
    run_cli(main)
