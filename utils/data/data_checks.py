"""Preflight checks of a data folder: layout and counts, unreadable, near-empty and duplicate images.

Each check adds lines to a :class:`~utils.checklist.Checklist`. Unreadable
query or gallery images are blockers (a submission needs every one); broken
training images, near-empty images and duplicate files are warnings.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from utils.checklist import Checklist
from utils.data.images import ImageError, load_image, scan_folder
from utils.data.layout import MIN_GALLERY, DataLayout, load_layout, stray_training_files
from utils.data.split import SplitParams, make_split
from utils.errors import KitError
from utils.file_hash import file_sha256
from utils.progress import track

NEAR_EMPTY_STD = 2.0  # pixel standard deviation (0-255) below which an image is blank or nearly so


def _examples(entries: list[tuple[Path, str]], root: Path) -> str:
    return "; ".join(f"{p.relative_to(root).as_posix()!r} ({why})" for p, why in entries[:3]) + (" ..." if len(entries) > 3 else "")


def check_files(cl: Checklist, data: Path) -> None:
    """Every file of the query and gallery folders counted: one the kit will not read is a blocker
    (the server wants every query); hidden or system files are a warning; unknown training files too."""
    for what in ("query", "gallery"):
        try:
            listing = scan_folder(data / "test" / what)
        except KitError:
            continue  # check_layout names the missing folder
        bad = listing.unknown + listing.broken_links
        counts = f"{listing.n_entries} entries, {len(listing.images)} images the kit reads"
        if bad:
            cl.block("data", f"{what} files", f"{counts}; {len(bad)} it will not: {_examples(bad, data)}; "
                     "convert or rename them, or move them out")
        elif listing.ignored:
            names = ", ".join(repr(p.name) for p in listing.ignored[:3])
            cl.warn("data", f"{what} files", f"{counts}; {len(listing.ignored)} hidden, system or sub-folder entries ignored: {names}")
        else:
            cl.ok("data", f"{what} files", f"{counts}: every file is an image")
    train = data / "train"
    if not train.is_dir():
        return  # check_layout names it
    skipped = [e for d in sorted(train.iterdir()) if d.is_dir() and not d.name.startswith(".") for e in scan_folder(d).unknown]
    skipped += [(p, "outside an identity folder") for p in stray_training_files(train)]
    if skipped:
        cl.warn("data", "training files", f"{len(skipped)} not used for training: {_examples(skipped, data)}")


def check_layout(cl: Checklist, data: Path) -> DataLayout | None:
    """The folder layout and its counts; ``None`` when it cannot be read (a blocker)."""
    try:
        layout = load_layout(data)
    except KitError as err:
        cl.block("data", "layout", str(err))
        return None
    n_train = sum(len(v) for v in layout.train.values())
    cl.ok("data", "layout", f"{data}: train/, test/query/, test/gallery/")
    cl.ok("data", "identities", f"{len(layout.train)} identities, {n_train} training images")
    single = sorted(i for i, imgs in layout.train.items() if len(imgs) < 2)
    if single:
        cl.warn("data", "identities", f"{len(single)} with a single training image (no validation pair), e.g. {single[:3]}")
    if layout.domains:
        per = Counter(layout.domains.get(layout.rel(p), "not in domains.csv") for imgs in layout.train.values() for p in imgs)
        detail = ", ".join(f"{d} {n}" for d, n in sorted(per.items()))
        (cl.warn if "not in domains.csv" in per else cl.ok)("data", "domains", f"training images per domain: {detail}")
    else:
        cl.ok("data", "domains", "no domains.csv (optional): validation identities are split in half")
    cl.ok("data", "queries", f"{len(layout.query)} images")
    cl.ok("data", "gallery", f"{len(layout.gallery)} images (a top-10 needs >= {MIN_GALLERY})")
    if layout.ground_truth is not None:
        cl.ok("data", "ground truth", f"test/ground_truth.json: {len(layout.ground_truth)} queries (rehearsal data)")
    return layout


def check_images(cl: Checklist, layout: DataLayout) -> None:
    """Decode every image once (reduced): unreadable ones, and near-empty ones (blank pixels)."""
    train = [p for imgs in layout.train.values() for p in imgs]
    for what, paths, needed in (("training", train, False), ("query", layout.query, True), ("gallery", layout.gallery, True)):
        bad, blank = [], []
        for p in track(paths, f"decoding {what} images"):
            try:
                img = load_image(p, max_side=256)
            except ImageError as err:
                bad.append(f"{layout.rel(p)} ({err.problem})")
                continue
            if float(np.asarray(img).std()) < NEAR_EMPTY_STD:
                blank.append(layout.rel(p))
        if not bad:
            cl.ok("images", f"{what} readable", f"all {len(paths)} decode")
        elif needed:
            cl.block("images", f"{what} readable", f"{len(bad)} of {len(paths)} unreadable (a submission needs every one), e.g. {'; '.join(bad[:3])}")
        else:
            cl.warn("images", f"{what} readable", f"{len(bad)} of {len(paths)} unreadable (skipped in training), e.g. {'; '.join(bad[:3])}")
        if blank:
            cl.warn("images", f"{what} near-empty", f"{len(blank)} with pixel std < {NEAR_EMPTY_STD:g} (blank?), e.g. {blank[:3]}")


def check_duplicates(cl: Checklist, layout: DataLayout) -> None:
    """Files with the same bytes: within the queries or gallery, a query also in the gallery,
    or one image under two training identities (label noise)."""
    kinds = {p: "query" for p in layout.query} | {p: "gallery" for p in layout.gallery}
    kinds |= {p: f"train/{ident}" for ident, imgs in layout.train.items() for p in imgs}
    by_sha: dict[str, list[Path]] = {}
    for p in track(list(kinds), "hashing images"):
        try:
            by_sha.setdefault(file_sha256(p), []).append(p)
        except OSError:
            continue  # unreadable files are reported by check_images
    groups = [ps for ps in by_sha.values() if len(ps) > 1]
    if not groups:
        cl.ok("images", "duplicates", f"no two of {len(kinds)} files have the same bytes")
        return
    counts: Counter[str] = Counter()
    for ps in groups:
        ks = {kinds[p] for p in ps}
        if ks == {"query"} or ks == {"gallery"}:
            counts[f"within {ks.pop()}"] += 1
        elif {"query", "gallery"} <= ks:
            counts["query = gallery"] += 1
        elif len(ks) > 1:
            counts["across identities"] += 1
        else:
            counts["within an identity"] += 1
    e = groups[0]
    cl.warn("images", "duplicates", f"{len(groups)} sets of identical files ({', '.join(f'{k} {n}' for k, n in sorted(counts.items()))}), "
            f"e.g. {' = '.join(layout.rel(p) for p in e[:3])}")


def split_params_of(runs: Path | None) -> tuple[SplitParams, str]:
    """The split parameters the model scripts will use: those of ``runs/split.json`` if any, else the defaults."""
    path = Path(runs) / "split.json" if runs is not None else None
    if path is None or not path.is_file():
        return SplitParams(), "default --seed/--val-fraction/--query-domain"
    try:
        return SplitParams(**json.loads(path.read_text())["params"]), f"the parameters of {path}"
    except (OSError, ValueError, TypeError, KeyError):
        return SplitParams(), f"default parameters ({path} unreadable)"


def check_split(cl: Checklist, layout: DataLayout, runs: Path | None = None) -> None:
    """The validation split every model script makes (the same function): data it refuses is a blocker."""
    params, source = split_params_of(runs)
    try:
        split = make_split(layout, params)
    except KitError as err:
        cl.block("data", "validation split", f"{err} (every model script refuses this data)")
        return
    cl.ok("data", "validation split", f"{len(split.val)} held-out identities, {len(split.val_query)} queries x "
          f"{len(split.val_gallery)} gallery ({source})")


def matrix_shapes(layout: DataLayout | None, runs: Path | None = None) -> list[tuple[int, int]]:
    """(queries, gallery) of each split a model run writes: val (from the split the scripts will make) and test."""
    if layout is None:
        return []
    shapes = [(len(layout.query), len(layout.gallery))]
    try:
        split = make_split(layout, split_params_of(runs)[0])
    except KitError:
        return shapes  # check_split reports it
    return [(len(split.val_query), len(split.val_gallery)), *shapes]


def check_data(cl: Checklist, data: Path, runs: Path | None = None) -> DataLayout | None:
    """Every data check; the layout when it could be read."""
    check_files(cl, data)
    layout = check_layout(cl, data)
    if layout is not None:
        check_split(cl, layout, runs)
        check_images(cl, layout)
        check_duplicates(cl, layout)
    return layout
