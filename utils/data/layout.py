"""The competition folder layout of docs/design.md, checked once.

    DATA/train/<identity>/<image>
    DATA/test/query/<image>
    DATA/test/gallery/<image>
    DATA/domains.csv               optional: path,domain
    DATA/test/ground_truth.json    optional: {query: [gallery, ...]}
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from utils.data.images import is_ignored_name, list_images
from utils.errors import KitError

log = logging.getLogger(__name__)

MIN_GALLERY = 10  # a submission lists 10 distinct gallery images per query


@dataclass
class DataLayout:
    """Paths and names of one dataset folder."""

    root: Path
    train: dict[str, list[Path]]  # identity -> images, both sorted
    query: list[Path]
    gallery: list[Path]
    domains: dict[str, str] = field(default_factory=dict)  # path relative to root -> domain
    ground_truth: dict[str, list[str]] | None = None

    def rel(self, path: Path) -> str:
        """Path relative to the data root, with forward slashes (the split's names)."""
        return path.relative_to(self.root).as_posix()


def read_domains(path: Path) -> dict[str, str]:
    """Read ``domains.csv`` (``path,domain``; paths relative to the data root)."""
    out: dict[str, str] = {}
    reader = csv.DictReader(io.StringIO(read_user_text(path), newline=""))
    if reader.fieldnames is None or not {"path", "domain"} <= set(reader.fieldnames):
        raise KitError(f"{path}: expected a header 'path,domain', got {reader.fieldnames}")
    for i, row in enumerate(reader, start=2):
        if not row["path"] or not row["domain"]:
            raise KitError(f"{path}:{i}: empty path or domain")
        out[row["path"].strip().replace("\\", "/")] = row["domain"].strip()
    return out


def read_user_text(path: Path) -> str:
    """A text file the user wrote: UTF-8, with or without the byte-order mark spreadsheets and Notepad put first.

    Raises:
        KitError: the file is not UTF-8 text.
    """
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise KitError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None


def read_ground_truth(path: Path) -> dict[str, list[str]]:
    """Read ``test/ground_truth.json`` (``{query: [gallery names]}``)."""
    try:
        data = json.loads(read_user_text(path))
    except json.JSONDecodeError as err:
        raise KitError(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise KitError(f"{path}: not valid JSON (nested too deep to read)") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise KitError(f"{path}: expected {{query_name: [gallery names]}}")
    return {str(k): [str(x) for x in v] for k, v in data.items()}


def stray_training_files(train_dir: Path) -> list[Path]:
    """Files directly in ``train/`` (not hidden, not junk): no identity, so no training image."""
    return [p for p in sorted(train_dir.iterdir()) if not p.is_dir() and not is_ignored_name(p.name)]


def load_layout(root: str | Path) -> DataLayout:
    """Read and check a data folder.

    A training file that is a broken symbolic link or not an image the kit reads
    (:func:`~utils.data.images.extension_problem`) is skipped with a warning
    line; one among the query or gallery files stops here.

    Raises:
        KitError: a folder is missing or empty, the gallery has fewer than 10
            images, a query or gallery link points nowhere or loops, or a
            query or gallery file has an extension the kit does not read.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise KitError(f"{root}: a file, not a folder; pass --data the folder that holds train/ and test/")
    if not root.is_dir():
        raise KitError(f"{root}: data folder not found (pass --data DATA)")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise KitError(f"{train_dir}: folder not found; expected DATA/train/<identity>/<image>")
    stray = stray_training_files(train_dir)
    if stray:
        log.warning("%s: %d file(s) outside an identity folder, not used for training (move them into train/<identity>/): %s",
                    train_dir, len(stray), ", ".join(repr(p.name) for p in stray[:5]))
    train = {}
    for d in sorted(p for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        imgs = list_images(d, what="training", broken_links="skip", unknown="skip")
        if imgs:
            train[d.name] = imgs
    if not train:
        raise KitError(f"{train_dir}: no identity folders with images")
    query = list_images(root / "test" / "query", what="query")
    gallery = list_images(root / "test" / "gallery", what="gallery")
    if not query:
        raise KitError(f"{root / 'test' / 'query'}: no images")
    if len(gallery) < MIN_GALLERY:
        raise KitError(f"{root / 'test' / 'gallery'}: {len(gallery)} images; a top-10 needs at least {MIN_GALLERY}")
    domains = read_domains(root / "domains.csv") if (root / "domains.csv").is_file() else {}
    gt_path = root / "test" / "ground_truth.json"
    ground_truth = read_ground_truth(gt_path) if gt_path.is_file() else None
    layout = DataLayout(root, train, query, gallery, domains, ground_truth)
    if ground_truth is not None:
        check_ground_truth(layout, gt_path)
    return layout


def unanswered_queries(layout: DataLayout) -> list[str]:
    """Query names whose ground truth names no image of the gallery folder (they score as misses)."""
    truth, gallery = layout.ground_truth or {}, {p.name for p in layout.gallery}
    return [p.name for p in layout.query if not gallery.intersection(truth.get(p.name, []))]


def check_ground_truth(layout: DataLayout, path: Path) -> None:
    """Ground truth written for other files stops here; queries it leaves without an answer get a warning line.

    Raises:
        KitError: a key of ``ground_truth.json`` is not a file name in ``test/query`` (the scores would be wrong).
    """
    queries = {p.name for p in layout.query}
    unknown = sorted(k for k in layout.ground_truth or {} if k not in queries)
    if unknown:
        raise KitError(f"{path}: {len(unknown)} of {len(layout.ground_truth or {})} query names are not files in "
                       f"test/query, e.g. {unknown[:3]} (names are file basenames as on disk); fix the names, "
                       "or delete the file (it only scores rehearsal data)")
    missing = unanswered_queries(layout)
    if missing:
        log.warning("%s: %d of %d queries have no right answer in test/gallery (they score as misses), e.g. %s",
                    path, len(missing), len(layout.query), missing[:3])
