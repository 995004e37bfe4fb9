"""Look at a run's rankings: each query beside its top-K, right answers framed green, wrong ones red.

    # every run works, the ensemble included; 20 queries of each split (val and test)
    python visualize.py --run runs/ensemble --data DATA
    # the 30 validation queries whose first right answer comes latest
    python visualize.py --run runs/resnet --data DATA --split val --worst --queries 30
    # every test query, top-5, into a folder of your choice
    python visualize.py --run runs/facenet --data DATA --split test --queries 0 --k 5 --out look/facenet

Writes ``OUT/<split>/<row>_<query>.png`` (one per query, all the same pixel
size: the query, then ranks 1..K, each fitted into a ``--thumb-px`` square)
and ``OUT/<split>.html`` linking them; OUT defaults to ``RUN/visual``.
Validation truth comes from the names (``train/<identity>/<image>``: same
identity = right); test truth from ``DATA/test/ground_truth.json`` when the
data has one (rehearsal data), otherwise test frames are grey. ``--data``
defaults to the data folder recorded in the run's meta.json.
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from rich.table import Table

from utils.config import add_config_args, config_from_args
from utils.data.images import load_image
from utils.data.layout import read_ground_truth
from utils.data.split import identity_of
from utils.errors import KitError, run_cli
from utils.logs import console, setup_logging
from utils.progress import track
from utils.runs.metrics import relevance_matrix
from utils.runs.similarity_io import SPLITS, SimMatrix, load_run
from utils.runs.topk import topk
from utils.runs.visual import PageRow, PanelLayout, Tile, draw_panel, save_png, thumbnail, write_page

log = logging.getLogger("visualize")


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
    thumb_px: int = field(default=128, metadata={"help": "side of each thumbnail; a PNG is (K+1) thumbnails wide"})
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


def image_paths(split: str, m: SimMatrix, data: Path) -> tuple[list[Path], list[Path]]:
    """Query and gallery files: val names are data-relative, test names are basenames."""
    if split == "val":
        return [data / n for n in m.query_names], [data / n for n in m.gallery_names]
    if split == "test":
        return [data / "test" / "query" / n for n in m.query_names], [data / "test" / "gallery" / n for n in m.gallery_names]
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


def draw_split(split: str, m: SimMatrix, data: Path, cfg: Config, out: Path) -> tuple[Path, int, bool]:
    """Every chosen query's panel PNG and the split's HTML page."""
    q_paths, g_paths = image_paths(split, m, data)
    rel = relevance(split, m, data)
    ranks = first_right_rank(m.sim, rel) if rel is not None else None
    rows = pick_queries(len(m.query_names), ranks, cfg, split)
    k = min(cfg.k, len(m.gallery_names))
    layout = PanelLayout(k=k, thumb_px=cfg.thumb_px)
    top = topk(m.sim[rows], k) if rows else np.zeros((0, k), dtype=np.int64)
    thumbs: dict[Path, Image.Image] = {}

    def thumb(path: Path) -> Image.Image:
        if path not in thumbs:
            thumbs[path] = thumbnail(load_image(path, max_side=2 * cfg.thumb_px), cfg.thumb_px)
        return thumbs[path]

    page_rows = []
    for row, cols in track(list(zip(rows, top.tolist())), f"{split}: drawing"):
        results = [
            Tile(thumb(g_paths[j]), m.gallery_names[j], f"#{r + 1}  {m.sim[row, j]:.3f}", None if rel is None else bool(rel[row, j]))
            for r, j in enumerate(cols)
        ]
        if ranks is None:
            note = "no ground truth"
        elif ranks[row] == 0:
            note = "no right answer in the gallery"
        else:
            note = f"first right answer at rank {ranks[row]}"
        query = Tile(thumb(q_paths[row]), m.query_names[row], "query", None)
        png = out / split / _png_name(row, m.query_names[row])
        save_png(draw_panel(query, results, layout), png)
        page_rows.append(PageRow(f"{split}/{png.name}", m.query_names[row], note))
    order = "latest first right answer first" if cfg.worst else "row order"
    intro = (f"{len(page_rows)} of {len(m.query_names)} queries ({order}), top-{k} each; "
             "frames: green = right, red = wrong, grey = no ground truth.")
    page = write_page(out / f"{split}.html", f"{cfg.run.name}: {split}", intro, page_rows)
    return page, len(page_rows), rel is not None


def main(argv: Sequence[str] | None = None) -> int:
    cfg = config_from_args(Config, build_parser().parse_args(argv))
    setup_logging(cfg.verbose)
    if cfg.k < 1 or cfg.queries < 0 or cfg.thumb_px < 16:
        raise KitError(f"--k {cfg.k}, --queries {cfg.queries}, --thumb-px {cfg.thumb_px}: need k >= 1, queries >= 0, thumb-px >= 16")
    splits = tuple(dict.fromkeys(cfg.split))
    if not splits:
        raise KitError("--split: name at least one of val, test")
    run = load_run(cfg.run, splits=splits)
    data = data_folder(cfg, run.meta)
    if not data.is_dir():
        raise KitError(f"{data}: data folder not found (pass --data DATA)")
    out = cfg.out or cfg.run / "visual"

    table = Table(title=f"visualize {cfg.run}")
    for col in ("split", "queries drawn", "ground truth", "page"):
        table.add_column(col)
    for split in splits:
        page, n, has_truth = draw_split(split, run.splits[split], data, cfg, out)
        table.add_row(split, str(n), "yes" if has_truth else "no (grey frames)", str(page))
    console.print(table)
    return 0


if __name__ == "__main__":
    run_cli(main)
