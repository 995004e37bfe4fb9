"""Run folders written as model scripts leave them (save_run), with known right answers, for the
tests of ensemble.py, submit.py, visualize.py and the run checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from utils.data.layout import load_layout
from utils.runs.data_fingerprint import layout_fingerprint, split_fingerprint
from utils.runs.metrics import relevance_matrix
from utils.runs.similarity_io import SimMatrix, save_run


def make_run(data: Path, runs: Path, perfect: bool = True) -> Path:
    """A run on ``data``'s test names whose test matrix puts each query's right answer first (or a random one)."""
    layout = load_layout(data)
    q = [p.name for p in layout.query]
    g = [p.name for p in layout.gallery]
    sim = np.random.default_rng(0).uniform(0, 0.5, (len(q), len(g))).astype(np.float32)
    if perfect:
        for i, name in enumerate(q):
            for right in layout.ground_truth[name]:
                sim[i, g.index(right)] = 1.0
    m = SimMatrix(sim, q, g)
    fp = layout_fingerprint(layout)  # the images it was made from, as run_meta records them
    return save_run(runs / "model", {"val": m, "test": m}, {"model": "model", "data_fingerprint": {"val": fp, "test": fp}})


def write_runs(root: Path, n_id: int = 12, models=(("a", 1.5), ("b", 1.0)), seed: int = 0) -> tuple[Path, Path]:
    """Run folders as model scripts write them: val names train/<identity>/<img>, test basenames;
    each model's matrices are ``strength`` x relevance + noise. Returns (runs, data with ground truth)."""
    rng = np.random.default_rng(seed)
    vq = [f"train/id{i:02d}/real_{k}.jpg" for i in range(n_id) for k in range(2)]
    vg = [f"train/id{i:02d}/synth_{k}.png" for i in range(n_id) for k in range(2)]
    tq = [f"q{i:03d}.jpg" for i in range(2 * n_id)]
    tg = [f"g{i:03d}.png" for i in range(2 * n_id)]
    truth = {q: [tg[2 * (j // 2)], tg[2 * (j // 2) + 1]] for j, q in enumerate(tq)}
    val_rel = np.repeat(np.repeat(np.eye(n_id, dtype=bool), 2, axis=0), 2, axis=1)
    test_rel = relevance_matrix(tq, tg, truth)
    for name, strength in models:
        sims = {}
        for split, (q, g, rel) in {"val": (vq, vg, val_rel), "test": (tq, tg, test_rel)}.items():
            sims[split] = SimMatrix((strength * rel + rng.standard_normal(rel.shape)).astype(np.float32), q, g)
        save_run(root / "runs" / name, sims, {"model": name})
    data = root / "data"
    (data / "test").mkdir(parents=True)
    (data / "test" / "ground_truth.json").write_text(json.dumps(truth))
    return root / "runs", data


def handmade_run(data: Path, runs: Path) -> tuple[Path, list[str], list[str]]:
    """val: query train/A/x against A's and B's images, A's second image at rank 2, B's first at rank 1;
    test: each query's right answer at rank 3 behind two wrong ones. Returns (run folder, val queries, test queries)."""
    layout = load_layout(data)
    ids = sorted(layout.train)[:3]
    imgs = {i: [layout.rel(p) for p in layout.train[i]] for i in ids}
    val_q = [imgs[ids[0]][0], imgs[ids[1]][0]]
    val_g = imgs[ids[0]][1:] + imgs[ids[1]][1:] + imgs[ids[2]]
    val = np.zeros((len(val_q), len(val_g)), dtype=np.float32)
    a_right = val_g.index(imgs[ids[0]][1])
    b_wrong = val_g.index(imgs[ids[1]][1])
    val[0, b_wrong], val[0, a_right] = 0.9, 0.8  # query 0: wrong at rank 1, right at rank 2
    val[1, val_g.index(imgs[ids[1]][1])] = 0.9  # query 1: right at rank 1

    q = [p.name for p in layout.query]
    g = [p.name for p in layout.gallery]
    test = np.random.default_rng(0).uniform(0, 0.5, (len(q), len(g))).astype(np.float32)
    for i, name in enumerate(q):
        right = [g.index(r) for r in layout.ground_truth[name]]
        test[i, right] = 0.0
        test[i, right[0]] = 0.9
        wrong = [j for j in range(len(g)) if j not in right][:2]
        test[i, wrong] = [0.99, 0.95]
    fp = {"val": split_fingerprint([data / n for n in val_q], [data / n for n in val_g], val_q, val_g),
          "test": layout_fingerprint(layout)}  # the images it was made from, as run_meta records them
    run = save_run(runs / "handmade", {"val": SimMatrix(val, val_q, val_g), "test": SimMatrix(test, q, g)},
                   {"model": "handmade", "config": {"data": str(data)}, "data_fingerprint": fp})
    return run, val_q, q
