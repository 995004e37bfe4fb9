"""The hard face benchmark set, from ORL faces in the competition layout.

    from benchmarks.faces.face_data import build_hard_dataset
    data = build_hard_dataset(Path("benchmarks/out/faces_hard/data"))

40 people x 10 grey ORL photos (upscaled 2x to 184x224). Per person 3 photos
stay photos (queries; domain ``real``); the other 7 are posed, degraded and
restyled (:mod:`benchmarks.faces.face_styles`: pencil, stylise, colour_map, cartoon,
oil, in turn; domain ``synthetic``: the gallery). ``n_train`` people are
training identities (``train/<id>/...`` with real and synthetic images and
``domains.csv``), the rest are test identities (``test/query``,
``test/gallery`` with hidden names, ``test/ground_truth.json``).
``styles.json`` maps every synthetic file (relative path) to its style, for
per-style tables.

``face_free_images`` lists PACS images of classes without people (dog,
elephant, giraffe, guitar, horse, house) over its four domains: the false
face check.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from benchmarks.common import ROOT
from benchmarks.faces.face_styles import STYLES, styled
from utils.atomic import atomic_write_bytes
from utils.errors import KitError

SHARED = ROOT.parent / "shared" / "data"
ORL = SHARED / "orl_faces"
PACS = SHARED / "pacs_mini"
N_QUERY_PER_PERSON = 3
FACE_FREE_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house")


def orl_people() -> list[Path]:
    if not ORL.is_dir():
        raise KitError(f"{ORL}: ORL faces not found; the benchmark needs ../shared/data/orl_faces")
    return sorted((p for p in ORL.iterdir() if p.is_dir()), key=lambda p: int(p.name[1:]))


def write_orl_layout(out: Path, people: list[Path], n_train: int, style_names: list[str],
                     restyle: Callable[[np.ndarray, str, random.Random], np.ndarray], rng: random.Random) -> dict[str, str]:
    """Write ``people`` (ORL folders, in this order) to ``out`` in the competition layout; returns
    each synthetic file's style (path relative to ``out``).

    Per person the photos are shuffled; the first 3 stay photos (queries, domain ``real``),
    the others become ``restyle(pixels, style, rng)`` with the styles taken in turn
    (domain ``synthetic``). The first ``n_train`` people are training identities
    (``train/<id>/``, ``domains.csv``), the rest test identities (``test/query``,
    ``test/gallery`` with hidden names, ``test/ground_truth.json``).
    """
    domains, styles, truth = [], {}, {}
    queries_of: dict[str, list[str]] = {}
    gallery_of: dict[str, list[str]] = {}
    n_q = n_g = 0
    for k, person in enumerate(people):
        files = sorted(person.glob("*.pgm"), key=lambda p: int(p.stem))
        rng.shuffle(files)
        is_train = k < n_train
        for j, f in enumerate(files):
            img = np.asarray(Image.open(f).convert("RGB").resize((184, 224), Image.Resampling.BICUBIC))
            real = j < N_QUERY_PER_PERSON
            style = "real" if real else style_names[(j + k) % len(style_names)]
            pixels = img if real else restyle(img, style, rng)
            ext = ".jpg" if real else ".png"
            if is_train:
                rel = f"train/{person.name}/{f.stem}_{style}{ext}"
                domains.append((rel, "real" if real else "synthetic"))
            elif real:
                n_q += 1
                rel = f"test/query/q{n_q:04d}{ext}"
                queries_of.setdefault(person.name, []).append(Path(rel).name)
            else:
                n_g += 1
                rel = f"test/gallery/g{n_g:04d}{ext}"
                gallery_of.setdefault(person.name, []).append(Path(rel).name)
            if not real:
                styles[rel] = style
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(out / rel, **({"quality": 92} if real else {}))
    for person, qs in queries_of.items():
        for q in qs:
            truth[q] = sorted(gallery_of[person])
    with open(out / "domains.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "domain"])
        w.writerows(domains)
    atomic_write_bytes(out / "test" / "ground_truth.json", json.dumps(truth, indent=1, sort_keys=True).encode())
    return styles


def build_hard_dataset(out: Path, n_train: int = 20, n_test: int = 20, seed: int = 0) -> Path:
    """Write the hard set to ``out`` (replaced if present); returns ``out``."""
    people = orl_people()
    if n_train + n_test > len(people):
        raise KitError(f"{n_train} training + {n_test} test people: ORL has {len(people)}")
    if out.exists():
        shutil.rmtree(out)
    rng = random.Random(seed)
    rng.shuffle(people)
    styles = write_orl_layout(out, people[: n_train + n_test], n_train, list(STYLES), styled, rng)
    atomic_write_bytes(out / "styles.json", json.dumps(styles, indent=1, sort_keys=True).encode())
    return out


def face_free_images(per_class_domain: int = 10) -> list[Path]:
    """The first ``per_class_domain`` PACS images (by name) of each face-free class in each domain."""
    if not PACS.is_dir():
        raise KitError(f"{PACS}: PACS mini not found; the false face check needs ../shared/data/pacs_mini")
    out = []
    for domain in sorted(p for p in PACS.iterdir() if p.is_dir()):
        for cls in FACE_FREE_CLASSES:
            out += sorted((domain / cls).iterdir())[:per_class_domain]
    return out
