"""Hard face benchmark: detection cascade per style, false faces, and the face runs' scores.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_faces_hard.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_faces_hard.py --skip-scores   # detection tables only

Builds benchmarks/out/faces_hard/data (benchmarks/face_data.py: 20 training + 20
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
   cascade --face-fallback best; ensemble.py --auto over them; per gallery
   style (the test gallery cut to that style) and overall.
Results: rich tables, also written to benchmarks/results/bench_faces_hard.md.
Timings come from a shared 2-core machine: compare within one run only.
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
import torch
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ensemble  # noqa: E402
import infer_facenet  # noqa: E402
from benchmarks.face_data import build_hard_dataset, face_free_images  # noqa: E402
from benchmarks.face_styles import STYLES  # noqa: E402
from utils.atomic import atomic_write_bytes  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.faces.cascade import DEFAULT_STAGES, STAGES, CascadeParams, FaceCascade  # noqa: E402
from utils.logs import console, setup_logging  # noqa: E402
from utils.runs.metrics import evaluate, relevance_matrix  # noqa: E402
from utils.runs.similarity_io import load_run  # noqa: E402

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
                        "--embedder", "dlib", "--tta", "--workers", "0", *flags])
    return time.time() - t


def scores(data: Path) -> list[tuple[Table, list[str]]]:
    runs = OUT / "runs"
    if runs.exists():
        shutil.rmtree(runs)
    plan = {
        "dlib_center": ("centre square", ["--detector", "none"]),
        "dlib_mtcnn": ("MTCNN (old path)", ["--detector", "mtcnn"]),
        "dlib_cascade": ("cascade", ["--detector", "cascade"]),
        "dlib_cascade_best": ("cascade, best-box fallback", ["--detector", "cascade", "--face-fallback", "best"]),
    }
    seconds = {name: run_face(data, runs, name, flags) for name, (_, flags) in plan.items()}
    out = OUT / "ensemble"
    ensemble.main(["--runs", str(runs), "--models", *plan, "--data", str(data), "--out", str(out), "--auto"])
    truth = json.loads((data / "test" / "ground_truth.json").read_text())
    styles = {Path(r).name: s for r, s in json.loads((data / "styles.json").read_text()).items() if r.startswith("test/")}
    cols = ["model", *[f"{s} score" for s in STYLES], "score", "mAP@All", "val score", "time s"]
    rows = []
    for name, label in [*((n, lbl) for n, (lbl, _) in plan.items()), ("ensemble", "ensemble.py --auto over the four")]:
        run = load_run(runs / name if name != "ensemble" else out)
        m = run.splits["test"]
        cells = [label]
        for style in STYLES:
            cols_sel = [j for j, g in enumerate(m.gallery_names) if styles.get(g) == style]
            gal = [m.gallery_names[j] for j in cols_sel]
            cells.append(f"{evaluate(m.sim[:, cols_sel], relevance_matrix(m.query_names, gal, truth))['score']:.1f}")
        full = evaluate(m.sim, relevance_matrix(m.query_names, m.gallery_names, truth))
        cells += [f"{full['score']:.2f}", f"{full['map_all']:.3f}", f"{run.meta['metrics']['val']['score']:.2f}",
                  f"{seconds[name]:.0f}" if name in seconds else "-"]
        rows.append(cells)
    return [md_table("Competition score per gallery style (test gallery cut to that style), dlib, no TTA", cols, rows)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--face-free", type=int, default=10, help="PACS images per face-free class and domain (default: %(default)s)")
    parser.add_argument("--skip-scores", action="store_true", help="detection tables only")
    args = parser.parse_args(argv)
    setup_logging()
    torch.set_num_threads(2)
    data = build_hard_dataset(OUT / "data")
    tables = detection_study(data, args.face_free)
    if not args.skip_scores:
        tables += scores(data)
    md = ["## Hard face benchmark (ORL, 20 test people: 60 photo queries x 140 posed, degraded, stylised gallery images)", ""]
    for table, lines in tables:
        console.print(table)
        md += lines
    md += [f"Default cascade stages: {', '.join(DEFAULT_STAGES)}. Command: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_faces_hard.py"
           + (" --skip-scores`" if args.skip_scores else "`"), ""]
    atomic_write_bytes(RESULT, "\n".join(md).encode())
    console.print(f"written {RESULT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
