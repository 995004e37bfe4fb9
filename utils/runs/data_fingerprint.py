"""What images a run was made from: a fingerprint of its files per split, recorded in meta.json and compared.

Names alone do not tell two data folders apart: a copy of the data with
gallery images swapped under the same names gives runs on the same lists.
So every model run records ``data_fingerprint`` in its ``meta.json``: per split
(``val``, ``test``) the number of files and two hashes over the sorted
``side/name`` of each query and gallery file:

- ``sizes``: name and size in bytes;
- ``stat``: name, size and modification time (``st_mtime_ns``).

Only ``os.stat`` is read, never the pixels: about 1 s for 200k images on a
warm disk (reading even 64 KiB of each would be ~13 GB). A file touched since
(same bytes, new mtime) therefore counts as other data; the message says which
case it is (sizes differ: other images; only times differ: touched, copied
without keeping times, or replaced by files of the same size) and to re-run
the model or restore the files (``cp -p`` / ``rsync -t`` keep the times).

Checks: preflight (BLOCKER), ``submit.py --data`` and ``visualize.py``
(refused) compare a run's ``test`` fingerprint with the data folder's;
``ensemble.py`` leaves out a member whose fingerprint differs from the other
members' (with ``--models``: refused) and records the members' fingerprint in
the fused run. A run written by an older kit records none: a warning only.

Example:
    >>> meta["data_fingerprint"] = task_fingerprint(task)
    >>> data_problem(meta, layout_fingerprint(load_layout(data)))   # '' when made from these images
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from utils.data.layout import DataLayout, load_layout
from utils.errors import KitError
from utils.runs.provenance import read_json

if TYPE_CHECKING:
    from utils.data.task import Task

log = logging.getLogger(__name__)

KEY = "data_fingerprint"  # the meta.json entry
NOT_RECORDED = "records no fingerprint of the images it was made from (an older kit wrote it); it cannot be told from a run of other images with the same names"


def split_fingerprint(query: Sequence[Path], gallery: Sequence[Path], query_names: Sequence[str], gallery_names: Sequence[str]) -> dict[str, Any]:
    """``{"files", "sizes", "stat"}`` of one split's query and gallery files (see the module doc)."""
    rows = sorted([(f"query/{n}", p) for n, p in zip(query_names, query)] + [(f"gallery/{n}", p) for n, p in zip(gallery_names, gallery)])
    sizes, stats = hashlib.sha256(), hashlib.sha256()
    for name, path in rows:
        st = os.stat(path)
        sizes.update(f"{name}|{st.st_size}\n".encode())
        stats.update(f"{name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return {"files": len(rows), "sizes": sizes.hexdigest()[:20], "stat": stats.hexdigest()[:20]}


def task_fingerprint(task: Task) -> dict[str, dict[str, Any]]:
    """A model run's ``data_fingerprint``: its ``val`` and ``test`` files, named as its matrices are."""
    return {split: split_fingerprint(getattr(task, f"{split}_query"), getattr(task, f"{split}_gallery"),
                                     task.names(f"{split}_query"), task.names(f"{split}_gallery"))
            for split in ("val", "test")}


def layout_fingerprint(layout: DataLayout) -> dict[str, Any]:
    """The ``test`` fingerprint of a data folder (DATA/test/query and DATA/test/gallery).

    Raises:
        KitError: a file vanished while it was read.
    """
    try:
        return split_fingerprint(layout.query, layout.gallery, [p.name for p in layout.query], [p.name for p in layout.gallery])
    except OSError as err:
        raise KitError(f"{err.filename}: cannot read ({err.strerror}); check the data folder") from None


def recorded(meta: dict[str, Any], split: str = "test") -> dict[str, Any] | None:
    """The fingerprint ``meta`` records for ``split``; None when it records none (an older kit)."""
    fp = meta.get(KEY)
    entry = fp.get(split) if isinstance(fp, dict) else None
    return entry if isinstance(entry, dict) and {"sizes", "stat"} <= entry.keys() else None


def difference(ours: dict[str, Any], theirs: dict[str, Any], what: str) -> str:
    """'' when two split fingerprints agree; else which kind of difference, with the fix."""
    if ours.get("files") != theirs.get("files") or ours["sizes"] != theirs["sizes"]:
        return f"made from other images of the same names than {what} (file sizes differ); re-run the model on this data"
    if ours["stat"] != theirs["stat"]:
        return (f"made from images of the same names and sizes as {what} but other modification times (touched, copied "
                f"without keeping times, or replaced); re-run the model or restore the files")
    return ""


def data_problem(meta: dict[str, Any], data_fp: dict[str, Any], what: str = "the data folder") -> str | None:
    """'' when the run's test images are the data folder's; the problem otherwise; None when not recorded."""
    ours = recorded(meta)
    return None if ours is None else difference(ours, data_fp, what)


def refuse_other_data(run_dir: Path, data_dir: Path) -> None:
    """``submit.py --data`` / ``visualize.py``: refuse a run made from other images than ``data_dir``'s (warn if unrecorded).

    Raises:
        KitError: the run's test fingerprint differs from the data folder's.
    """
    meta = read_json(Path(run_dir) / "meta.json") or {}
    ours = recorded(meta)
    if ours is None:
        log.warning("%s: %s", run_dir, NOT_RECORDED)
        return
    layout = load_layout(data_dir)
    problem = other_names(meta, layout) or difference(ours, layout_fingerprint(layout), str(data_dir))
    if problem:
        raise KitError(f"{run_dir}: {problem}")


def other_names(meta: dict[str, Any], layout: DataLayout) -> str:
    """'' when the run's test query and gallery names are the data folder's; else which side differs, with the fix."""
    names = (meta.get("splits") or {}).get("test")
    if not isinstance(names, dict):
        return ""
    for side, paths in (("query", layout.query), ("gallery", layout.gallery)):
        run_names, data_names = set(names.get(f"{side}_names") or []), {p.name for p in paths}
        if run_names != data_names:
            missing = sorted(data_names - run_names)[:3] or sorted(run_names - data_names)[:3]
            return (f"made from other data than {layout.root}: its test {side} names differ ({len(run_names)} in the "
                    f"run, {len(data_names)} in the folder; e.g. {missing[0]!r} is in one only); pass the --data it "
                    "was made from or re-run the model on this data")
    return ""


def _key(meta: dict[str, Any]) -> tuple | None:
    splits = [recorded(meta, s) for s in ("val", "test")]
    return None if None in splits else tuple(s["stat"] for s in splits)  # type: ignore[index]


def agreeing(members: Sequence[tuple[Path, dict[str, Any]]], named: bool) -> tuple[set[Path], list[tuple[Path, str]]]:
    """The members made from the same images as most of the others, and each one left out with why.

    A member that records no fingerprint agrees with any (a warning). Returns
    (the folders kept, the folders left out with why).

    Raises:
        KitError: ``named`` (``--models``) and a member differs; or two equally large groups differ.
    """
    keys = {d: _key(meta) for d, meta in members}
    for d, k in keys.items():
        if k is None:
            log.warning("%s: %s", d, NOT_RECORDED)
    counts = Counter(k for k in keys.values() if k is not None)
    if len(counts) <= 1:
        return set(keys), []
    (top, n), (_, n2) = counts.most_common(2)
    meta_of = dict(members)
    ref = next(d for d, k in keys.items() if k == top)
    odd = [(d, _why(meta_of[d], meta_of[ref], ref)) for d, k in keys.items() if k is not None and k != top]
    if named or n == n2:
        d, why = odd[0]
        raise KitError(f"{d}: {why}; choose runs made from the same images{'' if named else ' with --models'}")
    for d, why in odd:
        log.warning("leaving out %s: %s", d, why)
    return {d for d, k in keys.items() if k is None or k == top}, odd


def _why(meta: dict[str, Any], ref_meta: dict[str, Any], ref: Path) -> str:
    for split in ("test", "val"):
        why = difference(recorded(meta, split), recorded(ref_meta, split), f"{ref.name} ({split})")  # type: ignore[arg-type]
        if why:
            return why
    return f"made from other images than {ref.name}"


def fused_fingerprint(metas: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The ``data_fingerprint`` entry of a fused run: its members' (they agree), or nothing when none records one."""
    fp = next((m[KEY] for m in metas if _key(m) is not None), None)
    return {KEY: fp} if fp is not None else {}
