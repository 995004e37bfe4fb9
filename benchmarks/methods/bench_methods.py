"""Every retrieval method that runs offline, on PACS, per query->gallery domain pair, in the
layout of the caption-matching paper's Table I (rows: methods; columns: domain pairs).

    .venv/bin/python benchmarks/methods/bench_methods.py                  # 2-6 min on 2 shared CPU cores
    .venv/bin/python benchmarks/methods/bench_methods.py --methods clip_img2img caption_labels
    .venv/bin/python benchmarks/methods/bench_methods.py --pairs sketch --per-class 10   # a quick look

For each gallery domain (art_painting, cartoon, sketch) it builds a
competition-layout dataset from /work/shared/data/pacs_mini under
benchmarks/out/methods/<domain>/data: every class is an identity; per class,
the first --per-class photos become test queries and the first --per-class
images of the gallery domain the test gallery (names hashed, with
test/ground_truth.json), and the remaining photos and gallery-domain images
go to train/<class>/ with a domains.csv (query domain ``photo``). Each method
runs through its script's main() into benchmarks/out/methods/<domain>/runs
(one split.json per pair); the benchmark then reads each test matrix and
scores P@1, P@5, P@15 and mAP@All (relevant = same class), and the
competition score.

No pretrained weights can be had offline, so every model here starts from
random weights (marked "random" in the table): the rows show the methods run
end to end and what the floor is, not what they reach with BLIP-2 and CLIP
weights. With weights at hand, pass --clip-model/--clip-weights (--clip-file-tag) and --timm-model
with --timm-weights (and --captioner for a captions row) to rerun the same table.

To add a method: write a function ``run_x(ctx: Context, run_name: str) -> None``
that calls a script's main() with ``ctx.common(run_name)`` and add a
:class:`Method` to :data:`METHODS`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from rich.table import Table

import infer_caption_match
import infer_clip_colour
import infer_cnn_features
import train_clip_arcface
import train_resnet
from benchmarks.common import ROOT, write_results
from utils.atomic import atomic_write_json
from utils.errors import KitError, run_cli
from utils.logs import console, setup_logging
from utils.runs.metrics import average_precision, precision_at_k, relevance_matrix, topk_scores
from utils.runs.similarity_io import load_run

QUERY_DOMAIN = "photo"
GALLERY_DOMAINS = ("art_painting", "cartoon", "sketch")
METRICS = (("p@1", "P@1"), ("p@5", "P@5"), ("p@15", "P@15"), ("map_all", "mAP@All"))
# a small CLIP with both towers: 64 px ViT, 4 blocks of width 128; the text tower needs CLIP's 49408 token ids
BENCH_CLIP = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@dataclass
class Context:
    """What every method of one domain pair shares."""

    data: Path
    runs: Path
    args: argparse.Namespace
    clip_model: str  # open_clip name or the benchmark's config .json

    def common(self, run_name: str) -> list[str]:
        """The flags every model script takes: data, runs, run name, the shared split."""
        return ["--data", str(self.data), "--runs", str(self.runs), "--run-name", run_name, "--seed", str(self.args.seed),
                "--val-fraction", "0.3", "--query-domain", QUERY_DOMAIN, "--workers", "0"]


@dataclass
class Method:
    key: str  # --methods name and run folder
    label: str  # row of the table
    random_weights: Callable[[argparse.Namespace], bool]  # True when the row's models are untrained
    run: Callable[[Context, str], None]


def run_clip_img2img(ctx: Context, run_name: str) -> None:
    """Zero-shot CLIP image-to-image: train_clip_arcface.py --zero-shot (frozen tower, flip TTA)."""
    train_clip_arcface.main([*ctx.common(run_name), *clip_flags(ctx), "--zero-shot"])


def clip_flags(ctx: Context) -> list[str]:
    """The CLIP model of every CLIP row, in the kit's one --weights grammar."""
    a = ctx.args
    return ["--model", ctx.clip_model, "--weights", a.clip_weights, "--file-tag", a.clip_file_tag, "--embed-batch-size", "128"]


def run_caption_labels(ctx: Context, run_name: str) -> None:
    """Caption matching, the paper's ablation: class names as the gallery's captions (closed set)."""
    infer_caption_match.main([*ctx.common(run_name), *clip_flags(ctx), "--captions-from", "labels", "--closed-set",
                              "--label-template", "a {}"])


def run_caption_labels_blend(ctx: Context, run_name: str) -> None:
    """The same, mixed half and half with CLIP image-to-image (rows z-scored)."""
    infer_caption_match.main([*ctx.common(run_name), *clip_flags(ctx), "--captions-from", "labels", "--closed-set",
                              "--label-template", "a {}", "--blend", "0.5"])


def run_caption_blip(ctx: Context, run_name: str) -> None:
    """Caption matching with generated captions (needs --captioner: a BLIP/BLIP-2 folder)."""
    if not ctx.args.captioner:
        raise KitError("--methods caption_blip needs --captioner DIR (a BLIP/BLIP-2 save_pretrained folder)")
    infer_caption_match.main([*ctx.common(run_name), *clip_flags(ctx), "--captioner", ctx.args.captioner,
                              "--num-beams", "1", "--max-new-tokens", "20"])


def run_timm_frozen(ctx: Context, run_name: str) -> None:
    """A frozen timm CNN: train_resnet.py --epochs 0 (backbone features, flip TTA)."""
    a = ctx.args
    train_resnet.main([*ctx.common(run_name), "--model", a.timm_model, "--weights", a.timm_weights, "--epochs", "0",
                       "--img-size", "64", "--embed-batch-size", "128"])


def run_cnn_features(ctx: Context, run_name: str) -> None:
    """infer_cnn_features.py: the frozen timm backbone's last stage, GeM-pooled, whole images (no faces in PACS)."""
    a = ctx.args
    infer_cnn_features.main([*ctx.common(run_name), "--model", a.timm_model, "--weights", a.timm_weights,
                             "--img-size", "64", "--pool", "gem", "--embed-batch-size", "128"])


def run_clip_colour(ctx: Context, run_name: str) -> None:
    """infer_clip_colour.py: zero-shot CLIP plus the colour term, alpha and threshold searched on validation."""
    infer_clip_colour.main([*ctx.common(run_name), *clip_flags(ctx)])


METHODS = [
    Method("clip_img2img", "CLIP image-to-image, zero-shot", lambda a: a.clip_weights == "none", run_clip_img2img),
    Method("caption_labels", "caption matching, class-label captions (ablation)", lambda a: a.clip_weights == "none", run_caption_labels),
    Method("caption_labels_blend", "caption matching, class labels + 0.5 image-to-image", lambda a: a.clip_weights == "none", run_caption_labels_blend),
    Method("caption_blip", "caption matching, BLIP captions", lambda a: True, run_caption_blip),
    Method("timm_frozen", "frozen timm CNN features", lambda a: a.timm_weights == "none", run_timm_frozen),
    Method("cnn_features", "frozen timm CNN, GeM pool (infer_cnn_features.py)", lambda a: a.timm_weights == "none", run_cnn_features),
    Method("clip_colour", "CLIP image-to-image + colour term (infer_clip_colour.py)", lambda a: a.clip_weights == "none", run_clip_colour),
]
DEFAULT_METHODS = ["clip_img2img", "caption_labels", "caption_labels_blend", "timm_frozen", "cnn_features", "clip_colour"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pacs", type=Path, default=ROOT.parent / "shared/data/pacs_mini", metavar="DIR", help="PACS folder <domain>/<class>/<file> (default: %(default)s)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/out/methods", metavar="DIR", help="scratch folder: <domain>/data, <domain>/runs (default: %(default)s)")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks/results/bench_methods.md", metavar="MD", help="markdown tables (default: %(default)s)")
    p.add_argument("--pairs", nargs="+", default=list(GALLERY_DOMAINS), choices=GALLERY_DOMAINS, help="gallery domains (queries are photos) (default: all)")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=[m.key for m in METHODS], help="methods to run (default: %(default)s)")
    p.add_argument("--per-class", type=int, default=20, metavar="N", help="test queries and gallery images per class; the rest train (default: %(default)s)")
    p.add_argument("--clip-model", default="", metavar="NAME", help="open_clip name ('' = the benchmark's small random ViT) (default: '')")
    p.add_argument("--clip-weights", default="none", metavar="TAG|PATH", help="open_clip weights: tag, none or file (default: %(default)s)")
    p.add_argument("--clip-file-tag", default="openai", metavar="TAG", help="the open_clip tag a --clip-weights file is a copy of (default: %(default)s)")
    p.add_argument("--timm-model", default="resnet18", metavar="NAME", help="timm backbone of the frozen-CNN row (default: %(default)s)")
    p.add_argument("--timm-weights", default="none", metavar="PATH", help="its weights: none or a local file (default: %(default)s)")
    p.add_argument("--captioner", default="", metavar="DIR", help="BLIP/BLIP-2 folder for --methods caption_blip (default: none)")
    p.add_argument("--threads", type=int, default=2, metavar="N", help="torch CPU threads (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="split and init seed (default: %(default)s)")
    return p


def build_pair(pacs: Path, out: Path, gallery_domain: str, per_class: int) -> Path:
    """Write the competition layout of one photo -> ``gallery_domain`` pair to ``out`` (replaced).

    Raises:
        KitError: the PACS folder lacks a domain, or a class has too few images for ``per_class``.
    """
    for d in (QUERY_DOMAIN, gallery_domain):
        if not (pacs / d).is_dir():
            raise KitError(f"{pacs / d}: missing; expected PACS as <domain>/<class>/<file>")
    classes = sorted(p.name for p in (pacs / QUERY_DOMAIN).iterdir() if p.is_dir())
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    domains, truth, gallery_of = [("path", "domain")], {}, {}
    for cls in classes:
        for d in (QUERY_DOMAIN, gallery_domain):
            files = sorted((pacs / d / cls).iterdir())
            if len(files) < per_class + 2:
                raise KitError(f"{pacs / d / cls}: {len(files)} images; --per-class {per_class} needs {per_class + 2}")
            for i, f in enumerate(files):
                if i < per_class:  # test: flat folders, names that do not give the class away
                    name = hashlib.sha1(f"{d}/{cls}/{f.name}".encode()).hexdigest()[:12] + f.suffix
                    rel = f"test/{'query' if d == QUERY_DOMAIN else 'gallery'}/{name}"
                    if d == QUERY_DOMAIN:
                        truth[name] = cls
                    else:
                        gallery_of.setdefault(cls, []).append(name)
                else:
                    rel = f"train/{cls}/{d}_{f.name}"
                    domains.append((rel, d))
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, tmp / rel)
    with open(tmp / "domains.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(domains)
    atomic_write_json(tmp / "test/ground_truth.json", {q: sorted(gallery_of[c]) for q, c in sorted(truth.items())})
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def score_run(run_dir: Path, data: Path) -> dict[str, float]:
    """P@1, P@5, P@15, mAP@All and the competition score of a run's test matrix."""
    test = load_run(run_dir, ("test",)).splits["test"]
    truth = json.loads((data / "test/ground_truth.json").read_text())
    rel = relevance_matrix(test.query_names, test.gallery_names, truth)
    out = {f"p@{k}": precision_at_k(test.sim, rel, k) for k in (1, 5, 15)}
    out["map_all"] = float(average_precision(test.sim, rel).mean())
    out["score"] = topk_scores(test.sim, rel)["score"]
    return out


def chance_row(data: Path, seed: int, draws: int = 20) -> dict[str, float]:
    """The same metrics for random matrices (mean of ``draws``): the floor every row is read against."""
    truth = json.loads((data / "test/ground_truth.json").read_text())
    queries = sorted(truth)
    gallery = sorted({g for gs in truth.values() for g in gs})
    rel = relevance_matrix(queries, gallery, truth)
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(draws):
        sim = rng.random((len(queries), len(gallery))).astype(np.float32)
        out = {f"p@{k}": precision_at_k(sim, rel, k) for k in (1, 5, 15)}
        out["map_all"] = float(average_precision(sim, rel).mean())
        out["score"] = topk_scores(sim, rel)["score"]
        rows.append(out)
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def pair_name(domain: str) -> str:
    return f"photo->{domain}"


def results_tables(rows: dict[str, dict], pairs: list[str]) -> list[Table]:
    tables = []
    for key, title in (*METRICS, ("score", "competition score")):
        table = Table(title=f"PACS test, {title} (queries: photos; gallery: the pair's domain)")
        table.add_column("method", no_wrap=True)
        table.add_column("weights")
        for p in pairs:
            table.add_column(pair_name(p), justify="right")
        table.add_column("mean", justify="right")
        for label, r in rows.items():
            vals = [r["metrics"][p][key] for p in pairs]
            fmt = "{:.1f}" if key == "score" else "{:.3f}"
            table.add_row(label, r["weights"], *[fmt.format(v) for v in vals], fmt.format(float(np.mean(vals))))
        tables.append(table)
    return tables


def markdown(rows: dict[str, dict], pairs: list[str], command: str, notes: list[str]) -> str:
    lines = ["# PACS: every offline method per domain pair (layout of Iijima and Stathaki's Table I)", "",
             f"Command: `{command}`", "", *notes, ""]
    head = ["method", "weights"] + [f"{pair_name(p)} {name}" for p in pairs for _, name in METRICS]
    lines += ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for label, r in rows.items():
        cells = [f"{r['metrics'][p][key]:.3f}" for p in pairs for key, _ in METRICS]
        lines.append(f"| {label} | {r['weights']} | " + " | ".join(cells) + " |")
    lines += ["", "Mean over the pairs, with the competition score (600 x Top-1 + 300 x Top-5 + 100 x Top-10) and seconds per pair:", "",
              "| method | weights | " + " | ".join(name for _, name in METRICS) + " | score | s/pair |",
              "|---|---|" + "---:|" * (len(METRICS) + 2)]
    for label, r in rows.items():
        means = [float(np.mean([r["metrics"][p][key] for p in pairs])) for key, _ in METRICS]
        score = float(np.mean([r["metrics"][p]["score"] for p in pairs]))
        lines.append(f"| {label} | {r['weights']} | " + " | ".join(f"{m:.3f}" for m in means)
                     + f" | {score:.1f} | {r['seconds'] / len(pairs):.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    torch.set_num_threads(args.threads)
    if not args.pacs.is_dir():
        raise KitError(f"--pacs {args.pacs}: not found; the benchmark needs ../shared/data/pacs_mini")
    t0 = time.time()
    clip_model = args.clip_model
    if not clip_model:
        clip_model = str(args.out / "configs" / "bench-clip.json")
        atomic_write_json(Path(clip_model), BENCH_CLIP)
    chosen = [m for m in METHODS if m.key in args.methods]
    n_classes = len([p for p in (args.pacs / QUERY_DOMAIN).iterdir() if p.is_dir()]) if (args.pacs / QUERY_DOMAIN).is_dir() else 0
    rows: dict[str, dict] = {"chance (random scores, mean of 20)": {"weights": "-", "metrics": {}, "seconds": 0.0}}
    rows.update({m.label: {"weights": "random" if m.random_weights(args) else "pretrained", "metrics": {}, "seconds": 0.0}
                 for m in chosen})
    for domain in args.pairs:
        data = build_pair(args.pacs, args.out / domain / "data", domain, args.per_class)
        runs = args.out / domain / "runs"
        shutil.rmtree(runs, ignore_errors=True)
        ctx = Context(data, runs, args, clip_model)
        rows["chance (random scores, mean of 20)"]["metrics"][domain] = chance_row(data, args.seed)
        for m in chosen:
            console.rule(f"{pair_name(domain)}: {m.label}")
            t1 = time.time()
            torch.manual_seed(args.seed)
            m.run(ctx, m.key)
            rows[m.label]["seconds"] += time.time() - t1
            rows[m.label]["metrics"][domain] = score_run(runs / m.key, data)
    for table in results_tables(rows, args.pairs):
        console.print(table)
    command = " ".join([".venv/bin/python benchmarks/methods/bench_methods.py", *(sys.argv[1:] if argv is None else argv)])
    notes = [
        f"Data: {args.pacs.name}, {n_classes} classes; per pair {args.per_class} photos per class as test queries against "
        f"{args.per_class} images per class of the gallery domain ({n_classes * args.per_class} x {n_classes * args.per_class}); "
        "the remaining images of both domains are train/ (nothing here trains on them; the split is only for validation). "
        "Relevant = same class.",
        f"Models: CLIP = {args.clip_model or 'a small open_clip ViT (64 px, 4 blocks of width 128, text tower 2 blocks of width 64)'}"
        f", weights {args.clip_weights}; timm = {args.timm_model}, weights {args.timm_weights}, 64 px. "
        "'random' rows start from random weights: no pretrained CLIP, BLIP or ImageNet weights are reachable offline, "
        "so these rows are the floor of each method, not its result with real weights.",
        "The caption rows use class names as captions (the paper's ablation) with --closed-set: validation gallery "
        "images take their class name; test gallery images the class name CLIP finds closest. "
        "No BLIP captioner weights are offline, so there is no generated-caption row; dlib faces do not apply to PACS (no faces).",
        f"CPU, {args.threads} torch threads, on a machine shared with other jobs; total {time.time() - t0:.0f} s.",
    ]
    write_results(args.results, markdown(rows, args.pairs, command, notes))
    console.print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    run_cli(main)
