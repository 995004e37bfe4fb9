"""Hard face benchmark: detection cascade per style, false faces, and the face runs' scores.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/faces/bench_faces_hard.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/faces/bench_faces_hard.py --skip-scores   # detection tables only
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/faces/bench_faces_hard.py --skip-detection   # scores, adapter, TTA

Builds benchmarks/out/faces_hard/data (benchmarks/faces/face_data.py: 20 training + 20
test ORL people; gallery posed +-25 deg, downsampled 2-4x, JPEG, and one of five
styles). Then:
1. detection: a cascade of every stage (the default stages first, in their
   order, then the rest) on all synthetic images (train + test): per style the
   images each stage found (later stages see only earlier misses), overall
   recall, and recall of the default cascade (its stages are the first ones);
   the same cascade on face-free PACS images (dog, elephant, giraffe, guitar,
   horse, house over four domains): false faces per stage; seconds per image
   each stage spent on the images it ran on.
2. scores (unless --skip-scores): infer_facenet.py --embedder dlib without TTA
   with --detector none (centre square), mtcnn (the old path), cascade, and
   cascade with --face-fallback best / letterbox or --face-colour rgb / hue
   (the others: the default grey crops); train_face_adapter.py on the
   cascade run (every candidate's validation and test figures); ensemble.py
   --auto over them; per gallery style (the test gallery cut to that style) and
   overall. Then the TTA table: the cascade run with each view group alone,
   flip + blur, and flip + rot + brightness + scale (crops from the cache, so
   the time is the embedding's).
   --skip-detection writes these to bench_faces_hard_scores.md instead.
Results: rich tables, also written to benchmarks/results/bench_faces_hard.md.
Timings come from a shared 2-core machine: compare within one run only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from rich.table import Table

import ensemble
import infer_facenet
import train_face_adapter
from benchmarks.common import ROOT, write_results
from benchmarks.faces.face_data import build_hard_dataset, face_free_images
from benchmarks.faces.face_styles import STYLES
from utils.errors import run_cli
from utils.faces.cascade import DEFAULT_STAGES, STAGES, CascadeParams, FaceCascade
from utils.logs import console, setup_logging
from utils.runs.metrics import evaluate, relevance_matrix
from utils.runs.similarity_io import load_run

OUT = ROOT / "benchmarks" / "out" / "faces_hard"
RESULT = ROOT / "benchmarks" / "results" / "bench_faces_hard.md"


def md_table(title: str, cols: list[str], rows: list[list[str]]) -> tuple[Table, list[str]]:
    table = Table(title=title)
    for c in cols:
        table.add_column(c, justify="left" if c == cols[0] else "right")
    md = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        table.add_row(*r)
        md.append("| " + " | ".join(r) + " |")
    return table, md + [""]


def detection_study(data: Path, per_class_domain: int) -> list[tuple[Table, list[str]]]:
    styles = json.loads((data / "styles.json").read_text())
    rels = sorted(styles)
    order = tuple(DEFAULT_STAGES) + tuple(s for s in STAGES if s not in DEFAULT_STAGES)
    cpu = torch.device("cpu")
    cascade = FaceCascade(CascadeParams(stages=order), cpu)
    faces = cascade.detect([data / r for r in rels], workers=0, desc="synthetic images")
    free = FaceCascade(CascadeParams(stages=order), cpu)
    ff_paths = face_free_images(per_class_domain)
    ff = free.detect(ff_paths, workers=0, desc="face-free images")
    style_of = np.array([styles[r] for r in rels])
    n_default = len(DEFAULT_STAGES)
    cols = ["style", "images", *order, "default cascade", "all stages"]
    rows = []
    for style in [*STYLES, "all"]:
        sel = style_of == style if style != "all" else np.ones(len(rels), bool)
        st = faces.stage[sel]
        n = int(sel.sum())
        cells = [style, str(n)] + [str(int((st == s).sum())) for s in range(len(order))]
        cells += [f"{((st >= 0) & (st < n_default)).mean():.1%}", f"{(st >= 0).mean():.1%}"]
        rows.append(cells)
    st = ff.stage
    rows.append(["face-free PACS (false faces)", str(len(ff_paths))] + [str(int((st == s).sum())) for s in range(len(order))]
                + [f"{((st >= 0) & (st < n_default)).mean():.1%}", f"{(st >= 0).mean():.1%}"])
    det = md_table("Faces found per stage (each stage runs only on the images earlier stages missed)", cols, rows)
    speed_rows = [[s, str(cascade.tried[s]), f"{cascade.seconds[s] / max(1, cascade.tried[s]):.3f}",
                   str(free.tried[s]), f"{free.seconds[s] / max(1, free.tried[s]):.3f}"] for s in order]
    speed = md_table("Seconds per image per stage (on the images it ran on; shared 2-core CPU)",
                     ["stage", "synthetic images run", "s/img", "face-free images run", "s/img "], speed_rows)
    return [det, speed]


def run_face(data: Path, runs: Path, name: str, flags: list[str]) -> float:
    t = time.time()
    infer_facenet.main(["--data", str(data), "--runs", str(runs), "--run-name", name, "--val-fraction", "0.5",
                        "--embedder", "dlib", "--workers", "0", *flags])
    return time.time() - t


def style_cells(sim: np.ndarray, query_names: list[str], gallery_names: list[str], truth: dict, styles: dict) -> list[str]:
    """Score of each style's slice of the test gallery, then score and mAP@All of the whole."""
    cells = []
    for style in STYLES:
        cols_sel = [j for j, g in enumerate(gallery_names) if styles.get(g) == style]
        gal = [gallery_names[j] for j in cols_sel]
        cells.append(f"{evaluate(sim[:, cols_sel], relevance_matrix(query_names, gal, truth))['score']:.1f}")
    full = evaluate(sim, relevance_matrix(query_names, gallery_names, truth))
    return cells + [f"{full['score']:.2f}", f"{full['map_all']:.3f}"]


# score runs: name -> (label, infer_facenet flags); all without TTA (the TTA table measures it)
SCORE_PLAN = {
    "dlib_center": ("centre square", ["--detector", "none", "--tta"]),
    "dlib_mtcnn": ("MTCNN (old path)", ["--detector", "mtcnn", "--tta"]),
    "dlib_cascade": ("cascade", ["--detector", "cascade", "--tta"]),
    "dlib_cascade_best": ("cascade, best-box fallback", ["--detector", "cascade", "--face-fallback", "best", "--tta"]),
    "dlib_cascade_letterbox": ("cascade, letterbox fallback", ["--detector", "cascade", "--face-fallback", "letterbox", "--tta"]),
    "dlib_cascade_rgb": ("cascade, colour crops (--face-colour rgb)", ["--detector", "cascade", "--face-colour", "rgb", "--tta"]),
    "dlib_cascade_hue": ("cascade, hue crops (--face-colour hue)", ["--detector", "cascade", "--face-colour", "hue", "--tta"]),
}
TTA_PLAN = [[], ["flip"], ["rot"], ["brightness"], ["scale"], ["blur"], ["flip", "blur"], ["flip", "rot", "brightness", "scale"]]


def scores(data: Path) -> list[tuple[Table, list[str]]]:
    runs = OUT / "runs"
    if runs.exists():
        shutil.rmtree(runs)
    seconds = {name: run_face(data, runs, name, flags) for name, (_, flags) in SCORE_PLAN.items()}
    t = time.time()
    train_face_adapter.main(["--data", str(data), "--runs", str(runs), "--val-fraction", "0.5", "--source", "dlib_cascade",
                             "--domain-stats", "none"])
    seconds["dlib_cascade_adapted"] = time.time() - t
    models = [*SCORE_PLAN, "dlib_cascade_adapted"]
    out = OUT / "ensemble"
    ensemble.main(["--runs", str(runs), "--models", *models, "--data", str(data), "--out", str(out), "--auto"])
    truth = json.loads((data / "test" / "ground_truth.json").read_text())
    styles = {Path(r).name: s for r, s in json.loads((data / "styles.json").read_text()).items() if r.startswith("test/")}
    cols = ["model", *[f"{s} score" for s in STYLES], "score", "mAP@All", "val score", "val mAP@All", "time s"]
    rows = []
    labels = {n: lbl for n, (lbl, _) in SCORE_PLAN.items()} | {"dlib_cascade_adapted": "cascade + adapter run (validation's choice)",
                                                              "ensemble": f"ensemble.py --auto over the {len(models)} runs"}
    for name in [*models, "ensemble"]:
        run = load_run(runs / name if name != "ensemble" else out)
        m = run.splits["test"]
        val = run.meta["metrics"]["val"]
        rows.append([labels[name], *style_cells(m.sim, m.query_names, m.gallery_names, truth, styles), f"{val['score']:.2f}",
                     f"{val.get('map_all', float('nan')):.3f}", f"{seconds[name]:.0f}" if name in seconds else "-"])
    adapt = load_run(runs / "dlib_cascade_adapted").meta["adaptation"]
    cand_rows = [[name, f"{v['score']:.2f}", f"{v['map_all']:.4f}", f"{adapt['test'][name]['score']:.2f}", f"{adapt['test'][name]['map_all']:.4f}",
                  "yes" if name == adapt["chosen"] else ""] for name, v in adapt["val"].items()]
    return [md_table("Competition score per gallery style (test gallery cut to that style), dlib, no TTA", cols, rows),
            md_table("train_face_adapter.py --source dlib_cascade: each candidate (validation chooses; test shown, not used)",
                     ["candidate", "val score", "val mAP@All", "test score", "test mAP@All", "kept"], cand_rows),
            tta_table(data, runs, truth, styles)]


def tta_table(data: Path, runs: Path, truth: dict, styles: dict) -> tuple[Table, list[str]]:
    """The default cascade with each TTA view group alone and all of them; crops come from the cache."""
    rows = []
    for groups in TTA_PLAN:
        name = "dlib_tta_" + ("_".join(groups) or "identity")
        secs = run_face(data, runs, name, ["--detector", "cascade", "--tta", *groups])
        run = load_run(runs / name)
        m = run.splits["test"]
        rows.append([" + ".join(["identity", *groups]), str(run.meta["tta_views"]),
                     *style_cells(m.sim, m.query_names, m.gallery_names, truth, styles), f"{run.meta['metrics']['val']['score']:.2f}",
                     f"{run.meta['metrics']['val']['map_all']:.3f}", f"{secs:.0f}"])
    cols = ["views", "n views", *[f"{s} score" for s in STYLES], "score", "mAP@All", "val score", "val mAP@All", "time s (crops cached)"]
    return md_table("TTA view groups, dlib on the default cascade's crops", cols, rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--face-free", type=int, default=10, help="PACS images per face-free class and domain (default: %(default)s)")
    parser.add_argument("--skip-scores", action="store_true", help="detection tables only")
    parser.add_argument("--skip-detection", action="store_true", help="score, adapter and TTA tables only (written to bench_faces_hard_scores.md)")
    args = parser.parse_args(argv)
    setup_logging()
    torch.set_num_threads(2)
    data = build_hard_dataset(OUT / "data")
    tables = [] if args.skip_detection else detection_study(data, args.face_free)
    if not args.skip_scores:
        tables += scores(data)
    md = ["## Hard face benchmark (ORL, 20 test people: 60 photo queries x 140 posed, degraded, stylised gallery images)", ""]
    for table, lines in tables:
        console.print(table)
        md += lines
    md += [f"Default cascade stages: {', '.join(DEFAULT_STAGES)}. Command: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/faces/bench_faces_hard.py"
           + (" --skip-scores" if args.skip_scores else "") + (" --skip-detection" if args.skip_detection else "") + "`", ""]
    result = RESULT.with_name("bench_faces_hard_scores.md") if args.skip_detection else RESULT
    write_results(result, "\n".join(md))
    return 0


if __name__ == "__main__":
    run_cli(main)
