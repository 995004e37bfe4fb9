"""The deterministic validation split of docs/design.md, written once to runs/split.json.

A fraction of the training identities is held out. For each held-out identity
some images become validation queries and the rest validation gallery; the
validation gallery of all held-out identities together is what every
validation query is ranked against (the others act as distractors). With a
``domains.csv``, queries come from the query domain and gallery images from
the others. Models train only on the remaining identities; ``--full-train``
trains on all of them for the final test matrix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from utils.atomic import atomic_write_json
from utils.data.layout import DataLayout
from utils.errors import KitError

log = logging.getLogger(__name__)


def identity_of(name: str) -> str:
    """The identity folder of a split name (``train/<identity>/<image>``).

    Raises:
        KitError: the name does not have that shape.
    """
    parts = name.split("/")
    if len(parts) < 3:
        raise KitError(f"validation name {name!r} is not train/<identity>/<image>; re-run the model scripts with this kit")
    return parts[1]


@dataclass(frozen=True)
class SplitParams:
    """What decides the split; a saved split is reused only for equal params."""

    seed: int = 0
    val_fraction: float = 0.2  # share of identities held out for validation
    query_domain: str = "real"  # domains.csv value that queries come from


@dataclass
class Split:
    """Names are paths relative to the data root, e.g. ``train/alice/1.jpg``."""

    params: SplitParams
    fingerprint: str  # hash of the training file list; a changed dataset is caught
    train: dict[str, list[str]]  # identity -> images used for training
    val: dict[str, list[str]]  # held-out identity -> all its images
    val_query: list[str]
    val_gallery: list[str]

    def identity_of(self, name: str) -> str:
        """The identity folder of a training-set name."""
        return identity_of(name)

    def val_relevant(self) -> dict[str, list[str]]:
        """Ground truth of the validation split: query -> gallery images of its identity."""
        by_id: dict[str, list[str]] = {}
        for g in self.val_gallery:
            by_id.setdefault(self.identity_of(g), []).append(g)
        return {q: by_id.get(self.identity_of(q), []) for q in self.val_query}

    def training_identities(self, full_train: bool) -> dict[str, list[str]]:
        """Identity -> images to train on (held-out identities too with ``full_train``)."""
        if not full_train:
            return dict(self.train)
        return dict(sorted({**self.train, **self.val}.items()))


def _fingerprint(layout: DataLayout) -> str:
    h = hashlib.sha256()
    for ident, paths in layout.train.items():
        for p in paths:
            h.update(f"{ident}/{p.name}\n".encode())
    return h.hexdigest()[:16]


def check_domains(layout: DataLayout, query_domain: str) -> None:
    """A ``domains.csv`` that names no training image, or no training image of ``query_domain``, stops here:
    the split would silently halve every identity instead (queries of both domains). Training images it
    leaves out get a warning line: they are neither validation queries nor gallery.

    Raises:
        KitError: no path of the file is a training image, or none of those has the query domain.
    """
    if not layout.domains:
        return
    csv_path = layout.root / "domains.csv"
    train = [layout.rel(p) for paths in layout.train.values() for p in paths]
    named = [n for n in train if n in layout.domains]
    if not named:
        raise KitError(f"{csv_path}: none of its {len(layout.domains)} paths names a training image; paths are "
                       f"relative to the data folder, like {train[0]!r}: fix them or remove the file")
    seen = sorted({layout.domains[n] for n in named})
    if query_domain not in seen:
        raise KitError(f"{csv_path}: no training image has the domain {query_domain!r} (--query-domain); its "
                       f"training images' domains are {seen}: pass --query-domain with one of them or fix the file")
    if missing := [n for n in train if n not in layout.domains]:
        log.warning("%s: %d training image(s) have no row (e.g. %r); a held-out identity with both domains "
                    "leaves them out of validation", csv_path, len(missing), missing[0])


def make_split(layout: DataLayout, params: SplitParams) -> Split:
    """Compute the split (pure: same layout and params, same split).

    Raises:
        KitError: too few identities for ``params.val_fraction``, or a ``domains.csv`` that
            :func:`check_domains` refuses.
    """
    if not 0.0 < params.val_fraction < 1.0:
        raise KitError(f"--val-fraction must be in (0, 1), got {params.val_fraction}")
    rng = random.Random(params.seed)
    names = {ident: [layout.rel(p) for p in paths] for ident, paths in layout.train.items()}
    eligible = [i for i, imgs in names.items() if len(imgs) >= 2]
    n_val = max(1, round(params.val_fraction * len(names)))
    if len(eligible) < 2 or n_val >= len(names):
        raise KitError(
            f"{layout.root / 'train'}: {len(names)} identities ({len(eligible)} with 2+ images) "
            f"cannot give a validation split of {params.val_fraction}; add identities or lower --val-fraction"
        )
    check_domains(layout, params.query_domain)
    held = sorted(rng.sample(eligible, min(n_val, len(eligible))))
    val_query, val_gallery = [], []
    for ident in held:
        imgs = names[ident]
        in_domain = [n for n in imgs if layout.domains.get(n) == params.query_domain]
        other = [n for n in imgs if n in layout.domains and layout.domains[n] != params.query_domain]
        if in_domain and other:
            queries, gallery = in_domain, other
        else:  # no domains, or this identity lacks one side: split its images in half
            shuffled = imgs[:]
            rng.shuffle(shuffled)
            cut = max(1, len(shuffled) // 2)
            queries, gallery = sorted(shuffled[:cut]), sorted(shuffled[cut:])
        val_query += queries
        val_gallery += gallery
    return Split(
        params=params,
        fingerprint=_fingerprint(layout),
        train={i: names[i] for i in names if i not in held},
        val={i: names[i] for i in held},
        val_query=val_query,
        val_gallery=val_gallery,
    )


def read_saved_split(path: Path) -> dict:
    """``runs/split.json`` as a dict; a file cut short, emptied or edited into something else stops with one line.

    Raises:
        KitError: the file is not a JSON object (the split is made again from the same flags once it is deleted).
    """
    try:
        saved = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:  # ValueError: bad JSON or not UTF-8
        problem = f"not valid JSON ({err})" if not isinstance(err, RecursionError) else "nested too deep to read"
    else:
        if isinstance(saved, dict):
            return saved
        problem = f"expected a JSON object, got {type(saved).__name__}"
    raise KitError(f"{path}: {problem}; delete it and run again: the same --seed/--val-fraction/--query-domain "
                   "make the same split")


def load_or_create_split(layout: DataLayout, params: SplitParams, runs_dir: str | Path) -> Split:
    """Reuse ``runs/split.json`` if it matches ``params`` and the data; else write it.

    Raises:
        KitError: a saved split was made with other params or other data (training files, or a
            ``domains.csv`` that moves images between validation query and gallery), or is not a JSON object.
    """
    path = Path(runs_dir) / "split.json"
    split = make_split(layout, params)
    if path.is_file():
        saved = read_saved_split(path)
        if saved.get("params") != asdict(params):
            raise KitError(
                f"{path}: made with {saved.get('params')}, this run asks for {asdict(params)}; "
                "pass the same --seed/--val-fraction/--query-domain, or use another --runs folder"
            )
        if saved.get("fingerprint") != split.fingerprint:
            raise KitError(
                f"{path}: made from another training set; use another --runs folder for this data"
            )
        if (saved.get("val_query"), saved.get("val_gallery")) != (split.val_query, split.val_gallery):
            raise KitError(
                f"{path}: made with another {layout.root / 'domains.csv'} (the validation queries or gallery differ), "
                "so the runs already there were scored on another validation split; use another --runs folder "
                "for this data"
            )
        return split
    atomic_write_json(path, asdict(split))
    return split
