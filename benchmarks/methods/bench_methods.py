"""Every retrieval method that runs offline, on PACS, on every ordered query->gallery domain pair, in
the layout of the caption-matching paper's Table I (a block per metric; rows: methods; columns:
the 12 pairs and their mean).

    nice -n 10 .venv/bin/python benchmarks/methods/bench_methods.py       # all 12 pairs, ~15 min on 2 shared CPU cores
    .venv/bin/python benchmarks/methods/bench_methods.py --methods clip_img2img caption_true_labels
    .venv/bin/python benchmarks/methods/bench_methods.py --pairs photo:sketch --per-class 10   # a quick look

For each pair (query domain, gallery domain) it builds a competition-layout
dataset from /work/shared/data/pacs_mini under
benchmarks/out/methods/<query>-<gallery>/data: every class is an identity; per class,
the first --per-class images of the query domain become test queries and the first --per-class
images of the gallery domain the test gallery (names hashed, with
test/ground_truth.json and test/gallery_labels.json, each gallery image's class),
and the remaining images of both domains go to train/<class>/ with a domains.csv.
Each method runs through its script's main() into <pair>/runs (one split.json per
pair); the benchmark then reads each test matrix and scores P@1, P@5, P@15 and
mAP@All (relevant = same class), P@50/100/200 where the gallery has that many
images, and the competition score. A figure that depends on the order of tied
scores (a tie mixing relevant and other images across the cut; constant rows)
is printed as ``tied`` with a warning, never as a number. The results file is
headed by date, commit, machine (cores, a measured fp32 matmul rate) and the command.

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

DOMAINS = ("photo", "art_painting", "cartoon", "sketch")
SHORT = {"photo": "P", "art_painting": "A", "cartoon": "C", "sketch": "S"}
PAIRS = tuple(f"{q}:{g}" for q in DOMAINS for g in DOMAINS if q != g)  # the 12 ordered query:gallery pairs
METRICS = (("p@1", "P@1"), ("p@5", "P@5"), ("p@15", "P@15"), ("map_all", "mAP@All"))
LARGE_K = (50, 100, 200)  # P@k the paper reports for large galleries; only where the gallery has k images
TIE_ATOL = 0.0  # scores tie when exactly equal (float32 near-ties are a fixed order of the matrix, not a tie)
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
    query_domain: str

    def common(self, run_name: str) -> list[str]:
        """The flags every model script takes: data, runs, run name, the shared split."""
        return ["--data", str(self.data), "--runs", str(self.runs), "--run-name", run_name, "--seed", str(self.args.seed),
                "--val-fraction", "0.3", "--query-domain", self.query_domain, "--workers", "0",
                "--tta", *self.args.tta]


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


def run_caption_true_labels(ctx: Context, run_name: str) -> None:
    """Caption matching, the paper's ablation: each gallery image's true class name as its caption."""
    infer_caption_match.main([*ctx.common(run_name), *clip_flags(ctx), "--captions-from", "true-labels",
                              "--test-labels", str(ctx.data / "test/gallery_labels.json"), "--label-template", "a {}"])


def run_caption_clip_labels(ctx: Context, run_name: str) -> None:
    """Caption matching with CLIP's nearest class name as each gallery image's caption (closed set)."""
    infer_caption_match.main([*ctx.common(run_name), *clip_flags(ctx), "--captions-from", "clip-labels", "--closed-set",
                              "--label-template", "a {}"])


def run_caption_clip_labels_blend(ctx: Context, run_name: str) -> None:
    """The same, mixed half and half with CLIP image-to-image (rows z-scored)."""
    infer_caption_match.main([*ctx.common(run_name), *clip_flags(ctx), "--captions-from", "clip-labels", "--closed-set",
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
    Method("caption_true_labels", "caption matching, true class labels (the paper's ablation)", lambda a: a.clip_weights == "none", run_caption_true_labels),
    Method("caption_clip_labels", "caption matching, CLIP-assigned class labels (closed set)", lambda a: a.clip_weights == "none", run_caption_clip_labels),
    Method("caption_clip_labels_blend", "caption matching, CLIP class labels + 0.5 image-to-image", lambda a: a.clip_weights == "none", run_caption_clip_labels_blend),
    Method("caption_blip", "caption matching, BLIP captions", lambda a: True, run_caption_blip),
    Method("timm_frozen", "frozen timm CNN features", lambda a: a.timm_weights == "none", run_timm_frozen),
    Method("cnn_features", "frozen timm CNN, GeM pool (infer_cnn_features.py)", lambda a: a.timm_weights == "none", run_cnn_features),
    Method("clip_colour", "CLIP image-to-image + colour term (infer_clip_colour.py)", lambda a: a.clip_weights == "none", run_clip_colour),
]
DEFAULT_METHODS = ["clip_img2img", "caption_true_labels", "caption_clip_labels", "clip_colour"]  # ~15 min for 12 pairs on 2 shared cores


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pacs", type=Path, default=ROOT.parent / "shared/data/pacs_mini", metavar="DIR", help="PACS folder <domain>/<class>/<file> (default: %(default)s)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/out/methods", metavar="DIR", help="scratch folder: <domain>/data, <domain>/runs (default: %(default)s)")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks/results/bench_methods.md", metavar="MD", help="markdown tables (default: %(default)s)")
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=PAIRS, metavar="QUERY:GALLERY", help="ordered domain pairs, e.g. photo:sketch (default: all 12)")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=[m.key for m in METHODS], help="methods to run (default: %(default)s)")
    p.add_argument("--per-class", type=int, default=15, metavar="N", help="test queries and gallery images per class (15 x 7 classes: P@50 and P@100 fit; 30: P@200 too); the rest train (default: %(default)s)")
    p.add_argument("--tta", nargs="*", default=[], metavar="GROUP", help="test-time view groups of every method (default: none, the identity view; the scripts' own default is flip)")
    p.add_argument("--clip-model", default="", metavar="NAME", help="open_clip name ('' = the benchmark's small random ViT) (default: '')")
    p.add_argument("--clip-weights", default="none", metavar="TAG|PATH", help="open_clip weights: tag, none or file (default: %(default)s)")
    p.add_argument("--clip-file-tag", default="openai", metavar="TAG", help="the open_clip tag a --clip-weights file is a copy of (default: %(default)s)")
    p.add_argument("--timm-model", default="resnet18", metavar="NAME", help="timm backbone of the frozen-CNN row (default: %(default)s)")
    p.add_argument("--timm-weights", default="none", metavar="PATH", help="its weights: none or a local file (default: %(default)s)")
    p.add_argument("--captioner", default="", metavar="DIR", help="BLIP/BLIP-2 folder for --methods caption_blip (default: none)")
    p.add_argument("--threads", type=int, default=2, metavar="N", help="torch CPU threads (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="split and init seed (default: %(default)s)")
    return p


def build_pair(pacs: Path, out: Path, query_domain: str, gallery_domain: str, per_class: int) -> Path:
    """Write the competition layout of one ``query_domain`` -> ``gallery_domain`` pair to ``out`` (replaced),
    with test/ground_truth.json and test/gallery_labels.json (each test gallery image's class).

    Raises:
        KitError: the PACS folder lacks a domain, or a class has too few images for ``per_class``.
    """
    for d in (query_domain, gallery_domain):
        if not (pacs / d).is_dir():
            raise KitError(f"{pacs / d}: missing; expected PACS as <domain>/<class>/<file>")
    classes = sorted(p.name for p in (pacs / query_domain).iterdir() if p.is_dir())
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    domains, truth, gallery_of = [("path", "domain")], {}, {}
    for cls in classes:
        for d in (query_domain, gallery_domain):
            files = sorted((pacs / d / cls).iterdir())
            if len(files) < per_class + 2:
                raise KitError(f"{pacs / d / cls}: {len(files)} images; --per-class {per_class} needs {per_class + 2}")
            for i, f in enumerate(files):
                if i < per_class:  # test: flat folders, names that do not give the class away
                    name = hashlib.sha1(f"{d}/{cls}/{f.name}".encode()).hexdigest()[:12] + f.suffix
                    rel = f"test/{'query' if d == query_domain else 'gallery'}/{name}"
                    if d == query_domain:
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
    atomic_write_json(tmp / "test/gallery_labels.json", {g: c for c, gs in sorted(gallery_of.items()) for g in sorted(gs)})
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def tie_dependent(sim: np.ndarray, rel: np.ndarray, k: int | None) -> int:
    """Rows whose metric depends on the order of tied scores: a tie that mixes relevant and other images
    and crosses the top-``k`` cut (P@k), or anywhere in the ranking (``k`` None: mAP@All)."""
    bad = 0
    for s, r in zip(sim, rel):
        order = np.argsort(-s, kind="stable")
        group = np.concatenate([[0], np.cumsum(np.abs(np.diff(s[order])) > TIE_ATOL)])  # tie-group id along the ranking
        sizes = np.bincount(group)
        hits = np.bincount(group, weights=r[order].astype(np.float64))
        mixed = (hits > 0) & (hits < sizes)  # groups holding both relevant and other images
        if k is None:
            bad += int(mixed.any())
        elif k < len(group) and group[k - 1] == group[k]:  # the cut falls inside a group
            bad += int(mixed[group[k]])
    return bad


def score_run(run_dir: Path, data: Path) -> tuple[dict[str, float], dict[str, int]]:
    """P@1/5/15, P@50/100/200 where the gallery has that many, mAP@All and the competition score of a
    run's test matrix; and per metric the rows whose value depends on tie order."""
    test = load_run(run_dir, ("test",)).splits["test"]
    truth = json.loads((data / "test/ground_truth.json").read_text())
    rel = relevance_matrix(test.query_names, test.gallery_names, truth)
    return {**metric_values(test.sim, rel), "queries": rel.shape[0]}, {
        **{f"p@{k}": tie_dependent(test.sim, rel, k) for k in (1, 5, 15, *LARGE_K) if k <= rel.shape[1]},
        "map_all": tie_dependent(test.sim, rel, None),
        "score": max(tie_dependent(test.sim, rel, k) for k in (1, 5, 10)),
    }


def metric_values(sim: np.ndarray, rel: np.ndarray) -> dict[str, float]:
    out = {f"p@{k}": precision_at_k(sim, rel, k) for k in (1, 5, 15, *LARGE_K) if k <= rel.shape[1]}
    out["map_all"] = float(average_precision(sim, rel).mean())
    out["score"] = topk_scores(sim, rel)["score"]
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
        rows.append(metric_values(rng.random((len(queries), len(gallery))).astype(np.float32), rel))
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def pair_name(pair: str) -> str:
    """``photo:sketch`` -> ``P->S``."""
    q, g = pair.split(":")
    return f"{SHORT[q]}->{SHORT[g]}"


def metric_names(rows: dict[str, dict], pairs: list[str]) -> list[tuple[str, str]]:
    """Table I's metrics, then P@50/100/200 where every pair's gallery has that many images."""
    keys = set.intersection(*(set(r["metrics"][p]) for r in rows.values() for p in pairs))
    return [*METRICS, *((f"p@{k}", f"P@{k}") for k in LARGE_K if f"p@{k}" in keys), ("score", "competition score")]


def results_tables(rows: dict[str, dict], pairs: list[str]) -> list[Table]:
    """One rich table per metric: methods as rows, pairs as columns, and their mean."""
    tables = []
    for key, title in metric_names(rows, pairs):
        table = Table(title=f"PACS test, {title}")
        table.add_column("method", no_wrap=True)
        for p in pairs:
            table.add_column(pair_name(p), justify="right")
        table.add_column("mean", justify="right")
        for label, r in rows.items():
            table.add_row(label, *cells(r, pairs, key))
        tables.append(table)
    return tables


def cells(row: dict, pairs: list[str], key: str) -> list[str]:
    """A row's figures per pair and their mean; ``tied`` where the figure would depend on tie order."""
    fmt = "{:.1f}" if key == "score" else "{:.3f}"
    out = ["tied" if row["ties"].get(p, {}).get(key) else fmt.format(row["metrics"][p][key]) for p in pairs]
    mean = "tied" if "tied" in out else fmt.format(float(np.mean([row["metrics"][p][key] for p in pairs])))
    return [*out, mean]


def markdown(rows: dict[str, dict], pairs: list[str], header: list[str], notes: list[str]) -> str:
    """Table I's layout: a block per metric, the pairs as columns, a mean; warnings for tied figures."""
    lines = ["# PACS: every offline method on every ordered domain pair (layout of Iijima and Stathaki's Table I)", "",
             *header, "", *notes, "",
             "Pairs: query domain -> gallery domain; " + ", ".join(f"{v} = {k}" for k, v in SHORT.items()) + ".", ""]
    for key, title in metric_names(rows, pairs):
        lines += [f"## {title}", "", "| method | weights | " + " | ".join(pair_name(p) for p in pairs) + " | mean |",
                  "|---|---|" + "---:|" * (len(pairs) + 1)]
        lines += [f"| {label} | {r['weights']} | " + " | ".join(cells(r, pairs, key)) + " |" for label, r in rows.items()]
        lines.append("")
    names = dict(metric_names(rows, pairs))
    warnings = [f"- {label}, {pair_name(p)}: up to {max(t.values())} of {n_queries(r, p)} query rows depend "
                f"on the order of tied scores; left out: {', '.join(names[k] for k, n in t.items() if n and k in names)}"
                for label, r in rows.items() for p in pairs if any((t := r["ties"].get(p, {})).values())]
    if warnings:
        lines += ["## Warnings", "", "`tied` marks a figure left out because it would depend on the order of tied scores "
                  "(for example constant rows, where every gallery image gets one score):", "", *warnings, ""]
    lines += ["## Seconds per pair", "", "| method | s/pair |", "|---|---:|"]
    lines += [f"| {label} | {r['seconds'] / len(pairs):.0f} |" for label, r in rows.items()]
    return "\n".join(lines) + "\n"


def n_queries(row: dict, pair: str) -> int:
    return int(row["metrics"][pair]["queries"])


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
    chance = "chance (random scores, mean of 20)"
    rows: dict[str, dict] = {chance: {"weights": "-", "metrics": {}, "ties": {}, "seconds": 0.0}}
    rows.update({m.label: {"weights": "random" if m.random_weights(args) else "pretrained", "metrics": {}, "ties": {}, "seconds": 0.0}
                 for m in chosen})
    for pair in args.pairs:
        query_domain, gallery_domain = pair.split(":")
        folder = args.out / f"{query_domain}-{gallery_domain}"
        data = build_pair(args.pacs, folder / "data", query_domain, gallery_domain, args.per_class)
        shutil.rmtree(folder / "runs", ignore_errors=True)
        ctx = Context(data, folder / "runs", args, clip_model, query_domain)
        rows[chance]["metrics"][pair] = chance_row(data, args.seed)
        for m in chosen:
            console.rule(f"{pair_name(pair)}: {m.label}")
            t1 = time.time()
            torch.manual_seed(args.seed)
            m.run(ctx, m.key)
            rows[m.label]["seconds"] += time.time() - t1
            rows[m.label]["metrics"][pair], rows[m.label]["ties"][pair] = score_run(ctx.runs / m.key, data)
    for table in results_tables(rows, args.pairs):
        console.print(table)
    write_results(args.results, markdown(rows, args.pairs, [], notes(args, time.time() - t0)), None if argv is None else [__file__, *argv])
    return 0


def notes(args: argparse.Namespace, seconds: float) -> list[str]:
    n_classes = len([p for p in (args.pacs / "photo").iterdir() if p.is_dir()])
    n = n_classes * args.per_class
    return [
        f"Data: {args.pacs.name}, {n_classes} classes; per pair {args.per_class} images per class of the query domain as test "
        f"queries against {args.per_class} images per class of the gallery domain ({n} x {n}); the remaining images of both "
        "domains are train/ (nothing here trains on them; the split is only for validation). Relevant = same class.",
        f"Models: CLIP = {args.clip_model or 'a small open_clip ViT (64 px, 4 blocks of width 128, text tower 2 blocks of width 64)'}"
        f", weights {args.clip_weights}; timm = {args.timm_model}, weights {args.timm_weights}, 64 px. "
        "'random' rows start from random weights: no pretrained CLIP, BLIP or ImageNet weights are reachable offline, "
        "so these rows are the floor of each method, not its result with real weights.",
        "Caption rows: 'true class labels' is the paper's ablation (every gallery image captioned with its true class "
        "name: validation from the class folders, test from the pair's test/gallery_labels.json); 'CLIP-assigned class "
        "labels' is another experiment (every gallery image captioned with the class name CLIP finds closest). "
        "No BLIP captioner weights are offline, so there is no generated-caption row; dlib faces do not apply to PACS (no faces).",
        f"P@50/100/200 appear where every pair's gallery has that many images ({n} here). Test-time views: "
        f"{' '.join(args.tta) or 'none (the identity view only)'}. Total {seconds:.0f} s.",
    ]


if __name__ == "__main__":
    run_cli(main)
