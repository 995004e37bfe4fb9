"""Look at a run's rankings: each query beside its top-K, right answers framed green, wrong ones red.

    # every run works, the ensemble included; 20 queries of each split (val and test)
    python visualize.py --run runs/ensemble --data DATA
    # the 30 validation queries whose first right answer comes latest
    python visualize.py --run runs/resnet --data DATA --split val --worst --queries 30
    # every test query, top-5, into a folder of your choice
    python visualize.py --run runs/facenet --data DATA --split test --queries 0 --k 5 --out look/facenet
    # the domain gap: a 2-D map of query and gallery embeddings, before and after an adapter
    python visualize.py --run runs/dlib --gap
    python visualize.py --run runs/dlib_adapted --gap --gap-method tsne
    # the detected face boxes on the images of a face run
    python visualize.py --run runs/dlib --boxes --split val --queries 10

Writes ``OUT/<split>/<row>_<query>.png`` (one per query, all the same pixel
size: the query, then ranks 1..K, each fitted into a ``--thumb-px`` square)
and ``OUT/<split>.html`` linking them; OUT defaults to ``RUN/visual``.
Validation truth comes from the names (``train/<identity>/<image>``: same
identity = right); test truth from ``DATA/test/ground_truth.json`` when the
data has one (rehearsal data), otherwise test frames are grey. ``--data``
defaults to the data folder recorded in the run's meta.json. A caption run
(``infer_caption_match.py``, which writes ``RUN/gallery_captions.json``) gets each
gallery image's caption under its tile (``--caption-lines``) and on the page.

``--gap`` and ``--boxes`` draw instead of the panels (utils/runs/gap.py):
``--gap`` writes ``OUT/gap_<method>.png``, every query (real) and gallery
(synthetic) embedding of the chosen splits on one 2-D map (colour: query or
gallery; marker: split), titled with the mean cosine of the right pairs and of
the wrong ones per split with a ground truth (for any run that keeps
embeddings: a model run of a script that embeds, in either run form).
``--boxes`` writes ``OUT/boxes/<split>/`` and ``OUT/boxes/<split>.html``: the
first ``--queries`` queries and gallery images of a face run with the face box
its detector found (magenta) and the stage that found it, read from the face
crop cache of ``runs/face_cache/`` (detected again only on a cache miss).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np
from PIL import Image
from rich.table import Table

from utils.config import add_config_args, config_from_args
from utils.data.images import load_image
from utils.data.layout import read_ground_truth
from utils.data.split import identity_of
from utils.device import pick_device
from utils.errors import KitError, run_cli
from utils.faces.cascade import MTCNN_STAGES
from utils.faces.pipeline import FACE_FIELDS, FacePipeline
from utils.logs import console, setup_logging
from utils.progress import track
from utils.runs.data_fingerprint import refuse_other_data
from utils.runs.gap import (
    GAP_METHODS,
    MapSet,
    draw_gap_map,
    load_run_embeddings,
    means_line,
    pair_means,
    project_2d,
    right_pairs,
    subsample,
)
from utils.runs.metrics import relevance_matrix
from utils.runs.provenance import read_json
from utils.runs.similarity_io import SPLITS, SimMatrix, load_run
from utils.runs.topk import topk
from utils.runs.visual import PageRow, PanelLayout, Tile, draw_face_box, draw_panel, save_png, thumbnail, write_page

log = logging.getLogger("visualize")

CAPTIONS_FILE = "gallery_captions.json"  # infer_caption_match.py: {split: {gallery name: caption}}
MAX_THUMB_PX = 1024  # a panel is (K+1) thumbnails wide: 100000 px asked for ~30 GB of memory before the kernel killed it


# ----------------------------------------------------------------------------
# defaults: every field is a --flag (kebab-case)
@dataclass
class Config:
    run: Path = field(default=Path("runs/ensemble"), metadata={"help": "run folder (runs/<model>/ or runs/ensemble)", "metavar": "DIR"})
    data: Path | None = field(default=None, metadata={"help": "data folder (default: the one in the run's meta.json)", "metavar": "DIR"})
    split: list[str] = field(default_factory=lambda: list(SPLITS), metadata={"help": "splits to draw", "choices": list(SPLITS)})
    queries: int = field(default=20, metadata={"help": "queries per split (0 = all), in row order or worst first with --worst", "metavar": "N"})
    worst: bool = field(default=False, metadata={"help": "draw the queries whose first right answer ranks lowest (needs a ground truth)"})
    k: int = field(default=10, metadata={"help": "results shown per query"})
    thumb_px: int = field(default=128, metadata={"help": f"side of each thumbnail, 16 to {MAX_THUMB_PX}; a PNG is (K+1) thumbnails wide"})
    caption_lines: int = field(default=3, metadata={"help": "lines of a caption run's gallery caption under each result (0 = none)", "metavar": "N"})
    gap: bool = field(default=False, metadata={"help": "draw the 2-D map of query and gallery embeddings (OUT/gap_<method>.png) instead of the panels"})
    gap_method: str = field(default="pca", metadata={"help": "projection of --gap: pca (fast, keeps the distance between the domains) or tsne (scikit-learn, random_state 0)", "choices": list(GAP_METHODS)})
    gap_points: int = field(default=1000, metadata={"help": "--gap: most points drawn per image set (0 = all; the means use every pair)", "metavar": "N"})
    boxes: bool = field(default=False, metadata={"help": "draw a face run's detected face boxes on its images (OUT/boxes/) instead of the panels"})
    device: str = field(default="auto", metadata={"help": "--boxes: device of the face detector when its cache misses (auto, cpu, cuda or cuda:N)"})
    out: Path | None = field(default=None, metadata={"help": "output folder (default: RUN/visual)", "metavar": "DIR"})
    verbose: bool = field(default=False, metadata={"help": "debug logging"})
# ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, Config)
    return parser


def data_folder(cfg: Config, meta: dict) -> Path:
    """``--data``, else the data folder the run recorded."""
    if cfg.data is not None:
        return Path(cfg.data)
    recorded = (meta.get("config") or {}).get("data")
    if not recorded:
        raise KitError(f"{cfg.run / 'meta.json'}: records no data folder; pass --data DATA")
    return Path(recorded)


def image_paths(split: str, query_names: Sequence[str], gallery_names: Sequence[str], data: Path) -> tuple[list[Path], list[Path]]:
    """Query and gallery files: val names are data-relative, test names are basenames (the paths a model script embedded)."""
    if split == "val":
        return [data / n for n in query_names], [data / n for n in gallery_names]
    if split == "test":
        return [data / "test" / "query" / n for n in query_names], [data / "test" / "gallery" / n for n in gallery_names]
    raise KitError(f"--split {split!r}: choose one of {SPLITS}")


def relevance(split: str, m: SimMatrix, data: Path) -> np.ndarray | None:
    """Boolean (queries, gallery) right answers; None when the split has no ground truth."""
    if split == "val":
        q_id = np.array([identity_of(n) for n in m.query_names])
        g_id = np.array([identity_of(n) for n in m.gallery_names])
        return q_id[:, None] == g_id[None, :]
    if split == "test":
        gt = data / "test" / "ground_truth.json"
        return relevance_matrix(m.query_names, m.gallery_names, read_ground_truth(gt)) if gt.is_file() else None
    raise KitError(f"--split {split!r}: choose one of {SPLITS}")


def first_right_rank(sim: np.ndarray, rel: np.ndarray) -> np.ndarray:
    """1-based rank of each query's first right answer in the whole gallery; 0 if it has none."""
    out = np.zeros(len(sim), dtype=np.int64)
    for i in range(len(sim)):
        if rel[i].any():
            order = np.argsort(-sim[i], kind="stable")  # ties: lower column first, as topk
            out[i] = int(np.argmax(rel[i][order])) + 1
    return out


def pick_queries(n_queries: int, ranks: np.ndarray | None, cfg: Config, split: str) -> list[int]:
    """Row indices to draw: row order, or latest first right answer first with --worst."""
    rows = list(range(n_queries))
    if cfg.worst:
        if ranks is None:
            raise KitError(f"--worst needs a ground truth; the {split} split has none (no DATA/test/ground_truth.json): use --split val")
        rows.sort(key=lambda i: (-ranks[i], i))  # a query with no right answer anywhere (rank 0) goes last
    return rows[: cfg.queries] if cfg.queries else rows


def _png_name(row: int, query: str) -> str:
    return f"{row:05d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', query)[-80:]}.png"


def read_captions(run_dir: Path) -> dict[str, dict[str, str]]:
    """``RUN/gallery_captions.json`` (``{split: {gallery name: caption}}``, written by a caption run); {} when absent.

    Raises:
        KitError: the file is not that JSON object.
    """
    path = run_dir / CAPTIONS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise KitError(f"{path}: not valid JSON ({err}); re-run infer_caption_match.py") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) and all(isinstance(c, str) for c in v.values()) for v in data.values()):
        raise KitError(f"{path}: expected {{split: {{gallery name: caption}}}}; re-run infer_caption_match.py")
    return data


def draw_split(split: str, m: SimMatrix, data: Path, cfg: Config, out: Path, captions: dict[str, str] | None = None) -> tuple[Path, int, bool]:
    """Every chosen query's panel PNG (with each result's caption when ``captions`` has any) and the split's HTML page."""
    q_paths, g_paths = image_paths(split, m.query_names, m.gallery_names, data)
    rel = relevance(split, m, data)
    ranks = first_right_rank(m.sim, rel) if rel is not None else None
    rows = pick_queries(len(m.query_names), ranks, cfg, split)
    k = min(cfg.k, len(m.gallery_names))
    captions = captions or {}
    layout = PanelLayout(k=k, thumb_px=cfg.thumb_px, text_lines=cfg.caption_lines if captions else 0)
    top = topk(m.sim[rows], k) if rows else np.zeros((0, k), dtype=np.int64)
    thumbs: dict[Path, Image.Image] = {}

    def thumb(path: Path) -> Image.Image:
        if path not in thumbs:
            thumbs[path] = thumbnail(load_image(path, max_side=2 * cfg.thumb_px), cfg.thumb_px)
        return thumbs[path]

    page_rows = []
    for row, cols in track(list(zip(rows, top.tolist())), f"{split}: drawing"):
        results = [
            Tile(thumb(g_paths[j]), m.gallery_names[j], f"#{r + 1}  {m.sim[row, j]:.3f}", None if rel is None else bool(rel[row, j]),
                 captions.get(m.gallery_names[j], ""))
            for r, j in enumerate(cols)
        ]
        details = tuple(f"#{r + 1} {m.gallery_names[j]}: {captions.get(m.gallery_names[j], '(no caption)')}" for r, j in enumerate(cols)) if captions else ()
        if ranks is None:
            note = "no ground truth"
        elif ranks[row] == 0:
            note = "no right answer in the gallery"
        else:
            note = f"first right answer at rank {ranks[row]}"
        query = Tile(thumb(q_paths[row]), m.query_names[row], "query", None)
        png = out / split / _png_name(row, m.query_names[row])
        save_png(draw_panel(query, results, layout), png)
        page_rows.append(PageRow(f"{split}/{png.name}", m.query_names[row], note, details))
    order = "latest first right answer first" if cfg.worst else "row order"
    intro = (f"{len(page_rows)} of {len(m.query_names)} queries ({order}), top-{k} each; "
             "frames: green = right, red = wrong, grey = no ground truth.")
    page = write_page(out / f"{split}.html", f"{cfg.run.name}: {split}", intro, page_rows)
    return page, len(page_rows), rel is not None


def split_truth(split: str, query_names: Sequence[str], gallery_names: Sequence[str], data: Path) -> dict[str, list[str]] | None:
    """Right gallery names per query: val by identity, test from ground_truth.json (None without one)."""
    if split == "val":
        by_identity: dict[str, list[str]] = {}
        for g in gallery_names:
            by_identity.setdefault(identity_of(g), []).append(g)
        return {q: by_identity.get(identity_of(q), []) for q in query_names}
    if split == "test":
        gt = data / "test" / "ground_truth.json"
        return read_ground_truth(gt) if gt.is_file() else None
    raise KitError(f"--split {split!r}: choose one of {SPLITS}")


def draw_gap(cfg: Config, splits: Sequence[str], data: Path, out: Path) -> tuple[Path, str]:
    """The 2-D map of the run's query and gallery embeddings of ``splits``; its path and title."""
    rng = np.random.default_rng(0)
    chunks, lines = [], []
    for split in splits:
        e = load_run_embeddings(cfg.run, split)
        truth = split_truth(split, e.query_names, e.gallery_names, data)
        if truth is not None:
            lines.append(means_line(split, *pair_means(e.query, e.gallery, right_pairs(e.query_names, e.gallery_names, truth))))
        for side, x in (("query", e.query), ("gallery", e.gallery)):
            chunks.append((split, side, x[subsample(len(x), cfg.gap_points, rng)]))
    xy = project_2d(np.concatenate([c[2] for c in chunks]), cfg.gap_method)
    ends = np.cumsum([len(c[2]) for c in chunks])
    sets = [MapSet(xy[end - len(x) : end], split, side) for (split, side, x), end in zip(chunks, ends)]
    title = "\n".join([f"{cfg.run.name}: {cfg.gap_method} map of {len(xy)} embeddings (query = real, gallery = synthetic)",
                        *(lines or ["no ground truth: no mean cosines"])])
    return draw_gap_map(sets, title, out / f"gap_{cfg.gap_method}.png"), title


def face_settings(run_dir: Path, meta: dict) -> SimpleNamespace:
    """The face settings of a face run, or of the source of an adapted run (``config.source``).

    Raises:
        KitError: neither run is a face run.
    """
    config = meta.get("config") or {}
    if any(f not in config for f in FACE_FIELDS) and config.get("source"):
        source = read_json(run_dir.parent / str(config["source"]) / "meta.json") or {}
        config = source.get("config") or {}
    # runs made before --detector-rotations / --detector-rotated-stages / --face-colour: as train_face_adapter.py reads them
    config = {"detector_rotations": [], "detector_rotated_stages": list(MTCNN_STAGES), "face_colour": "rgb", **config}
    missing = [f for f in FACE_FIELDS if f not in config]
    if missing:
        raise KitError(f"{run_dir / 'meta.json'}: not a face run (its config lacks {missing[:3]}); "
                       "--boxes needs a run of infer_facenet.py or train_face_adapter.py")
    return SimpleNamespace(**{f: config[f] for f in FACE_FIELDS})


def draw_boxes(cfg: Config, meta: dict, splits: Sequence[str], data: Path, out: Path) -> list[tuple[str, Path, int, int]]:
    """Each split's first ``--queries`` queries and gallery images with their detected face box; per split:
    (split, page, images drawn, faces found among them)."""
    pipe = FacePipeline(face_settings(cfg.run, meta), pick_device(cfg.device), cache_dir=cfg.run.parent / "face_cache")
    done = []
    for split in splits:
        names = (meta.get("splits") or {}).get(split) or {}
        q_names, g_names = names.get("query_names", []), names.get("gallery_names", [])
        rows, found = [], 0
        for side, paths, side_names in zip(("query", "gallery"), image_paths(split, q_names, g_names, data), (q_names, g_names)):
            crops = pipe.crops(paths, f"{split} {side}")  # the whole set, as the run cropped it: a cache hit
            for i in range(min(len(paths), cfg.queries or len(paths))):
                box = crops.boxes[i]
                stage = int(crops.stage[i]) if crops.stage is not None else -1
                face = bool(np.isfinite(box).all())
                found += face
                where = crops.stage_names[stage] if 0 <= stage < len(crops.stage_names) else "detector"
                label = f"face: {where}, p={crops.probs[i]:.2f}" if face else "no face (fallback crop)"
                png = out / "boxes" / split / f"{side}_{_png_name(i, side_names[i])}"
                save_png(draw_face_box(load_image(paths[i]), box.tolist() if face else None, label, 3 * cfg.thumb_px), png)
                rows.append(PageRow(f"{split}/{png.name}", f"{side}: {side_names[i]}", label))
        intro = f"{len(rows)} images of {cfg.run.name} ({split}); face boxes in magenta, found in {found}."
        done.append((split, write_page(out / "boxes" / f"{split}.html", f"{cfg.run.name}: {split} face boxes", intro, rows), len(rows), found))
    return done


def draw_other(cfg: Config, meta: dict, splits: Sequence[str], data: Path, out: Path) -> int:
    """``--gap`` and ``--boxes``: draw, print where."""
    if cfg.gap:
        png, title = draw_gap(cfg, splits, data, out)
        console.print(f"gap map: {png}\n{title}")
    if cfg.boxes:
        table = Table(title=f"face boxes of {cfg.run}")
        for col in ("split", "images drawn", "faces found", "page"):
            table.add_column(col)
        for split, page, n, found in draw_boxes(cfg, meta, splits, data, out):
            table.add_row(split, str(n), str(found), str(page))
        console.print(table)
    return 0


def read_run_meta(run_dir: Path) -> dict:
    """The run's meta.json (either run form).

    Raises:
        KitError: missing or not a JSON object.
    """
    meta = read_json(run_dir / "meta.json")
    if meta is None:
        raise KitError(f"{run_dir / 'meta.json'}: not found or not a JSON object; run the model script first")
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    cfg = config_from_args(Config, build_parser().parse_args(argv))
    setup_logging(cfg.verbose)
    if cfg.k < 1 or cfg.queries < 0 or not 16 <= cfg.thumb_px <= MAX_THUMB_PX or cfg.caption_lines < 0 or cfg.gap_points < 0:
        raise KitError(f"--k {cfg.k}, --queries {cfg.queries}, --thumb-px {cfg.thumb_px}, --caption-lines {cfg.caption_lines}, "
                       f"--gap-points {cfg.gap_points}: need k >= 1, thumb-px from 16 to {MAX_THUMB_PX}, the others >= 0")
    splits = tuple(dict.fromkeys(cfg.split))
    if not splits:
        raise KitError("--split: name at least one of val, test")
    meta = read_run_meta(cfg.run) if cfg.gap or cfg.boxes else None
    run = None if meta is not None else load_run(cfg.run, splits=splits)
    data = data_folder(cfg, meta if run is None else run.meta)
    if not data.is_dir():
        raise KitError(f"{data}: data folder not found (pass --data DATA)")
    refuse_other_data(cfg.run, data)  # drawn from the images the run was made from, not others of the same names
    out = cfg.out or cfg.run / "visual"
    if run is None:
        return draw_other(cfg, meta, splits, data, out)

    table = Table(title=f"visualize {cfg.run}")
    for col in ("split", "queries drawn", "ground truth", "page"):
        table.add_column(col)
    captions = read_captions(cfg.run)
    for split in splits:
        page, n, has_truth = draw_split(split, run.splits[split], data, cfg, out, captions.get(split))
        table.add_row(split, str(n), "yes" if has_truth else "no (grey frames)", str(page))
    console.print(table)
    return 0


if __name__ == "__main__":
    run_cli(main)
