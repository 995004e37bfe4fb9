"""Query photo groups on the hard face benchmark: does pooling the rows of one person's query photos help?

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/faces/bench_faces_query_groups.py --seeds 0 1 2 3 4

The queries are photos, which the face embedder reads well (photo against photo), while a stylised
gallery image is read weakly. Pooling each query's row with the rows of the other query photos of the
same person (a transductive query-side expansion with the embedder's own photo-photo similarity, not
the matrix profiles ``ensemble.py --rerank`` must use) averages the weak evidence of several photos.
Measured on the draws and arrays of bench_faces_loso.py (its ``embed`` phase makes any missing): the
default face matrix (views detector + texture, zmax), each query's row replaced by the mean of the rows
of its group (itself and every query whose cosine to it passes a threshold), then the run's
dual-softmax; scored on the test gallery cut to each style, as leave one style out scores a held-out
style, and on the whole gallery:

- oracle groups (the test identities: the most this can give);
- fixed cosine thresholds (0.93 to 0.96);
- the threshold read from validation: the highest cosine of two validation queries of different people
  (no validation pair merged wrongly);
- the two closest photos of each query (right only where every person has three photos, as here).

"wrong merges" counts ordered pairs of test queries of different people pooled together.
Results: benchmarks/results/bench_faces_query_groups.md.
"""

from __future__ import annotations

import argparse
import json
from typing import Sequence

import numpy as np

from benchmarks.common import write_results
from benchmarks.faces.bench_faces_hard import md_table
from benchmarks.faces.bench_faces_loso import OUT, embed_draw, face_path, mean_se
from benchmarks.faces.face_styles import STYLES
from utils.errors import run_cli
from utils.faces.views import fuse, gallery_normalised
from utils.logs import console, setup_logging
from utils.runs.metrics import evaluate, relevance_matrix

RESULT = OUT.parents[1] / "results" / "bench_faces_query_groups.md"
THRESHOLDS = (0.93, 0.94, 0.95, 0.96)
VAL_RULE = "cosine above the validation's highest different-person pair"


def same_person(names: list[str], relevant: dict[str, list[str]]) -> np.ndarray:
    """(n, n) bool: two queries of one person (the same relevant gallery images), the diagonal false."""
    key = [tuple(sorted(relevant[n])) for n in names]
    same = np.array([[a == b for b in key] for a in key])
    np.fill_diagonal(same, False)
    return same


def pooled(sim: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Each row replaced by the mean of the rows of its group (``members``: (n, n) bool, itself included)."""
    w = members.astype(np.float64)
    np.fill_diagonal(w, 1.0)
    return ((w @ sim) / w.sum(1, keepdims=True)).astype(np.float32)


def top_k(qq: np.ndarray, k: int) -> np.ndarray:
    """Each query's ``k`` closest other queries, as a (n, n) bool."""
    qq = qq.copy()
    np.fill_diagonal(qq, -np.inf)
    out = np.zeros(qq.shape, bool)
    np.put_along_axis(out, np.argsort(-qq, axis=1)[:, :k], True, axis=1)
    return out


def draw(seed: int) -> dict[str, dict[str, float]]:
    """Per variant: the score on the gallery cut to each style, their mean, the whole gallery, wrong merges."""
    z = np.load(embed_draw(seed))
    data = OUT / f"seed{seed}" / "data"
    _, task, _ = face_path(data, OUT / f"seed{seed}" / "runs")
    styles = json.loads((data / "styles.json").read_text())
    test_style = np.array([styles.get(task.layout.rel(p), "real") for p in task.test_gallery])
    truth = task.relevant("test")
    q, g = z["names.test_query"].tolist(), z["names.test_gallery"].tolist()
    assert g == [p.name for p in task.test_gallery], "arrays.npz and the task disagree on the test gallery"
    vq = z["names.val_query"].tolist()
    val_qq = z["val_query"] @ z["val_query"].T
    off = ~np.eye(len(vq), dtype=bool)
    t_val = float(val_qq[off & ~same_person(vq, task.relevant("val"))].max())
    qq = z["test_query"] @ z["test_query"].T
    truth_same = same_person(q, truth)
    base = fuse(z["test_query"], [z["test_gallery"], z["test_gallery.detector"], z["test_gallery.texture0.05"]], "zmax")
    groups = {"default (no pooling)": np.zeros_like(truth_same), "oracle groups (test identities)": truth_same}
    groups |= {f"cosine above {t:.2f}": qq > t for t in THRESHOLDS}
    groups[VAL_RULE] = qq > t_val
    groups["the 2 closest photos"] = top_k(qq, 2)
    out = {}
    for name, members in groups.items():
        np.fill_diagonal(members, False)
        sim = gallery_normalised({"test": pooled(base, members)}, "dual_softmax")[0]["test"]
        cells = {s: evaluate(sim[:, test_style == s], relevance_matrix(q, [g[j] for j in np.flatnonzero(test_style == s)], truth))["score"]
                 for s in STYLES}
        cells["mean"] = float(np.mean([cells[s] for s in STYLES]))
        cells["all"] = evaluate(sim, relevance_matrix(q, g, truth))["score"]
        cells["wrong"] = float((members & ~truth_same).sum())
        cells["threshold"] = t_val
        out[name] = cells
        console.print(f"seed {seed}: {name}: mean over styles {cells['mean']:.1f}, whole gallery {cells['all']:.1f}, wrong merges {cells['wrong']:.0f}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="data draws (default: %(default)s)")
    args = parser.parse_args(argv)
    setup_logging()
    results = [draw(s) for s in args.seeds]
    rows = [[name, *[f"{np.mean([r[name][s] for r in results]):.1f}" for s in STYLES], mean_se([r[name]["mean"] for r in results]),
             mean_se([r[name]["all"] for r in results]), f"{np.mean([r[name]['wrong'] for r in results]):.0f}"] for name in results[0]]
    table, lines = md_table(f"Score per gallery style (test gallery cut to the style), mean over draws {', '.join(map(str, args.seeds))}; "
                            "mean over styles and whole gallery: mean ± standard error over draws",
                            ["query groups", *STYLES, "mean over styles", "whole gallery", "wrong merges (ordered pairs)"], rows)
    console.print(table)
    t_val = [r[VAL_RULE]["threshold"] for r in results]
    lines += ["", f"The validation's threshold per draw: {', '.join(f'{t:.3f}' for t in t_val)}."]
    write_results(RESULT, "\n".join(["## Query photo groups on the hard face benchmark", "",
                                     "dlib, default TTA and gallery views (zmax), dual-softmax after pooling; the draws and arrays of "
                                     "bench_faces_loso.py: 60 test queries (3 photos of each of 20 people), 30 validation queries (10 people).",
                                     "", *lines]))
    return 0


if __name__ == "__main__":
    run_cli(main)
