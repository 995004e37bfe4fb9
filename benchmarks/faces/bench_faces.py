"""Benchmark of the face path (infer_facenet.py) on a cross-domain set made from real faces.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/faces/bench_faces.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/faces/bench_faces.py --facenet-weights /path/to/20180402-114759-vggface2.pt

Builds benchmarks/out/faces/data from ../shared/data/orl_faces in the
competition layout: 40 people x 10 grey photos (upscaled 2x); for each person
3 photos stay photos (queries; domain ``real``) and the other 7 are turned into
other styles (pencil sketch, stylisation, colour map, cartoon, detail-enhanced
sepia, posterised print, oil-like smoothing with a cold cast) and reframed
(rotated up to 12 degrees, zoomed 0.85-1.2x, shifted, half of them mirrored),
as generated images are (domain ``synthetic``: the gallery). 16 people are training identities (the
validation split holds out half of them), 24 are test identities; test file
names hide the identity and test/ground_truth.json scores them.

Then it runs infer_facenet.main() for: dlib on the centre square without
detection or TTA (the plain reference), dlib with MTCNN + dlib alignment
without TTA, the same with all TTA views, dlib with the default recipe
(``--embedder dlib`` and no other flag), FaceNet (random weights unless
--facenet-weights: the floor), and ensemble.py on dlib + FaceNet (z-score per
query, the FaceNet weight searched on the validation split). Runs stay in
benchmarks/out/faces/runs/ for the ensemble benchmark. It also times
detection and embedding, batched vs one image at a time, on the same images.
Results: a rich table, also written to benchmarks/results/faces.md.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from rich.table import Table

import ensemble
import infer_facenet
from benchmarks.common import ROOT, write_results
from benchmarks.faces.face_data import orl_people, write_orl_layout
from utils.embedding.embed import embed_arrays
from utils.embedding.views import tta_views
from utils.errors import KitError, run_cli
from utils.faces.crop import CropParams, face_crops
from utils.faces.detect import DetectorParams, FaceDetector
from utils.faces.embedder import build_embedder
from utils.logs import console, setup_logging

OUT = ROOT / "benchmarks" / "out" / "faces"
RESULT = ROOT / "benchmarks" / "results" / "faces.md"
N_TRAIN_PEOPLE = 16
ALL_TTA = ["flip", "rot", "brightness", "scale"]


# ---------------------------------------------------------------- styles (RGB uint8 in, RGB uint8 out)
def pencil(img: np.ndarray) -> np.ndarray:
    grey, _ = cv2.pencilSketch(img, sigma_s=40, sigma_r=0.08, shade_factor=0.04)
    return cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)


def stylise(img: np.ndarray) -> np.ndarray:
    return cv2.stylization(img, sigma_s=40, sigma_r=0.45)


def colour_map(img: np.ndarray) -> np.ndarray:
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    return cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_OCEAN), cv2.COLOR_BGR2RGB)


def cartoon(img: np.ndarray) -> np.ndarray:
    smooth = img
    for _ in range(4):
        smooth = cv2.bilateralFilter(smooth, 9, 40, 7)
    smooth = (smooth // 40) * 40 + 20
    edges = cv2.adaptiveThreshold(cv2.medianBlur(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), 5), 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, 9, 4)
    return np.where(edges[..., None] > 0, smooth, 0).astype(np.uint8)


def warm_detail(img: np.ndarray) -> np.ndarray:
    out = cv2.detailEnhance(img, sigma_s=10, sigma_r=0.15).astype(np.float32)
    out *= np.array([1.15, 0.95, 0.7], np.float32)  # sepia-like cast
    return out.clip(0, 255).astype(np.uint8)


def oil(img: np.ndarray) -> np.ndarray:
    out = cv2.edgePreservingFilter(img, flags=cv2.RECURS_FILTER, sigma_s=60, sigma_r=0.4)
    tint = np.array([0.8, 1.0, 1.2], np.float32)  # cold cast
    return (out.astype(np.float32) * tint).clip(0, 255).astype(np.uint8)


def print_poster(img: np.ndarray) -> np.ndarray:
    hsv = np.zeros_like(img)
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    hsv[..., 0] = 150
    hsv[..., 1] = 120
    hsv[..., 2] = (grey // 64) * 64 + 48
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def reframe(img: np.ndarray, rng: random.Random) -> np.ndarray:
    """Another framing, as a generated image has: rotated, zoomed, shifted, maybe mirrored."""
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-12, 12), rng.uniform(0.85, 1.2))
    m[:, 2] += (rng.uniform(-0.06, 0.06) * w, rng.uniform(-0.06, 0.06) * h)
    out = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
    return out[:, ::-1].copy() if rng.random() < 0.5 else out


STYLES = {"pencil": pencil, "stylise": stylise, "colour_map": colour_map, "cartoon": cartoon, "warm_detail": warm_detail, "oil": oil, "poster": print_poster}


# ---------------------------------------------------------------- the data set
def build_dataset(out: Path, seed: int = 0) -> Path:
    """Write the competition-layout face set to ``out`` (replaced if present)."""
    people = orl_people()  # ../shared/data/orl_faces, or one line saying it is missing
    if out.exists():
        shutil.rmtree(out)
    rng = random.Random(seed)
    rng.shuffle(people)
    write_orl_layout(out, people, N_TRAIN_PEOPLE, list(STYLES), lambda img, style, r: STYLES[style](reframe(img, r)), rng)
    return out


# ---------------------------------------------------------------- fusion
def fuse(runs: Path, names: list[str], data: Path, out: Path) -> tuple[dict, list[float]]:
    """ensemble.py on the named runs (z-score fusion, weights searched on validation); its test metrics and weights."""
    if ensemble.main(["--runs", str(runs), "--models", *names, "--data", str(data), "--out", str(out)]) != 0:
        raise KitError(f"ensemble.py failed on {names}")
    meta = json.loads((out / "meta.json").read_text())
    return meta["metrics"]["test"], meta["choice"]["weights"]


# ---------------------------------------------------------------- speed
def images_per_s(batched, single, n: int, repeats: int = 3) -> tuple[float, float]:
    """Images/s of two ways of doing the same work: one warm-up call each, then
    ``repeats`` interleaved timed calls, best of each (the machine is shared)."""
    batched()
    single()
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate((batched, single)):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return n / best[0], n / best[1]


def speed(data: Path, facenet_weights: str, n_images: int) -> list[tuple[str, float, float]]:
    """Detection and embedding throughput, batched vs one at a time, on the same images."""
    cpu = torch.device("cpu")
    paths = sorted((data / "test" / "gallery").iterdir())[:n_images]
    det = FaceDetector(DetectorParams(), cpu)
    rows = []
    rows.append(("MTCNN detection (letterbox 320 px, incl. loading)", *images_per_s(
        lambda: det.detect(paths, batch_size=32, workers=0), lambda: det.detect(paths, batch_size=1, workers=0), len(paths))))
    for name, weights in (("dlib", "default"), ("facenet", facenet_weights)):
        emb = build_embedder(name, weights, cpu)
        crops = face_crops(paths, det, CropParams(size_px=emb.input_px, aligner=emb.aligner), workers=0).pixels
        views = tta_views([])
        rows.append((f"{name} embedding (1 view)", *images_per_s(
            lambda: embed_arrays(emb, crops, views, device=cpu, out_px=emb.input_px, batch_size=32),  # noqa: B023
            lambda: embed_arrays(emb, crops, views, device=cpu, out_px=emb.input_px, batch_size=1),  # noqa: B023
            len(paths))))
    return rows


# ---------------------------------------------------------------- main
def run_model(data: Path, runs: Path, name: str, args: list[str]) -> dict:
    infer_facenet.main(["--data", str(data), "--runs", str(runs), "--run-name", name, "--val-fraction", "0.5", "--workers", "0", *args])
    meta = json.loads((runs / name / "meta.json").read_text())
    return meta


def tables(data: Path, args, rows: dict, faces: dict, seconds: dict, speed_rows: list) -> list[str]:
    """Print the score and throughput tables; return them as the results file's markdown lines."""
    n_q = len(json.loads((data / "test" / "ground_truth.json").read_text()))
    n_g = len(list((data / "test" / "gallery").iterdir()))
    title = f"Face path on ORL cross-domain ({n_q} photo queries x {n_g} stylised gallery, 24 test people)"
    table = Table(title=title)
    for col in ("model", "test score", "top1", "top5", "top10", "mAP@All", "val score", "no face", "time s"):
        table.add_column(col, justify="left" if col == "model" else "right")
    md = [f"## {title}", "", "| model | test score | top1 | top5 | top10 | mAP@All | val score | no face | time s |", "|---|---|---|---|---|---|---|---|---|"]
    for label, m in rows.items():
        nf = f"{faces[label][0]}/{faces[label][1]}" if label in faces else "-"
        sec = f"{seconds[label]:.0f}" if label in seconds else "-"
        val = f"{m['val_score']:.2f}" if "val_score" in m else "-"
        cells = [label, f"{m['score']:.2f}", f"{m['top1']:.3f}", f"{m['top5']:.3f}", f"{m['top10']:.3f}", f"{m['map_all']:.3f}", val, nf, sec]
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    speed_table = Table(title="Throughput on the same images (CPU, 2 threads), images/s")
    for col in ("stage", "batched", "one at a time", "speed-up"):
        speed_table.add_column(col, justify="left" if col == "stage" else "right")
    md += ["", f"### Throughput on the same {args.speed_images} gallery images (CPU, 2 threads, shared machine: best of 3 interleaved runs), images/s", "",
           "| stage | batched | one at a time | speed-up |", "|---|---|---|---|"]
    for stage, batched, single in speed_rows:
        cells = [stage, f"{batched:.1f}", f"{single:.1f}", f"{batched / single:.2f}x"]
        speed_table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    console.print(table)
    console.print(speed_table)
    md += ["", "Rows: *dlib centre square*: no detection, the centre square of each image, no TTA (the plain reference); "
           "*dlib aligned (MTCNN)*: MTCNN box -> dlib 5-point landmarks -> dlib chip; *default recipe*: infer_facenet.py's defaults; *TTA x8*: identity, flip, rotation +-8 deg, "
           "brightness x0.8/x1.2, zoom x1.1/x0.9 on query and gallery; *FaceNet*: InceptionResnetV1, MTCNN box + 20 px margin, eyes levelled; "
           "*ensemble.py*: per-query z-scores, (1-w) dlib TTA + w FaceNet, w searched on the validation split (bootstrap mean). "
           "*no face*: images where MTCNN found none (centre-square fallback), of all val+test images. Detection timings include image loading.",
           "", "Command: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/faces/bench_faces.py" + (f" --facenet-weights {args.facenet_weights}`" if args.facenet_weights != "none" else "`"), ""]
    return md


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facenet-weights", default="none", metavar="PATH", help="FaceNet weights: none (the floor), vggface2 or a state dict file (default: %(default)s)")
    parser.add_argument("--speed-images", type=int, default=64, help="images timed for the speed table (default: %(default)s)")
    args = parser.parse_args(argv)
    setup_logging()
    torch.set_num_threads(2)
    data = build_dataset(OUT / "data")
    runs = OUT / "runs"
    if runs.exists():
        shutil.rmtree(runs)
    fn_name = "facenet_random" if args.facenet_weights == "none" else "facenet"
    plan = [  # run name, table label, flags
        ("dlib_center", "dlib centre square (reference)", ["--embedder", "dlib", "--detector", "none", "--tta"]),
        ("dlib_notta", "dlib aligned (MTCNN)", ["--embedder", "dlib", "--detector", "mtcnn", "--tta"]),
        ("dlib", "dlib aligned (MTCNN) + TTA x8", ["--embedder", "dlib", "--detector", "mtcnn", "--tta", *ALL_TTA]),
        ("dlib_default", "dlib, the default recipe (--embedder dlib, no other flag)", ["--embedder", "dlib"]),
        (fn_name, f"FaceNet {args.facenet_weights} + flip", ["--embedder", "facenet", "--weights", args.facenet_weights, "--tta", "flip"]),
    ]
    rows, seconds, faces = {}, {}, {}
    for name, label, extra in plan:
        t = time.time()
        meta = run_model(data, runs, name, extra)
        seconds[label] = time.time() - t
        rows[label] = meta["metrics"]["test"]
        rows[label]["val_score"] = meta["metrics"]["val"]["score"]
        faces[label] = sum(f["fallback"] for f in meta["faces"].values()), sum(f["images"] for f in meta["faces"].values())
    fused, weights = fuse(runs, ["dlib", fn_name], data, OUT / "fusion")
    fusion_label = f"ensemble.py: dlib TTA + FaceNet (w={weights[1]:.2f})"
    rows[fusion_label] = fused
    speed_rows = speed(data, args.facenet_weights, args.speed_images)

    md = tables(data, args, rows, faces, seconds, speed_rows)
    write_results(RESULT, "\n".join(md))
    console.print(f"runs in {runs.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
