"""Leave-one-style-out on the hard face benchmark: the recipe's options chosen without a style, scored on it.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python benchmarks/faces/bench_faces_loso.py --seeds 0 1 2 3 4
    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python benchmarks/faces/bench_faces_loso.py --seeds 0 1 2 3 4 --phase embed   # arrays only
    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python benchmarks/faces/bench_faces_loso.py --seeds 0 1 2 3 4 --phase study   # draws with arrays

Per draw of benchmarks/faces/face_data.py (seed = draw), in turn (``all``; the results file is rewritten
after every draw, so a run cut short reports the draws it finished):

1. arrays (slow; ``embed``): the default recipe ``infer_facenet.py --embedder dlib`` (gallery views
   detector + texture0.05), then the training images through the same face path; the plain and view
   embeddings of every set, the training embeddings, identities, styles and sides saved to
   ``seed<k>/arrays.npz`` (made once; the face cache under ``seed<k>/runs/face_cache`` keeps the
   crops and embeddings too);
2. study (minutes; ``study`` runs it on the draws whose arrays exist): for each held-out style S of
   the five, adapters are trained without S (its training images dropped, its validation gallery
   images out of the adapter's epoch choice), alone (``on``) and with 2 or 4 rendered pairs per real
   training photo from utils/faces/styles.py's library, dropping every render that composed S;
   every option (adapter off or a variant x view set x fusion rule x re-ranking: none or ensemble.py's
   dual-softmax on the whole test matrix) is scored on the test gallery cut
   to each style (``seed<k>/study.json``).

Report: for each S, the option with the best mean score over the other styles (every draw) is
chosen and scored on S: per style and the mean over styles, mean ± standard error over draws, beside
the default recipe and the plain view; the adapter variants' held-out scores; wall times.
Results: benchmarks/results/bench_faces_loso.md.
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

import infer_facenet
import train_face_adapter
from benchmarks.common import ROOT, write_results
from benchmarks.faces.bench_faces_hard import md_table
from benchmarks.faces.face_data import build_hard_dataset
from benchmarks.faces.face_styles import STYLES
from utils.atomic import atomic_write_json
from utils.cache import cached
from utils.config import config_from_args
from utils.data.task import prepare_task
from utils.embedding.step import SETS, embed_task
from utils.errors import run_cli
from utils.faces.pipeline import FacePipeline
from utils.faces.styles import TRAIN_STYLES, StyleLibrary
from utils.faces.views import FUSION_RULES, fuse, gallery_normalised
from utils.logs import console, setup_logging
from utils.runs.metrics import evaluate, relevance_matrix

OUT = ROOT / "benchmarks" / "out" / "faces_loso"
RESULT = ROOT / "benchmarks" / "results" / "bench_faces_loso.md"
FLAGS = ["--val-fraction", "0.5", "--embedder", "dlib", "--workers", "0", "--view-fusion", "zmax"]  # the rule is the study's: no harder validation here
VIEW_SETS = {"plain": (), "detector": ("detector",), "texture": ("texture0.05",), "detector + texture": ("detector", "texture0.05")}
ADAPTERS = ("off", "on", "rendered2", "rendered4")  # renderedN: the adapter with N rendered pairs per real training photo
N_RENDERS = 4
# the face run's --gallery-norm on the whole test matrix (before the cut to a style); none first (ties keep it)
RERANKS = ("none", "dual_softmax")
DEFAULT = ("off", "detector + texture", "zmax", "dual_softmax")  # the face run's default recipe (infer_facenet.py --gallery-norm dual_softmax)


def draw_data(seed: int) -> Path:
    """The draw's data, built once (a rebuild would change every file's mtime, and so every cache key)."""
    data = OUT / f"seed{seed}" / "data"
    if not (data / "styles.json").is_file():
        build_hard_dataset(data, seed=seed)
    return data


def face_path(data: Path, runs: Path):
    """The default run's config, task and face pipeline (the face cache of ``runs``)."""
    cfg = config_from_args(infer_facenet.Config, infer_facenet.build_parser().parse_args(["--data", str(data), "--runs", str(runs), *FLAGS]))
    task = prepare_task(cfg.data, cfg.runs, cfg.split_params())
    return cfg, task, FacePipeline(cfg, torch.device("cpu"), cfg.runs / "face_cache")


def embed_draw(seed: int) -> Path:
    """Every array the study needs for one draw, in ``seed<k>/arrays.npz`` (made once); returns its path."""
    out = OUT / f"seed{seed}" / "arrays.npz"
    if out.is_file():
        return out
    data, runs = draw_data(seed), OUT / f"seed{seed}" / "runs"
    t0 = time.time()
    if not (runs / "dlib" / "meta.json").is_file():
        infer_facenet.main(["--data", str(data), "--runs", str(runs), *FLAGS])
    t_run = time.time() - t0
    cfg, task, pipe = face_path(data, runs)
    arrays = dict(embed_task(task, pipe.embed_set))
    for w in ("val_gallery", "test_gallery"):
        for name, e in zip(pipe.view_params.names(), pipe.embed_views(getattr(task, w), task.names(w), w.replace("_", " "))):
            arrays[f"{w}.{name}"] = e
    arrays["train"] = pipe.embed_set(task.train_paths, "training images")
    styles = json.loads((data / "styles.json").read_text())
    domains = task.layout.domains
    arrays["train_labels"] = np.asarray(task.train_labels, np.int64)
    arrays["train_style"] = np.array([styles.get(task.layout.rel(p), "real") for p in task.train_paths])
    arrays["train_side"] = np.array([int(domains.get(task.layout.rel(p), "real") != "real") for p in task.train_paths], np.int64)
    for w in SETS:
        arrays[f"names.{w}"] = np.array(task.names(w))
    arrays["seconds"] = np.array([t_run, time.time() - t0])
    cached(out, lambda: arrays, f"seed {seed}: arrays", finite_keys=())  # the kit's cache writer: atomic, .npz for a dict
    console.print(f"seed {seed}: arrays in {time.time() - t0:.0f} s (the default run {t_run:.0f} s)")
    return out


def option_labels() -> list[tuple[str, str, str]]:
    """(view set, rule, re-ranking) of every studied view option."""
    views = [("plain", "plain")] + [(v, r) for v in VIEW_SETS if v != "plain" for r in FUSION_RULES]
    return [(v, r, rr) for v, r in views for rr in RERANKS]


def style_scores(emb: dict[str, np.ndarray], z, truth: dict, test_style: np.ndarray) -> dict[str, dict[str, float]]:
    """Per view option: the test score on the gallery cut to each style, and on the whole gallery ("all")."""
    q, g = z["names.test_query"].tolist(), z["names.test_gallery"].tolist()
    out = {}
    for views, rule, rr in option_labels():
        sim = fuse(emb["test_query"], [emb["test_gallery"], *[emb[f"test_gallery.{v}"] for v in VIEW_SETS[views]]], rule)
        sim = gallery_normalised({"test": sim}, rr)[0]["test"]
        cells = {}
        for style in STYLES:
            cols = np.flatnonzero(test_style == style)
            cells[style] = evaluate(sim[:, cols], relevance_matrix(q, [g[j] for j in cols], truth))["score"]
        cells["all"] = evaluate(sim, relevance_matrix(q, g, truth))["score"]
        out[f"{views}|{rule}|{rr}"] = cells
    return out


def unit(e: np.ndarray) -> np.ndarray:
    return (e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def train_without(seed: int, held_out: str, variant: str, z, rendered, task, val_style: np.ndarray) -> dict[str, np.ndarray]:
    """Every embedding through an adapter trained without ``held_out``: its training images dropped, no render
    that composed it, its validation gallery images out of the adapter's epoch choice."""
    keep = z["train_style"] != held_out
    rows, side, labels = z["train"][keep], z["train_side"][keep], z["train_labels"][keep]
    if variant.startswith("rendered"):
        r_emb, r_src, r_used, r_k = rendered
        ok = (r_k < int(variant[len("rendered"):])) & np.array([held_out not in u for u in r_used])
        rows, side = np.concatenate([rows, r_emb[ok]]), np.concatenate([side, np.ones(int(ok.sum()), np.int64)])
        labels = np.concatenate([labels, z["train_labels"][r_src[ok]]])
    run_dir = OUT / f"seed{seed}" / "adapters" / f"{held_out}_{variant}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = config_from_args(train_face_adapter.Config, train_face_adapter.build_parser().parse_args(
        ["--data", str(OUT / f"seed{seed}" / "data"), "--runs", str(run_dir.parent), "--val-fraction", "0.5", "--seed", str(seed)]))
    cols = np.flatnonzero(val_style != held_out)
    rel = relevance_matrix(z["names.val_query"].tolist(), z["names.val_gallery"][cols].tolist(), task.relevant("val"))
    metric = lambda e: train_face_adapter.rank_key(evaluate(e["val_query"] @ e["val_gallery"][cols].T, rel))  # noqa: E731
    emb = {k: z[k] for k in z.files if k.startswith(("val_", "test_"))}
    adapted = lambda a: {w: a.apply_np(emb[w]) for w in ("val_query", "val_gallery")}  # noqa: E731
    adapter, _ = train_face_adapter.train_adapter(cfg, task, run_dir, (rows.astype(np.float32), side, labels), adapted, metric,
                                                  f"loso|{seed}|{held_out}|{variant}")
    return {k: unit(adapter.apply_np(e)) for k, e in emb.items()}


def draw_study(seed: int) -> dict:
    """Per held-out style, adapter variant and view option: the test score per style (cached in ``seed<k>/study.json``)."""
    out = OUT / f"seed{seed}" / "study.json"
    if out.is_file():
        return json.loads(out.read_text())
    z = np.load(embed_draw(seed))
    t0 = time.time()  # the study alone (the arrays have their own seconds)
    data, runs = OUT / f"seed{seed}" / "data", OUT / f"seed{seed}" / "runs"
    cfg, task, pipe = face_path(data, runs)
    styles = {Path(k).name: v for k, v in json.loads((data / "styles.json").read_text()).items()}
    test_style = np.array([styles.get(n, "real") for n in z["names.test_gallery"].tolist()])
    val_style = np.array([styles.get(Path(task.layout.rel(p)).name, "real") for p in task.val_gallery])
    truth = json.loads((data / "test" / "ground_truth.json").read_text())
    real = np.flatnonzero(z["train_side"] == 0)
    r_emb, r_src, r_used, _ = pipe.embed_rendered(task.train_paths, real, StyleLibrary(), N_RENDERS, seed, "training images")
    rendered = (r_emb, r_src, r_used, np.tile(np.arange(N_RENDERS), len(real)))
    plain = {k: z[k] for k in z.files if k.startswith(("val_", "test_"))}
    result = {"off": style_scores(plain, z, truth, test_style)}
    for held_out in STYLES:
        for variant in ADAPTERS[1:]:
            result[f"{held_out}|{variant}"] = style_scores(train_without(seed, held_out, variant, z, rendered, task, val_style), z, truth, test_style)
    result["seconds"] = {"embed": z["seconds"].tolist(), "study": time.time() - t0}
    atomic_write_json(out, result)  # a per-draw intermediate, not a results file
    console.print(f"seed {seed}: study in {time.time() - t0:.0f} s")
    return result


def score_of(result: dict, held_out: str, option: tuple[str, str, str, str], style: str) -> float:
    """The test score on ``style`` of (adapter variant, view set, rule, re-ranking) in the world without ``held_out``."""
    variant, views, rule, rr = option
    return result["off" if variant == "off" else f"{held_out}|{variant}"][f"{views}|{rule}|{rr}"][style]


def mean_se(values: list[float]) -> str:
    v = np.asarray(values, float)
    return f"{v.mean():.1f} ± {v.std(ddof=1) / np.sqrt(len(v)):.1f}" if len(v) > 1 else f"{v.mean():.1f}"


def loso_rows(results: list[dict]) -> tuple[list[list[str]], dict[str, list[float]]]:
    """Per held-out style: the option with the best mean over the other styles (every draw), its held-out score."""
    options = [(a, v, r, rr) for a in ADAPTERS for v, r, rr in option_labels()]
    rows, per_draw = [], {"chosen": [], "default": [], "plain": [], "whole": []}
    for style in STYLES:
        others = [o for o in STYLES if o != style]
        best = max(options, key=lambda o: (np.mean([score_of(res, style, o, x) for res in results for x in others]), o == DEFAULT))
        got = {k: [score_of(res, style, o, style) for res in results]
               for k, o in (("chosen", best), ("default", DEFAULT), ("plain", ("off", "plain", "plain", "none")))}
        for k, v in got.items():
            per_draw[k].append(v)
        whole = [score_of(res, style, best, "all") for res in results]
        per_draw["whole"].append(whole)
        rows.append([style, f"adapter {best[0]}, {best[1]}, {best[2]}, {best[3]}", f"{np.mean([score_of(res, style, best, x) for res in results for x in others]):.1f}",
                     mean_se(got["chosen"]), f"{min(got['chosen']):.1f}", mean_se(got["default"]), mean_se(got["plain"]), mean_se(whole)])
    means = {k: np.mean(np.asarray(v), axis=0).tolist() for k, v in per_draw.items()}  # per draw: the mean over held-out styles
    rows.append(["**mean**", "", "", mean_se(means["chosen"]), "", mean_se(means["default"]), mean_se(means["plain"]), mean_se(means["whole"])])
    return rows, means


def variant_rows(results: list[dict]) -> list[list[str]]:
    """Held-out score per adapter variant (each style scored in the world without it), for the default views and plain."""
    rows = []
    for views, rule, rr in (("plain", "plain", "none"), ("detector + texture", "zmax", "none"), ("detector + texture", "zmax", "dual_softmax"),
                            ("texture", "zmax", "none")):
        for variant in ADAPTERS:
            per_style = [[score_of(res, s, (variant, views, rule, rr), s) for res in results] for s in STYLES]
            rows.append([f"{views}, {rule}, {rr}", variant, *[f"{np.mean(v):.1f}" for v in per_style],
                         mean_se(np.mean(per_style, axis=0).tolist()),
                         mean_se([np.mean([score_of(res, s, (variant, views, rule, rr), "all") for s in STYLES]) for res in results])])
    return rows


def study_main(seeds: Sequence[int]) -> None:
    results = [draw_study(seed) for seed in seeds]
    rows, means = loso_rows(results)
    tables = [md_table(f"Leave one style out over {len(seeds)} draws (seeds {', '.join(map(str, seeds))}): per held-out style, the option "
                       "(adapter, views, rule) with the best mean over the other styles (every draw), scored on the held-out style; mean ± standard error over draws",
                       ["held-out style", "chosen without it", "mean over the others", "held-out score", "worst draw",
                        "face run default (adapter off, detector + texture, zmax, dual_softmax)", "plain (no views, no adapter, none)",
                        "chosen option, whole test gallery"], rows),
              md_table("Per draw: the mean over held-out styles of the chosen options' held-out scores",
                       ["seed", "LOSO mean (chosen)", "default recipe", "plain"],
                       [[str(seed), f"{c:.1f}", f"{d:.1f}", f"{p:.1f}"] for seed, c, d, p in zip(seeds, means["chosen"], means["default"], means["plain"])]),
              md_table("Held-out score per adapter variant (each style scored by an adapter trained without it; renders never composed it)",
                       ["views, rule, re-ranking", "adapter", *STYLES, "mean over styles", "whole test gallery"], variant_rows(results))]
    secs = [[str(seed), f"{r['seconds']['embed'][0]:.0f}", f"{r['seconds']['embed'][1]:.0f}", f"{r['seconds']['study']:.0f}"] for seed, r in zip(seeds, results)]
    tables.append(md_table("Wall time per draw, seconds, of the invocation that made it (shared 2-core machine, nice -n 10; a draw whose "
                           "default run and face cache exist reuses them: its seconds are then the cache's)", ["seed", "default run", "arrays (run + training images)", "study"], secs))
    md = ["## Leave one style out on the hard face benchmark", "",
          f"Style library (utils/faces/styles.py) of the rendered pairs: {len(TRAIN_STYLES)} styles, {N_RENDERS} renders per real training photo; "
          "for a held-out style, the renders that composed it are dropped (the benchmark's five styles are the kit's own renderers).", "",
          "The held-out score is the competition score of the 60 test queries against the test gallery cut to the held-out style "
          "(about 28 images, one or two of each person: a harder scale than the whole gallery's, where one easy style suffices); "
          "the last column scores the chosen option (its adapter trained without the style) on the whole test gallery.", ""]
    for table, lines in tables:
        console.print(table)
        md += lines
    write_results(RESULT, "\n".join(md))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="data draws (default: %(default)s)")
    parser.add_argument("--phase", choices=["embed", "study", "all"], default="all")
    args = parser.parse_args(argv)
    setup_logging()
    torch.set_num_threads(2)
    if args.phase == "embed":
        for seed in args.seeds:
            embed_draw(seed)
        return 0
    for k, seed in enumerate(args.seeds):  # the results file is rewritten after every draw: a cut-short run leaves the draws it finished
        if args.phase == "all" or (OUT / f"seed{seed}" / "arrays.npz").is_file():
            draw_study(seed)
        done = [s for s in args.seeds[: k + 1] if (OUT / f"seed{s}" / "study.json").is_file()]
        if done:
            study_main(done)
    return 0


if __name__ == "__main__":
    run_cli(main)
