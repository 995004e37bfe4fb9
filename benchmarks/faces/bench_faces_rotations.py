"""Which cascade stages should search rotated copies: faces gained against false faces.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/faces/bench_faces_rotations.py                  # seeds 0 to 14
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/faces/bench_faces_rotations.py --seeds 0 1 2

The upright default cascade (``--detector-rotations`` given alone) runs on each draw's 280
synthetic images (bench_faces_seeds.py's data) and on the 240 face-free PACS images. On the
images it misses, every MTCNN stage of the default cascade then searches each angle alone.
Since a rotated search runs only where the upright cascade found nothing, the faces a set of
stages and angles adds is the union of their hits; the table counts them per set, with the
false faces the same set adds on the face-free images. The default
(``DEFAULT_ROTATED_STAGES`` at ``DEFAULT_ROTATIONS``) was chosen from this table.
Writes benchmarks/results/bench_faces_rotations.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from benchmarks.common import ROOT, write_results
from benchmarks.faces.bench_faces_hard import md_table
from benchmarks.faces.bench_faces_seeds import seed_data
from benchmarks.faces.face_data import face_free_images
from utils.data.images import load_image
from utils.errors import run_cli
from utils.faces.cascade import (
    DEFAULT_ROTATED_STAGES,
    DEFAULT_ROTATIONS,
    DEFAULT_STAGES,
    MTCNN_STAGES,
    CascadeParams,
    FaceCascade,
)
from utils.logs import console, setup_logging

RESULT = ROOT / "benchmarks" / "results" / "bench_faces_rotations.md"
ANGLES = (-15.0, 15.0, -30.0, 30.0, -45.0, 45.0)
ROTATABLE = tuple(s for s in DEFAULT_STAGES if s in MTCNN_STAGES)


def hits_per_stage_angle(paths: list[Path]) -> tuple[int, dict[tuple[str, float], set[int]]]:
    """Faces the upright default cascade finds in ``paths``, and per (stage, angle) the images
    it missed that the stage finds at that angle alone."""
    cascade = FaceCascade(CascadeParams(stage_rotations=()), torch.device("cpu"))
    faces = cascade.detect(paths, workers=0, desc=f"upright, {len(paths)} images")
    missed = np.flatnonzero(faces.stage < 0)
    images = [np.ascontiguousarray(np.asarray(load_image(paths[i]))) for i in missed]
    hits = {}
    for stage in ROTATABLE:
        for angle in ANGLES:
            found = cascade.run_stage(stage, images, angles=(angle,))
            hits[(stage, angle)] = {int(i) for i, h in zip(missed, found) if h is not None and h[3]}
    return int((faces.stage >= 0).sum()), hits


def added(hits: dict[tuple[str, float], set[int]], stages: Sequence[str], angles: Sequence[float]) -> int:
    return len(set().union(*(hits[(s, a)] for s in stages for a in angles)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(15)), help="data draws (default: 0 to 14)")
    args = parser.parse_args(argv)
    setup_logging()
    torch.set_num_threads(2)
    draws = []
    for seed in args.seeds:
        data = seed_data(seed)
        paths = [data / rel for rel in sorted(json.loads((data / "styles.json").read_text()))]
        draws.append((len(paths), *hits_per_stage_angle(paths)))
    free = face_free_images(10)
    free_upright, free_hits = hits_per_stage_angle(free)
    n_total, upright_total = sum(n for n, _, _ in draws), sum(u for _, u, _ in draws)
    sets = [(s,) for s in ROTATABLE] + [DEFAULT_ROTATED_STAGES, ROTATABLE]
    rows = [["none (upright)", "-", "0.00", f"{upright_total / n_total:.1%}", f"{free_upright} / {len(free)}"]]
    for stages in sets:
        for angles in (DEFAULT_ROTATIONS, ANGLES):
            gain = sum(added(h, stages, angles) for _, _, h in draws)
            false = free_upright + added(free_hits, stages, angles)
            default = " (default)" if tuple(stages) == DEFAULT_ROTATED_STAGES and tuple(angles) == DEFAULT_ROTATIONS else ""
            rows.append([" ".join(stages) + default, " ".join(f"{a:+g}" for a in angles), f"{gain / len(draws):.2f}",
                         f"{(upright_total + gain) / n_total:.1%}", f"{false} / {len(free)} ({false / len(free):.1%})"])
    table, lines = md_table(f"Rotation search per stage set: {len(draws)} draws of 280 synthetic images, 240 face-free PACS images",
                            ["stages that search rotated copies", "angles", "faces added per draw", "faces found (all draws)",
                             "false faces"], rows)
    console.print(table)
    lines += ["Command: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/faces/bench_faces_rotations.py --seeds "
              + " ".join(map(str, args.seeds)) + "`", ""]
    write_results(RESULT, "\n".join(lines))
    return 0


if __name__ == "__main__":
    run_cli(main)
