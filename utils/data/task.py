"""What every model script does before its own model.

:func:`prepare_task` reads the data folder, makes or reuses the validation
split, and checks the images (a broken training image is skipped with a line;
a broken query or gallery image stops the run).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from utils.data.images import check_images
from utils.data.layout import DataLayout, load_layout
from utils.data.split import Split, SplitParams, load_or_create_split
from utils.errors import KitError

log = logging.getLogger(__name__)


@dataclass
class Task:
    """Image lists of one run; names are what the matrices are indexed by."""

    layout: DataLayout
    split: Split
    full_train: bool
    train_paths: list[Path]
    train_labels: list[int]
    classes: list[str]  # identity of each label
    val_query: list[Path]
    val_gallery: list[Path]
    test_query: list[Path]
    test_gallery: list[Path]

    def names(self, which: str) -> list[str]:
        """Row/column names: data-relative paths for val, basenames for test."""
        paths = getattr(self, which)
        if which.startswith("val"):
            return [self.layout.rel(p) for p in paths]
        return [p.name for p in paths]

    def relevant(self, split: str) -> dict[str, list[str]] | None:
        """Ground truth of a split: val from the split, test from ground_truth.json if any."""
        if split == "val":
            return self.split.val_relevant()
        return self.layout.ground_truth


def readable_pairs(pairs: list[tuple[Path, int]], classes: list[str], ok: set[Path],
                   train_dir: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """The (image, label) pairs of readable images, labels renumbered over the identities that keep one;
    an identity left without any is named in a warning line.

    Raises:
        KitError: no training image can be read.
    """
    kept = [(p, c) for p, c in pairs if p in ok]
    if not kept:
        raise KitError(f"{train_dir}: none of its {len(pairs)} training images can be read (see the lines above; "
                       "git LFS pointers or a copy cut short?); fix or replace them")
    used = sorted({c for _, c in kept})
    if lost := [classes[c] for c in range(len(classes)) if c not in set(used)]:
        log.warning("%s: no readable training image of %d identit%s, left out of training: %s", train_dir, len(lost),
                    "y" if len(lost) == 1 else "ies", ", ".join(lost[:5]))
    new = {c: i for i, c in enumerate(used)}
    return [(p, new[c]) for p, c in kept], [classes[c] for c in used]


def prepare_task(data: str | Path, runs: str | Path, params: SplitParams, full_train: bool = False) -> Task:
    """Read the data, make or reuse the split, check every image once."""
    layout = load_layout(data)
    split = load_or_create_split(layout, params, runs)
    root = layout.root
    identities = split.training_identities(full_train)
    classes = sorted(identities)
    pairs = [(root / n, c) for c, ident in enumerate(classes) for n in identities[ident]]
    cache = Path(runs) / "image_check.json"  # verdicts shared by every model script on this data
    train_ok = set(check_images([p for p, _ in pairs], strict=False, what="training", cache=cache))
    pairs, classes = readable_pairs(pairs, classes, train_ok, root / "train")
    val_q = check_images([root / n for n in split.val_query], strict=False, what="validation query", cache=cache)
    val_g = check_images([root / n for n in split.val_gallery], strict=False, what="validation gallery", cache=cache)
    if not val_q or not val_g:
        raise KitError(f"{root / 'train'}: no readable validation {'query' if not val_q else 'gallery'} image among the "
                       f"held-out identities {sorted(split.val)} (see the lines above); fix or replace those images")
    test_q = check_images(layout.query, strict=True, what="query", cache=cache)
    test_g = check_images(layout.gallery, strict=True, what="gallery", cache=cache)
    log.info(
        "data %s: %d training images of %d identities%s; val %d queries x %d gallery; test %d x %d",
        root, len(pairs), len(classes), " (full train)" if full_train else "",
        len(val_q), len(val_g), len(test_q), len(test_g),
    )
    return Task(
        layout, split, full_train,
        [p for p, _ in pairs], [c for _, c in pairs], classes,
        val_q, val_g, test_q, test_g,
    )


def require_identities(task: Task, n_classes: int, what: str) -> None:
    """Training needs at least 2 identities with readable images once validation holds its own out.

    Raises:
        KitError: fewer than 2, naming the data's train/ and a fix that works (with 2 identities one is always held out).
    """
    if n_classes >= 2:
        return
    held, total = len(task.split.val), len(task.layout.train)
    fix = "lower --val-fraction or add identities" if held > 1 else "add identities (one is always held out)"
    raise KitError(f"{task.layout.root / 'train'}: {n_classes} training identity with readable images once the "
                   f"validation split holds out {held} of {total}; {what} needs at least 2: {fix}")
