"""The hard face benchmark over several draws: how much of a score is the draw of the test people.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/faces/bench_faces_seeds.py                 # seeds 0 1 2 3 4
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/faces/bench_faces_seeds.py --seeds 0 1 2

bench_faces_hard.py measures one draw (seed 0): 20 test people, 60 queries, so
one query moving in or out of first place moves the score by 10. Here each seed
draws its own split of the 40 ORL people into 20 training and 20 test people and
its own poses, degradations and styles (benchmarks/faces/face_data.py), then runs:
- ``infer_facenet.py --embedder dlib --tta`` (the cascade, no TTA),
- ``infer_facenet.py --embedder dlib`` (the default face recipe),
- ``train_face_adapter.py --source <default run>`` (validation's choice),
- ``ensemble.py --auto`` over the three,
and, on the default run's matrices, every re-ranking step of ensemble.py alone
(validation and test figures: what --auto could have chosen). A table per seed, with the mean,
standard deviation and standard error over the seeds; re-ranking summed over the seeds.
``--detection`` instead runs the default cascade on each draw's 280 synthetic images, and once
on the 240 face-free PACS images (false faces do not depend on the draw; per stage: bench_faces_hard.py),
written to bench_faces_seeds_detection.md. Results: rich tables,
also written to benchmarks/results/bench_faces_seeds.md. Data and runs go to
benchmarks/out/faces_seeds/seed<N>/ (kept: a second call reuses the face cache).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from rich.table import Table

import ensemble
import train_face_adapter
from benchmarks.common import ROOT, write_results
from benchmarks.faces.bench_faces_hard import md_table, run_face
from benchmarks.faces.face_data import build_hard_dataset, face_free_images
from benchmarks.faces.face_styles import STYLES
from utils.ensemble.plan import val_relevance
from utils.ensemble.rerank import STEPS, RerankParams, rerank
from utils.errors import KitError, run_cli
from utils.faces.cascade import CascadeParams, FaceCascade
from utils.logs import console, setup_logging
from utils.runs.metrics import evaluate, relevance_matrix
from utils.runs.similarity_io import load_run

OUT = ROOT / "benchmarks" / "out" / "faces_seeds"
RESULT = ROOT / "benchmarks" / "results" / "bench_faces_seeds.md"
RUNS = {"dlib_cascade": "cascade, no TTA", "dlib": "default recipe", "dlib_adapted": "default + adapter (validation's choice)",
        "ensemble": "ensemble.py --auto over the three"}
RERANKS = [(), ("dba",), ("qe",), ("kr",), ("dual_softmax",), ("sinkhorn",)]


def seed_data(seed: int) -> Path:
    """The draw's hard set, built once and kept under OUT/seed<N>/data."""
    data = OUT / f"seed{seed}" / "data"
    if not (data / "styles.json").is_file():
        build_hard_dataset(data, seed=seed)
    return data


def one_seed(seed: int) -> tuple[dict[str, dict], dict[str, dict]]:
    """Val and test metrics of each run, and of each re-ranking of the default run, for one draw."""
    data, runs = seed_data(seed), OUT / f"seed{seed}" / "runs"
    run_face(data, runs, "dlib_cascade", ["--tta"])
    run_face(data, runs, "dlib", [])
    if train_face_adapter.main(["--data", str(data), "--runs", str(runs), "--val-fraction", "0.5", "--source", "dlib"]) != 0:
        raise KitError(f"seed {seed}: train_face_adapter.py failed")
    if ensemble.main(["--runs", str(runs), "--models", "dlib_cascade", "dlib", "dlib_adapted", "--data", str(data),
                      "--out", str(runs / "ensemble"), "--auto"]) != 0:
        raise KitError(f"seed {seed}: ensemble.py failed")
    truth = json.loads((data / "test" / "ground_truth.json").read_text())
    loaded = {name: load_run(runs / name) for name in RUNS}
    out = {}
    for name, run in loaded.items():
        t = run.splits["test"]
        out[name] = {"val": run.meta["metrics"]["val"], "test": evaluate(t.sim, relevance_matrix(t.query_names, t.gallery_names, truth))}
    out["ensemble"]["choice"] = loaded["ensemble"].meta["choice"]["rerank_label"]
    v, t = loaded["dlib"].splits["val"], loaded["dlib"].splits["test"]
    v_rel, t_rel = val_relevance(v.query_names, v.gallery_names), relevance_matrix(t.query_names, t.gallery_names, truth)
    reranked = {}
    for steps in RERANKS:
        p = RerankParams(steps=steps)
        reranked[p.label()] = {"val": evaluate(rerank(v.sim, p), v_rel), "test": evaluate(rerank(t.sim, p), t_rel)}
    return out, reranked


def detection(seeds: list[int]) -> tuple[Table, list[str]]:
    """The default cascade on each draw's 280 synthetic images (train and test people): share found, per style;
    and the false faces it finds in the face-free PACS images."""
    rows, shares = [], []
    for seed in seeds:
        data = seed_data(seed)
        styles = json.loads((data / "styles.json").read_text())
        rels = sorted(styles)
        found = FaceCascade(CascadeParams(), torch.device("cpu")).detect([data / r for r in rels], workers=0, desc=f"seed {seed}").stage >= 0
        style_of = np.array([styles[r] for r in rels])
        shares.append([found[style_of == st].mean() for st in STYLES] + [found.mean()])
        rows.append([str(seed), *[f"{x:.1%}" for x in shares[-1][:-1]], f"{int(found.sum())} / {len(found)} ({found.mean():.1%})"])
    a = np.array(shares)
    rows.append(["**mean**", *[f"{x:.1%}" for x in a.mean(axis=0)]])
    rows.append(["**lowest, highest**", *[f"{lo:.1%}, {hi:.1%}" for lo, hi in zip(a.min(axis=0), a.max(axis=0))]])
    free = FaceCascade(CascadeParams(), torch.device("cpu")).detect(face_free_images(10), workers=0, desc="face-free PACS")
    false = int((free.stage >= 0).sum())
    rows.append(["**false faces** (240 face-free PACS images, any draw)", *[""] * len(STYLES), f"{false} / {len(free.stage)} ({false / len(free.stage):.1%})"])
    return md_table("Faces the default cascade finds in each draw's synthetic images (20 training + 20 test people, 7 each)",
                    ["seed", *STYLES, "all"], rows)


def mean_sd(values: list[float], fmt: str) -> str:
    a = np.array(values, dtype=float)
    return f"{a.mean():{fmt}} +- {a.std(ddof=1) if len(a) > 1 else 0.0:{fmt}}"


def summary_rows(results: dict, seeds: list[int]) -> list[list[str]]:
    """Mean, standard deviation and standard error of the mean over the draws, per run."""
    rows = []
    for label, fn in (("mean", np.mean), ("sd", lambda a: np.std(a, ddof=1)), ("standard error", lambda a: np.std(a, ddof=1) / np.sqrt(len(a)))):
        cells = []
        for n in RUNS:
            sc = np.array([results[s][0][n]["test"]["score"] for s in seeds])
            mp = np.array([results[s][0][n]["test"]["map_all"] for s in seeds])
            cells.append(f"{fn(sc):.2f} ({fn(mp):.3f})" if len(seeds) > 1 or label == "mean" else "-")
        rows.append([f"**{label}**", *cells, ""])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="data draws (default: %(default)s)")
    parser.add_argument("--detection", action="store_true", help="only the detection table (the default cascade on each draw's synthetic images)")
    args = parser.parse_args(argv)
    setup_logging()
    torch.set_num_threads(2)
    if args.detection:
        table, lines = detection(args.seeds)
        console.print(table)
        lines += ["Command: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/faces/bench_faces_seeds.py --detection --seeds "
                  + " ".join(map(str, args.seeds)) + "`", ""]
        write_results(RESULT.with_name("bench_faces_seeds_detection.md"), "\n".join(lines))
        return 0
    results = {s: one_seed(s) for s in args.seeds}
    seeds = list(results)
    tables = [md_table("Test score (mAP@All) per draw of the 20 test people, dlib", ["seed", *RUNS.values(), "--auto chose"],
                       [[str(s), *[f"{results[s][0][n]['test']['score']:.2f} ({results[s][0][n]['test']['map_all']:.3f})" for n in RUNS],
                         results[s][0]["ensemble"]["choice"]] for s in seeds] + summary_rows(results, seeds))]
    none = RerankParams().label()
    rrows = []
    for label in results[seeds[0]][1]:
        cells = [results[s][1][label] for s in seeds]
        base = [results[s][1][none] for s in seeds]
        rrows.append([label, f"{np.mean([c['val']['score'] for c in cells]):.2f}", f"{np.mean([c['val']['map_all'] for c in cells]):.3f}",
                      mean_sd([c["test"]["score"] for c in cells], ".2f"),
                      f"{sum(c['test']['score'] > b['test']['score'] for c, b in zip(cells, base))} / "
                      f"{sum(c['test']['score'] < b['test']['score'] for c, b in zip(cells, base))}",
                      f"{sum(c['val']['map_all'] > b['val']['map_all'] for c, b in zip(cells, base))}"])
    tables.append(md_table(f"ensemble.py's re-ranking steps ({', '.join(STEPS)}) alone on the default run, default settings, "
                           f"over {len(seeds)} draws",
                           ["re-ranking", "val score mean", "val mAP mean", "test score mean +- sd", "draws test above / below none",
                            "draws val mAP above none"], rrows))
    md = [f"## Hard face benchmark over {len(seeds)} draws (ORL: 20 training + 20 test people per draw)", ""]
    for table, lines in tables:
        console.print(table)
        md += lines
    md += ["Command: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/faces/bench_faces_seeds.py --seeds " + " ".join(map(str, seeds)) + "`", ""]
    write_results(RESULT, "\n".join(md))
    return 0


if __name__ == "__main__":
    run_cli(main)
