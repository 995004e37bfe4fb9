"""Embedding throughput of the kit's path against simple loops and the machine's FLOP-bound limit.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/embedding/bench_embed.py                 # ResNet-50 at 224 px, 64 images
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/embedding/bench_embed.py --images 128 --models resnet50 clip faces

For each model: images/second through
- the kit's path (``utils.embedding.embed.embed_images``: DataLoader workers decode and
  resize, batches under ``inference_mode``, channels-last CNNs with BatchNorm folded), cold cache;
- the kit's path one image at a time (batch size 1);
- a plain batch-32 loop (decode in the main process, ``torch.no_grad``, default memory format);
and, for ResNet-50, the FLOP-bound limit: the measured fp32 matmul peak of this machine
divided by the model's FLOPs per image (counted with torch's FlopCounterMode). Random
weights: throughput does not depend on them. Prints a rich table and writes
benchmarks/results/bench_embed.md. Compare figures only within one run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.table import Table

from benchmarks.common import ROOT, write_results
from utils.data.augment import eval_transform
from utils.data.images import load_image
from utils.device import default_workers
from utils.embedding.embed import embed_arrays, embed_images, fold_batchnorm
from utils.embedding.views import tta_views
from utils.logs import console

CPU = torch.device("cpu")


def matmul_peak_gflops(n: int = 3072, repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of an n x n matmul on this machine."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def flops_per_image(model: torch.nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def make_photos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """JPEG photos of 500 x 375 (smooth gradients plus noise, so decoding costs what a photo costs)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500]
    paths = []
    for i in range(n):
        base = (np.stack([xx * rng.uniform(0.2, 0.5), yy * rng.uniform(0.2, 0.6), (xx + yy) * 0.2], axis=2) + rng.uniform(0, 80)) % 255
        img = (base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        p = folder / f"photo_{i:04d}.jpg"
        Image.fromarray(img).save(p, quality=90)
        paths.append(p)
    return paths


def plain_loop(model, paths, size: int, batch: int = 32) -> None:
    tf = eval_transform(size)
    with torch.no_grad():
        for s in range(0, len(paths), batch):
            x = torch.stack([tf(load_image(p)) for p in paths[s : s + batch]])
            model(x)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(methods: dict, rounds: int) -> tuple[dict[str, float], float]:
    """Median images/s of each method over ``rounds``, run in rotating order, and the best matmul peak seen."""
    times: dict[str, list[float]] = {k: [] for k in methods}
    peak = 0.0
    names = list(methods)
    for r in range(rounds):
        peak = max(peak, matmul_peak_gflops())
        for k in names[r % len(names):] + names[: r % len(names)]:
            n, fn = methods[k]
            times[k].append(n / timed(fn))
    return {k: float(np.median(v)) for k, v in times.items()}, peak


def bench_cnn(name: str, paths: list[Path], size: int, rows: list, workers: int, rounds: int) -> float:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0).eval()
    flops = flops_per_image(model, size)
    n, tf = len(paths), eval_transform(size)
    compiled = torch.compile(fold_batchnorm(model.eval()).to(memory_format=torch.channels_last), dynamic=True)  # as embed_images does
    embed_images(compiled, paths[:40], tf, device=CPU, batch_size=32, workers=0, channels_last=True)  # compile (batch 32 and 8)
    methods = {
        f"kit path, batch 32, {workers} workers, channels-last": (n, lambda: embed_images(
            model, paths, tf, device=CPU, batch_size=32, workers=workers, channels_last=True)),
        f"kit path, batch 32, {workers} workers, channels-first": (n, lambda: embed_images(
            model.to(memory_format=torch.contiguous_format), paths, tf, device=CPU, batch_size=32, workers=workers)),
        f"kit path, batch 32, {workers} workers, channels-last, --compile (after a warm-up call)": (n, lambda: embed_images(
            compiled, paths, tf, device=CPU, batch_size=32, workers=workers, channels_last=True)),
        "kit path, one image at a time": (16, lambda: embed_images(
            model.to(memory_format=torch.contiguous_format), paths[:16], tf, device=CPU, batch_size=1, workers=0)),
        "plain batch-32 loop": (n, lambda: plain_loop(model.to(memory_format=torch.contiguous_format), paths, size)),
    }
    ips, peak = interleaved(methods, rounds)
    limit = peak * 1e9 / flops
    plain = ips["plain batch-32 loop"]
    for label, v in ips.items():
        rows.append((f"{name} @ {size}px", label, v, v / plain, v / limit))
    rows.append((f"{name} @ {size}px", f"FLOP-bound limit ({flops / 1e9:.2f} GFLOP/img at {peak:.0f} GFLOP/s)", limit, limit / plain, 1.0))
    return peak


def bench_clip(paths: list[Path], rows: list, workers: int, rounds: int) -> None:
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).visual.eval()
    n = len(paths)
    ips, peak = interleaved({
        "kit path, batch 32": (n, lambda: embed_images(model, paths, eval_transform(224), device=CPU, batch_size=32, workers=workers)),
        "plain batch-32 loop": (n, lambda: plain_loop(model, paths, 224)),
    }, rounds)
    limit = peak * 1e9 / flops_per_image(model, 224)
    for label, v in ips.items():
        rows.append(("open_clip ViT-B-32 tower @ 224px", label, v, v / ips["plain batch-32 loop"], v / limit))


def bench_faces(rows: list) -> None:
    from utils.faces.embedder import build_embedder

    emb = build_embedder("dlib", "default", CPU)
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (32, 187, 187, 3), dtype=np.uint8)
    for groups, label in (([], "identity only"), (["flip"], "flip (2 views)"), (["flip", "rot", "brightness", "scale"], "all groups (8 views)")):
        views = tta_views(groups)
        for stacked in (True, False):
            t = timed(lambda: embed_arrays(emb, crops, views, device=CPU, out_px=emb.input_px, batch_size=32, stack_views=stacked))  # noqa: B023
            rows.append(("dlib face embedder on 150px chips", f"{label}, views {'stacked in one call' if stacked else 'one call each'}",
                         len(crops) / t, float("nan"), float("nan")))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64, help="photos to embed (default: %(default)s)")
    ap.add_argument("--models", nargs="+", default=["resnet50", "clip", "faces"], choices=["resnet50", "clip", "faces"],
                    help="what to measure (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per method; the median is reported (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=-1, help="DataLoader workers of the kit path; -1: the kit's choice (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_embed.md", help="table file (default: %(default)s)")
    args = ap.parse_args()
    workers = default_workers() if args.workers < 0 else args.workers
    peak = matmul_peak_gflops()
    rows: list = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_photos(Path(tmp), args.images)
        if "resnet50" in args.models:
            peak = bench_cnn("resnet50", paths, 224, rows, workers, args.rounds)
        if "clip" in args.models:
            bench_clip(paths, rows, workers, args.rounds)
    if "faces" in args.models:
        bench_faces(rows)
    table = Table(title=f"embedding throughput, {args.images} images, {torch.get_num_threads()} threads, fp32 matmul peak {peak:.0f} GFLOP/s")
    for col in ("model", "path", "images/s", "vs plain loop", "of FLOP-bound limit"):
        table.add_column(col, justify="left" if col in ("model", "path") else "right")
    md = ["| model | path | images/s | vs plain loop | of FLOP-bound limit |", "|---|---|---:|---:|---:|"]
    fmt = lambda v, spec: "" if np.isnan(v) else format(v, spec)  # noqa: E731
    for model, path, ips, rel, frac in rows:
        cells = (model, path, f"{ips:.2f}", fmt(rel, ".2f") + ("x" if not np.isnan(rel) else ""), fmt(frac, ".2f"))
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    console.print(table)
    write_results(args.out, "\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
