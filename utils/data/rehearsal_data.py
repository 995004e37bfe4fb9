"""Make a small competition dataset offline, in seconds, for rehearsals and tests.

Each identity is a fixed design: a main shape with its colour, a second mark
with another colour and a position. Its *real* images are photo-like renders
(textured, shaded, noisy, lit unevenly, jittered, saved as JPEG); its
*synthetic* images are clean illustration-style renders of the same design
(flat pastel background, outlines, posterised and slightly hue-shifted
colours, saved as PNG): the domain gap that the competition is about.

    python -m utils.data.rehearsal_data --out data/rehearsal

writes ``train/<identity>/*``, ``test/query/*``, ``test/gallery/*``,
``domains.csv`` and ``test/ground_truth.json``. Test identities are disjoint
from training identities; test file names do not reveal the identity.
"""

from __future__ import annotations

import argparse
import colorsys
import csv
import io
import logging
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from utils.atomic import atomic_write_bytes, atomic_write_json
from utils.errors import KitError, run_cli
from utils.logs import setup_logging
from utils.paths import user_path

log = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star")
CORNERS = ((0.3, 0.3), (0.7, 0.3), (0.3, 0.7), (0.7, 0.7))


@dataclass(frozen=True)
class Identity:
    name: str
    shape: str
    hue: float  # main shape colour, 0..1
    mark_shape: str
    mark_hue: float
    corner: int  # where the mark sits


def _rgb(hue: float, sat: float, val: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, sat, val)
    return int(r * 255), int(g * 255), int(b * 255)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in np.linspace(math.pi / 4, 2 * math.pi + math.pi / 4, 4, endpoint=False)]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in np.linspace(-math.pi / 2, 1.5 * math.pi, 3, endpoint=False)]
    elif shape == "diamond":
        pts = [(0, -1), (0.65, 0), (0, 1), (-0.65, 0)]
    elif shape == "star":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rad = 1.0 if i % 2 == 0 else 0.45
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif shape == "cross":
        w = 0.35
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx, cy, r, angle, fill, outline=None, width=0) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif shape == "ring":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
        inner = r * 0.5
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=None, outline=outline, width=width)
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=(0, 0, 0, 0))
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fill, outline=outline, width=width)


def _render(ident: Identity, style: str, rng: random.Random, size: int) -> Image.Image:
    """Draw one image of ``ident`` in ``style`` ('real' or 'synthetic')."""
    s = size
    real = style == "real"
    if real:
        # textured background: a random-colour gradient with noise
        c0 = np.array(_rgb(rng.random(), rng.uniform(0.05, 0.3), rng.uniform(0.35, 0.8)), float)
        c1 = np.array(_rgb(rng.random(), rng.uniform(0.05, 0.3), rng.uniform(0.35, 0.8)), float)
        t = np.linspace(0, 1, s)[None, :, None] * np.ones((s, 1, 1))
        bg = c0 * (1 - t) + c1 * t
        bg += np.random.default_rng(rng.randrange(2**31)).normal(0, 12, (s, s, 3))
        img = Image.fromarray(bg.clip(0, 255).astype(np.uint8)).convert("RGBA")
    else:
        img = Image.new("RGBA", (s, s), _rgb(rng.random(), 0.12, 0.97) + (255,))
    layer = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    hue_shift = 0.0 if real else rng.uniform(-0.04, 0.04)
    sat, val = (rng.uniform(0.55, 0.9), rng.uniform(0.55, 0.95)) if real else (1.0, 1.0)
    outline, width = (None, 0) if real else ((20, 20, 20, 255), max(2, s // 40))
    jitter = 0.06 if real else 0.03
    cx = s * (0.5 + rng.uniform(-jitter, jitter))
    cy = s * (0.5 + rng.uniform(-jitter, jitter))
    r = s * rng.uniform(0.22, 0.3)
    angle = rng.uniform(-0.3, 0.3)
    _draw_shape(draw, ident.shape, cx, cy, r, angle, _rgb(ident.hue + hue_shift, sat, val) + (255,), outline, width)
    mx, my = CORNERS[ident.corner]
    mr = s * rng.uniform(0.1, 0.13)
    _draw_shape(
        draw, ident.mark_shape, s * (mx + rng.uniform(-0.04, 0.04)) * 1.0, s * my, mr, angle,
        _rgb(ident.mark_hue + hue_shift, sat, val) + (255,), outline, width,
    )
    img = Image.alpha_composite(img, layer).convert("RGB")
    if real:
        # uneven light, then a little blur and sensor noise
        light = np.linspace(rng.uniform(0.7, 1.0), rng.uniform(1.0, 1.25), s)[:, None, None]
        arr = np.asarray(img, float) * light
        arr += np.random.default_rng(rng.randrange(2**31)).normal(0, 6, arr.shape)
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    else:
        img = img.quantize(colors=12, method=Image.Quantize.MEDIANCUT).convert("RGB")
    return img


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_identities(n: int, rng: random.Random) -> list[Identity]:
    """``n`` distinct designs (no two share shape, colour bin, mark and corner)."""
    seen, out = set(), []
    while len(out) < n:
        ident = Identity(
            name=f"id{len(out):03d}",
            shape=rng.choice(SHAPES),
            hue=rng.randrange(12) / 12,
            mark_shape=rng.choice(SHAPES[:4]),
            mark_hue=rng.randrange(12) / 12,
            corner=rng.randrange(4),
        )
        key = (ident.shape, ident.hue, ident.mark_shape, ident.mark_hue, ident.corner)
        if key not in seen:
            seen.add(key)
            out.append(ident)
    return out


def _write_train(tmp: Path, idents: list, rng: random.Random, size: int, n_real: int, n_synthetic: int) -> list[tuple[str, str]]:
    """Each training identity's real JPEGs and synthetic PNGs; their (path, domain) rows."""
    domains = []
    for ident in idents:
        for k in range(n_real):
            rel = f"train/{ident.name}/real_{k}.jpg"
            atomic_write_bytes(tmp / rel, _encode(_render(ident, "real", rng, size), "JPEG"))
            domains.append((rel, "real"))
        for k in range(n_synthetic):
            rel = f"train/{ident.name}/synth_{k}.png"
            atomic_write_bytes(tmp / rel, _encode(_render(ident, "synthetic", rng, size), "PNG"))
            domains.append((rel, "synthetic"))
    return domains


def _write_test(tmp: Path, idents: list, rng: random.Random, size: int, n_queries: int, n_gallery: int,
                domains: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Each test identity's gallery PNGs and query JPEGs under random names; the ground truth (rows added to ``domains``)."""
    truth: dict[str, list[str]] = {}
    for ident in idents:
        gallery = []
        for _ in range(n_gallery):
            name = f"{rng.getrandbits(40):010x}.png"
            atomic_write_bytes(tmp / "test/gallery" / name, _encode(_render(ident, "synthetic", rng, size), "PNG"))
            domains.append((f"test/gallery/{name}", "synthetic"))
            gallery.append(name)
        for _ in range(n_queries):
            name = f"{rng.getrandbits(40):010x}.jpg"
            atomic_write_bytes(tmp / "test/query" / name, _encode(_render(ident, "real", rng, size), "JPEG"))
            domains.append((f"test/query/{name}", "real"))
            truth[name] = sorted(gallery)
    return truth


def generate(
    out: str | Path,
    train_identities: int = 48,
    test_identities: int = 40,
    real_per_identity: int = 4,
    synthetic_per_identity: int = 4,
    queries_per_identity: int = 2,
    gallery_per_identity: int = 2,
    size: int = 96,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the dataset to ``out`` (refuses a non-empty folder unless ``overwrite``).

    Raises:
        KitError: ``out`` exists and is not empty, and ``overwrite`` is off.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise KitError(f"{out}: folder exists and is not empty; pass --overwrite or another --out")
        shutil.rmtree(out)
    if test_identities * gallery_per_identity < 10:
        raise KitError("the test gallery needs at least 10 images: raise --test-identities")
    rng = random.Random(seed)
    idents = make_identities(train_identities + test_identities, rng)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    domains = _write_train(tmp, idents[:train_identities], rng, size, real_per_identity, synthetic_per_identity)
    truth = _write_test(tmp, idents[train_identities:], rng, size, queries_per_identity, gallery_per_identity, domains)
    with open(tmp / "domains.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "domain"])
        w.writerows(domains)
    atomic_write_json(tmp / "test" / "ground_truth.json", dict(sorted(truth.items())))
    if out.exists():
        out.rmdir()  # empty: checked above
    tmp.replace(out)
    log.info(
        "wrote %s: %d training identities, %d test queries, %d gallery images",
        out, train_identities, len(truth), test_identities * gallery_per_identity,
    )
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=user_path, default=Path("data/rehearsal"), metavar="DIR", help="output folder (default: %(default)s)")
    p.add_argument("--train-identities", type=int, default=48, metavar="N", help="identities in train/ (default: %(default)s)")
    p.add_argument("--test-identities", type=int, default=40, metavar="N", help="identities in test/ (default: %(default)s)")
    p.add_argument("--size", type=int, default=96, metavar="PX", help="image side in pixels (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder (default: off)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    generate(args.out, args.train_identities, args.test_identities, size=args.size, seed=args.seed, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    run_cli(main)
