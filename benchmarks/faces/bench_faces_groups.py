"""Query and gallery groups on the hard face benchmark: does pooling one person's images help, and can they be found?

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/faces/bench_faces_groups.py --seeds 0 1 2 3 4

The queries are photos, which the face embedder reads well (photo against photo), while a stylised
gallery image is read weakly. Two transductive poolings of the default face matrix (views detector +
texture, zmax), each followed by the run's dual-softmax, on the draws and arrays of
bench_faces_loso.py (its ``embed`` phase makes any missing); scored on the test gallery cut to each
style, as leave one style out scores a held-out style, and on the whole gallery:

- query groups: each query's row replaced by the mean of the rows of its group (itself and the query
  photos taken as the same person): oracle groups (the test identities: the most this can give), fixed
  cosine thresholds (0.93 to 0.96), the threshold read from validation (the highest cosine of two
  validation queries of different people), the two closest photos of each query (right only where every
  person has three photos, as here); "wrong links" counts ordered pairs of different people pooled;
- gallery groups: each gallery column averaged half and half with the mean column of the gallery images
  linked to it, so that a pencil drawing borrows the evidence of the same person's cartoon: oracle links
  (every other image of the person), and each image's closest other image by the embedder's cosine (max
  over the view pairs), as is or after removing each style's mean embedding (the styles' labels: an
  upper bound for a style clustering); "link precision" is the share of links to the same person.

Results: benchmarks/results/bench_faces_groups.md.
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

RESULT = OUT.parents[1] / "results" / "bench_faces_groups.md"
THRESHOLDS = (0.93, 0.94, 0.95, 0.96)
VAL_RULE = "cosine above the validation's highest different-person pair"


def same_person(names: list[str], relevant: dict[str, list[str]]) -> np.ndarray:
    """(n, n) bool: two images of one person (the same ``relevant`` entry), the diagonal false."""
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
    """Each image's ``k`` closest others by ``qq`` (a square similarity), as a (n, n) bool."""
    qq = qq.copy()
    np.fill_diagonal(qq, -np.inf)
    out = np.zeros(qq.shape, bool)
    np.put_along_axis(out, np.argsort(-qq, axis=1)[:, :k], True, axis=1)
    return out


def score_cells(sim: np.ndarray, q: list[str], g: list[str], truth: dict, test_style: np.ndarray) -> dict[str, float]:
    """The run's dual-softmax on ``sim``, then the score on the gallery cut to each style, their mean and the whole gallery."""
    sim = gallery_normalised({"test": sim}, "dual_softmax")[0]["test"]
    cells = {s: evaluate(sim[:, test_style == s], relevance_matrix(q, [g[j] for j in np.flatnonzero(test_style == s)], truth))["score"]
             for s in STYLES}
    cells["mean"] = float(np.mean([cells[s] for s in STYLES]))
    cells["all"] = evaluate(sim, relevance_matrix(q, g, truth))["score"]
    return cells


def query_groups(z, task) -> tuple[dict[str, np.ndarray], float]:
    """Each query group rule's (n, n) bool links, and the validation's threshold."""
    vq = z["names.val_query"].tolist()
    val_qq = z["val_query"] @ z["val_query"].T
    off = ~np.eye(len(vq), dtype=bool)
    t_val = float(val_qq[off & ~same_person(vq, task.relevant("val"))].max())
    qq = z["test_query"] @ z["test_query"].T
    groups = {"oracle groups (test identities)": same_person(z["names.test_query"].tolist(), task.relevant("test"))}
    groups |= {f"cosine above {t:.2f}": qq > t for t in THRESHOLDS}
    groups[VAL_RULE] = qq > t_val
    groups["the 2 closest photos"] = top_k(qq, 2)
    for links in groups.values():
        np.fill_diagonal(links, False)  # a query is always in its own group: not a link
    return groups, t_val


def gallery_links(z, g: list[str], truth: dict, test_style: np.ndarray) -> dict[str, np.ndarray]:
    """Each gallery link rule's (n, n) bool links: oracle, closest by cosine, closest after removing the styles' means."""
    owner = {name: tuple(sorted(rel)) for rel in truth.values() for name in rel}
    views = [z["test_gallery"], z["test_gallery.detector"], z["test_gallery.texture0.05"]]
    centred = [x - np.stack([x[test_style == s].mean(0) for s in test_style]) for x in views]
    centred = [c / np.linalg.norm(c, axis=1, keepdims=True) for c in centred]
    cosine = lambda vs: np.max([a @ b.T for a in vs for b in vs], axis=0)  # noqa: E731
    return {"oracle links (every other image of the person)": same_person(g, {n: [owner[n]] for n in g}),
            "the closest image (cosine)": top_k(cosine(views), 1),
            "the closest image, styles' means removed (labels)": top_k(cosine(centred), 1)}


def draw(seed: int) -> dict[str, dict[str, float]]:
    """Per variant: the score on the gallery cut to each style, their mean, the whole gallery, the links' quality."""
    z = np.load(embed_draw(seed))
    data = OUT / f"seed{seed}" / "data"
    _, task, _ = face_path(data, OUT / f"seed{seed}" / "runs")
    styles = json.loads((data / "styles.json").read_text())
    test_style = np.array([styles.get(task.layout.rel(p), "real") for p in task.test_gallery])
    truth = task.relevant("test")
    q, g = z["names.test_query"].tolist(), z["names.test_gallery"].tolist()
    assert g == [p.name for p in task.test_gallery], "arrays.npz and the task disagree on the test gallery"
    base = fuse(z["test_query"], [z["test_gallery"], z["test_gallery.detector"], z["test_gallery.texture0.05"]], "zmax")
    out = {"default (no pooling)": score_cells(base, q, g, truth, test_style) | {"links": np.nan, "threshold": 0.0}}
    groups, t_val = query_groups(z, task)
    truth_same = groups["oracle groups (test identities)"]
    for name, members in groups.items():
        out[f"query: {name}"] = score_cells(pooled(base, members), q, g, truth, test_style) | {
            "links": float((members & ~truth_same).sum()), "threshold": t_val}
    gallery_same = gallery_links(z, g, truth, test_style)
    oracle = next(iter(gallery_same.values()))
    for name, links in gallery_same.items():
        w = 0.5 * links / np.maximum(links.sum(1, keepdims=True), 1)
        np.fill_diagonal(w, 0.5)
        out[f"gallery: {name}"] = score_cells(base @ w.T, q, g, truth, test_style) | {
            "links": float((links & oracle).sum() / links.sum()), "threshold": 0.0}
    for name, cells in out.items():
        console.print(f"seed {seed}: {name}: mean over styles {cells['mean']:.1f}, whole gallery {cells['all']:.1f}, links {cells['links']:.2f}")
    return out


def links_cell(name: str, values: list[float]) -> str:
    """The mean over draws of a rule's wrong query links or its gallery links' precision."""
    if name.startswith("query: "):
        return f"{np.mean(values):.1f} wrong"
    return f"precision {np.mean(values):.2f}" if name.startswith("gallery: ") else ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="data draws (default: %(default)s)")
    args = parser.parse_args(argv)
    setup_logging()
    results = [draw(s) for s in args.seeds]
    rows = [[name, *[f"{np.mean([r[name][s] for r in results]):.1f}" for s in STYLES], mean_se([r[name]["mean"] for r in results]),
             mean_se([r[name]["all"] for r in results]), links_cell(name, [r[name]["links"] for r in results])] for name in results[0]]
    table, lines = md_table(f"Score per gallery style (test gallery cut to the style), mean over draws {', '.join(map(str, args.seeds))}; "
                            "mean over styles and whole gallery: mean ± standard error over draws",
                            ["pooling", *STYLES, "mean over styles", "whole gallery", "links (mean over draws)"], rows)
    console.print(table)
    t_val = [r[f"query: {VAL_RULE}"]["threshold"] for r in results]
    lines += ["", f"The validation's threshold per draw: {', '.join(f'{t:.3f}' for t in t_val)}."]
    write_results(RESULT, "\n".join(["## Query and gallery groups on the hard face benchmark", "",
                                     "dlib, default TTA and gallery views (zmax), dual-softmax after pooling; the draws and arrays of "
                                     "bench_faces_loso.py: 60 test queries (3 photos of each of 20 people), 30 validation queries (10 people), "
                                     "140 test gallery images (7 of each person, the five styles in turn).",
                                     "", *lines]))
    return 0


if __name__ == "__main__":
    run_cli(main)
