"""Reading aids and score normalisations tried beyond the default gallery views, per style of the hard face benchmark.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python benchmarks/faces/bench_faces_aids.py --seeds 0 1

The default face recipe compares each query photo with every gallery image as it is, through the
detector stage's transform and through a texture low-pass, and keeps a pair's closest view
(utils/faces/views.py). This benchmark measures what else was tried on the same draws
(bench_faces_loso.py's data and face cache, made by its ``embed`` phase if missing), dlib with the
default TTA, every figure the competition score of the 60 test queries against the test gallery cut
to one style (about 28 images), and against the whole gallery:

- every reading aid on every gallery image (not only where the detector needed it): inverted,
  CLAHE, hue read back to brightness, the sketch stage's blur, wider low-passes, a dodge sketch,
  Laplacian edges, a bilateral filter;
- aids on the query side (the photo rendered as a dodge sketch, smoothed, low-passed), alone and
  beside the default views, and the same aid on both sides;
- a looser crop (the whole context crop, hair and jaw line) on both sides;
- label-free normalisations of the default matrix: CSLS-style gallery hub correction (k = 10),
  per-gallery-image z-scores, ensemble.py's dual-softmax and Sinkhorn (whole test matrix first,
  then the cut), centring each side's embeddings on its own mean.

Every aid's embeddings are cached under ``benchmarks/out/faces_loso/seed<k>/aids/``.
Results: benchmarks/results/bench_faces_aids.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

from benchmarks.common import write_results
from benchmarks.faces.bench_faces_hard import md_table
from benchmarks.faces.bench_faces_loso import OUT, embed_draw, face_path, unit
from benchmarks.faces.face_styles import STYLES
from utils.cache import cached
from utils.ensemble.fusion import row_zscore
from utils.ensemble.rerank import RerankParams, rerank
from utils.errors import run_cli
from utils.faces.cascade import clahe_grey, grey3, hue_grey, inverted_grey
from utils.faces.views import SKETCH_EYE_FRAC, eye_px, gallery_normalised, low_pass, sketch_view
from utils.logs import console, setup_logging
from utils.runs.metrics import evaluate, relevance_matrix

RESULT = Path(__file__).resolve().parents[1] / "results" / "bench_faces_aids.md"
DEFAULT = [("plain", "plain"), ("plain", "detector"), ("plain", "texture0.05")]  # (query view, gallery view) pairs, fused by zmax


def dodge(crop: np.ndarray, sigma: float) -> np.ndarray:
    """A pencil-like sketch: grey divided by the blurred inverse (colour dodge)."""
    g = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY).astype(np.float32)
    b = cv2.GaussianBlur(255 - g, (0, 0), sigma)
    return cv2.cvtColor(np.clip(g * 255.0 / np.maximum(255.0 - b, 1.0), 0, 255).astype(np.uint8), cv2.COLOR_GRAY2RGB)


def edges(crop: np.ndarray, sigma: float) -> np.ndarray:
    """Dark Laplacian edges on white."""
    g = cv2.GaussianBlur(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY), (0, 0), sigma)
    e = 255 - np.clip(np.abs(cv2.Laplacian(g, cv2.CV_32F, ksize=3)) * 4, 0, 255).astype(np.uint8)
    return cv2.cvtColor(e, cv2.COLOR_GRAY2RGB)


def loose(crop: np.ndarray, size: int) -> np.ndarray:
    """The whole context crop shrunk into the embedder's square (hair and jaw line in view), edges reflected."""
    c = crop.shape[0]
    pad = (c - size) // 2
    small = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
    return grey3(cv2.copyMakeBorder(small, pad, c - size - pad, pad, c - size - pad, cv2.BORDER_REFLECT101))


def aids(eye: float, size: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Every aid, by name, on a stored (colour) context crop; radii in fractions of the inter-eye distance."""
    return {"inverted": inverted_grey, "clahe": clahe_grey, "hue": hue_grey, "sketch": lambda c: sketch_view(c, SKETCH_EYE_FRAC * eye),
            "lowpass0.1": lambda c: low_pass(grey3(c), 0.10 * eye), "lowpass0.2": lambda c: low_pass(grey3(c), 0.20 * eye),
            "dodge": lambda c: dodge(c, 0.15 * eye), "edges": lambda c: edges(c, 0.03 * eye),
            "bilateral": lambda c: grey3(cv2.bilateralFilter(c, 9, 60, 0.1 * eye)), "loose": lambda c: loose(c, size)}


def aid_embeddings(seed: int) -> dict[str, np.ndarray]:
    """The draw's arrays plus every aid's embeddings of the test queries and gallery (``<set>.<aid>``), cached."""
    z = np.load(embed_draw(seed))
    emb = {k: z[k] for k in z.files}
    cfg, task, pipe = face_path(OUT / f"seed{seed}" / "data", OUT / f"seed{seed}" / "runs")
    eye = eye_px(pipe.crop_params.aligner, pipe.crop_params.size_px, pipe.crop_params.margin_px)
    for w in ("test_query", "test_gallery"):
        crops = pipe.stored_crops(getattr(task, w), w.replace("_", " ")).pixels
        for name, aid in aids(eye, pipe.crop_params.size_px).items():
            path = OUT / f"seed{seed}" / "aids" / f"{w}_{name}.npy"
            emb[f"{w}.{name}"] = cached(path, lambda aid=aid, crops=crops, desc=f"{w} ({name})": pipe.embed_pixels(np.stack([aid(p) for p in crops]), desc),
                                        f"{w} ({name})")
    return emb


def pair_matrix(emb: dict[str, np.ndarray], pairs: list[tuple[str, str]]) -> np.ndarray:
    """Each (query view, gallery view) pair's cosine, z-scored per query, the closest kept (zmax over pairs)."""
    side = lambda w, v: emb[f"test_{w}" if v == "plain" else f"test_{w}.{v}"]  # noqa: E731
    return np.stack([row_zscore(side("query", q) @ side("gallery", g).T) for q, g in pairs]).max(0)


def normalised(emb: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Label-free normalisations of the default matrix (whole test gallery)."""
    base = pair_matrix(emb, DEFAULT)
    hub = -np.sort(-base, axis=0)[:10].mean(0)  # each gallery image's mean over its 10 closest queries
    centred = {k: unit(emb[k] - emb[k].mean(0)) for k in ("test_query", "test_gallery", "test_gallery.detector", "test_gallery.texture0.05")}
    return {"default, CSLS gallery hub correction (k 10, half weight)": base - 0.5 * hub[None, :],
            "default, z-score per gallery image": (base - base.mean(0)) / (base.std(0) + 1e-6),
            "default, dual-softmax (t 1)": gallery_normalised({"test": base}, "dual_softmax")[0]["test"],  # the face run's --gallery-norm
            "default, Sinkhorn (t 1)": rerank(row_zscore(base), RerankParams(steps=("sinkhorn",), temperature=1.0)),
            "default views, each side centred on its mean": pair_matrix({**emb, **centred}, DEFAULT)}


def configs() -> dict[str, list[tuple[str, str]]]:
    """Every compared recipe: (query view, gallery view) pairs, fused by zmax."""
    out = {"plain (no views)": [("plain", "plain")], "default: detector + texture0.05": DEFAULT}
    for aid in ("inverted", "clahe", "hue", "sketch", "lowpass0.1", "lowpass0.2", "dodge", "edges", "bilateral"):
        out[f"gallery {aid} alone"] = [("plain", aid)]
    for aid in ("dodge", "bilateral", "lowpass0.1"):
        out[f"query {aid} alone"] = [(aid, "plain")]
        out[f"default + query {aid}"] = DEFAULT + [(aid, g) for _, g in DEFAULT]
    for aid in ("dodge", "lowpass0.1", "loose"):
        out[f"{aid} on both sides"] = [(aid, aid)]
    out["default + hue on every gallery image"] = DEFAULT + [("plain", "hue")]
    out["default + every gallery aid (hue, clahe, lowpass0.1)"] = DEFAULT + [("plain", a) for a in ("hue", "clahe", "lowpass0.1")]
    out["default + loose on both sides"] = DEFAULT + [("loose", "loose")]
    return out


def style_cells(emb: dict[str, np.ndarray], sim: np.ndarray, styles: dict[str, str], truth: dict) -> dict[str, float]:
    q, g = emb["names.test_query"].tolist(), emb["names.test_gallery"].tolist()
    cells = {}
    for style in STYLES:
        cols = [j for j, n in enumerate(g) if styles.get(n) == style]
        cells[style] = evaluate(sim[:, cols], relevance_matrix(q, [g[j] for j in cols], truth))["score"]
    cells["mean"] = float(np.mean([cells[s] for s in STYLES]))
    cells["all"] = evaluate(sim, relevance_matrix(q, g, truth))["score"]
    return cells


def draw(seed: int) -> dict[str, dict[str, float]]:
    emb = aid_embeddings(seed)
    data = OUT / f"seed{seed}" / "data"
    styles = {Path(k).name: v for k, v in json.loads((data / "styles.json").read_text()).items()}
    truth = json.loads((data / "test" / "ground_truth.json").read_text())
    sims = {name: pair_matrix(emb, pairs) for name, pairs in configs().items()} | normalised(emb)
    return {name: style_cells(emb, sim, styles, truth) for name, sim in sims.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="data draws (default: %(default)s)")
    args = parser.parse_args(argv)
    setup_logging()
    torch.set_num_threads(2)
    results = [draw(s) for s in args.seeds]
    cols = [*STYLES, "mean", "all"]
    rows = [[name, *[f"{np.mean([r[name][c] for r in results]):.1f}" for c in cols]] for name in results[0]]
    table, lines = md_table(f"Score per gallery style (test gallery cut to the style), mean over draws {', '.join(map(str, args.seeds))}; "
                            "'mean' averages the five styles, 'all' is the whole test gallery",
                            ["recipe (query view, gallery views; zmax)", *STYLES, "mean over styles", "whole gallery"], rows)
    console.print(table)
    write_results(RESULT, "\n".join(["## Reading aids and normalisations beyond the default gallery views", "",
                                     "dlib, default TTA; the draws and face cache of bench_faces_loso.py.", "", *lines]))
    return 0


if __name__ == "__main__":
    run_cli(main)
