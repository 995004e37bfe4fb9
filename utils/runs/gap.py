"""The domain gap of a run's embeddings: a 2-D map of queries and gallery, and the mean cosines.

A run keeps its embeddings as ``<split>_query_emb.npy`` and ``<split>_gallery_emb.npy``
(float32, L2-normalised rows, in the order of the split's names):

- in the top-k form always (:mod:`utils.runs.topk_run`);
- in the matrix form when the script embedded (every script that ends with
  :func:`utils.runs.model_run.write_embedding_run`: :func:`save_run_embeddings`
  writes them before ``meta.json``, which records their sha256 under ``embeddings``).

Runs made from matrices alone (the ensemble, caption matching, CNN features,
CLIP colour) keep none. The gap check of Tudo Bein et al. is the mean cosine of
the right (query, gallery) pairs against that of the wrong ones
(:func:`pair_means`): close means say the model does not separate identities
across the domains.

Example:
    >>> q = np.eye(2, dtype=np.float32); g = np.eye(2, dtype=np.float32)
    >>> pair_means(q, g, (np.array([0, 1]), np.array([0, 1])))
    (1.0, 0.0)
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from utils.atomic import atomic_write_bytes
from utils.errors import KitError
from utils.runs.topk_run import is_topk_run, l2_normalise, load_topk_split

GAP_METHODS = ("pca", "tsne")
META_KEY = "embeddings"  # meta.json: {file name: sha256} of a matrix-form run's embeddings


def emb_file(split: str, side: str) -> str:
    """``val_query_emb.npy`` and the like: the names the top-k form uses too."""
    return f"{split}_{side}_emb.npy"


def save_run_embeddings(run_dir: str | Path, emb: dict[str, np.ndarray]) -> dict[str, str]:
    """Write each set of ``emb`` (``val_query``, ``test_gallery``, ...) L2-normalised; the entry for meta.json.

    Call it before ``meta.json`` is written (the marker then vouches for these files by hash).
    """
    hashes = {}
    for which, array in emb.items():
        split, side = which.split("_", 1)
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(l2_normalise(np.asarray(array, np.float32)), np.float32), allow_pickle=False)
        atomic_write_bytes(Path(run_dir) / emb_file(split, side), buf.getvalue())
        hashes[emb_file(split, side)] = hashlib.sha256(buf.getvalue()).hexdigest()
    return hashes


@dataclass
class SplitEmbeddings:
    """One split's embeddings with the names of their rows."""

    query: np.ndarray  # (n_query, d) float32, unit rows
    gallery: np.ndarray  # (n_gallery, d)
    query_names: list[str]
    gallery_names: list[str]


def _load_matrix_form(run_dir: Path, meta: dict, split: str) -> SplitEmbeddings:
    hashes = meta.get(META_KEY) or {}
    names = (meta.get("splits") or {}).get(split) or {}
    arrays = []
    for side in ("query", "gallery"):
        path = run_dir / emb_file(split, side)
        if path.name not in hashes:
            raise KitError(f"{run_dir / 'meta.json'}: the run keeps no {split} embeddings (a run made from matrices only, "
                           "or by an older kit); --gap needs a run of a script that embeds (re-run it)")
        raw = path.read_bytes() if path.is_file() else b""
        if hashlib.sha256(raw).hexdigest() != hashes[path.name]:
            raise KitError(f"{path}: missing or does not match the sha256 in meta.json; re-run the model")
        arrays.append(np.load(io.BytesIO(raw), allow_pickle=False))
    q_names, g_names = list(names.get("query_names", [])), list(names.get("gallery_names", []))
    if (len(arrays[0]), len(arrays[1])) != (len(q_names), len(g_names)):
        raise KitError(f"{run_dir}: {split} embeddings {arrays[0].shape} / {arrays[1].shape} do not match "
                       f"{len(q_names)} / {len(g_names)} names; re-run the model")
    return SplitEmbeddings(arrays[0], arrays[1], q_names, g_names)


def load_run_embeddings(run_dir: str | Path, split: str) -> SplitEmbeddings:
    """A split's embeddings from either run form.

    Raises:
        KitError: the run is unfinished, keeps no embeddings, or a file does not match meta.json.
    """
    run_dir = Path(run_dir)
    meta_path = run_dir / "meta.json"
    if not meta_path.is_file():
        raise KitError(f"{meta_path}: not found; run the model script first")
    if is_topk_run(run_dir):
        data = load_topk_split(run_dir, split, with_embeddings=True)
        if data.query_emb is None or data.gallery_emb is None:
            raise KitError(f"{run_dir}: a fused top-k run keeps no embeddings; --gap needs a model's run")
        return SplitEmbeddings(data.query_emb, data.gallery_emb, list(data.query_names), list(data.gallery_names))
    return _load_matrix_form(run_dir, json.loads(meta_path.read_text()), split)


def right_pairs(query_names: Sequence[str], gallery_names: Sequence[str], truth: dict[str, list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the right pairs: ``truth[query]`` lists the gallery names of the same identity."""
    col = {n: j for j, n in enumerate(gallery_names)}
    pairs = [(i, col[g]) for i, q in enumerate(query_names) for g in truth.get(q, ()) if g in col]
    rows, cols = (np.array(x, np.int64) for x in zip(*pairs)) if pairs else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    return rows, cols


def pair_means(query: np.ndarray, gallery: np.ndarray, pairs: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    """Mean cosine of the right pairs and of all other pairs, exactly, without the full matrix
    (the sum over all pairs is ``sum(q) . sum(g)``); NaN where a group is empty."""
    rows, cols = pairs
    right_sum = float(np.einsum("ij,ij->", query[rows].astype(np.float64), gallery[cols].astype(np.float64))) if len(rows) else 0.0
    total = float(query.sum(0, dtype=np.float64) @ gallery.sum(0, dtype=np.float64))  # no float64 copy of a large gallery
    n_wrong = len(query) * len(gallery) - len(rows)
    right = right_sum / len(rows) if len(rows) else float("nan")
    wrong = (total - right_sum) / n_wrong if n_wrong else float("nan")
    return right, wrong


def project_2d(x: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """(n, 2) coordinates: ``pca`` (numpy SVD, signs fixed so the same input gives the same map) or
    ``tsne`` (scikit-learn, PCA start, ``random_state=seed``: the same command gives the same map).

    Raises:
        KitError: an unknown method, or tsne without scikit-learn.
    """
    x = np.asarray(x, np.float64)
    if method == "pca":
        centred = x - x.mean(0)
        u, s, vt = np.linalg.svd(centred, full_matrices=False)
        signs = np.sign(vt[:2, np.abs(vt[:2]).argmax(axis=1)].diagonal())  # largest loading of each axis positive
        return centred @ (vt[:2].T * np.where(signs == 0, 1, signs))
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
            from threadpoolctl import threadpool_limits  # a dependency of scikit-learn
        except ImportError:
            raise KitError("--gap-method tsne needs scikit-learn (pip install scikit-learn); --gap-method pca needs nothing") from None
        perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
        with threadpool_limits(1):  # OpenMP threads on a busy machine: 300 points took 55 s instead of 3 s
            return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, metric="cosine").fit_transform(x)
    raise KitError(f"--gap-method {method!r}: choose one of {list(GAP_METHODS)}")


def subsample(n: int, most: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices: all ``n``, or ``most`` of them drawn without replacement."""
    return np.arange(n) if most <= 0 or n <= most else np.sort(rng.choice(n, most, replace=False))


@dataclass
class MapSet:
    """One image set's points on the map."""

    xy: np.ndarray  # (n, 2)
    split: str  # val or test: the marker
    side: str  # query (real) or gallery (synthetic): the colour


SIDE_COLOURS = {"query": "#1e5ae6", "gallery": "#e67e1e"}
SPLIT_MARKERS = {"val": "o", "test": "^"}


def means_line(split: str, right: float, wrong: float) -> str:
    """The title's line for one split (tests parse it: ``val: mean cosine right 0.612, wrong 0.104``)."""
    return f"{split}: mean cosine right {right:.3f}, wrong {wrong:.3f} (gap {right - wrong:+.3f})"


def draw_gap_map(sets: list[MapSet], title: str, path: str | Path, size_in: float = 7.0) -> Path:
    """A scatter of every set (colour: query/gallery, marker: split), ``title`` on top and in the PNG's
    ``Title`` text field, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(size_in, size_in))
    for s in sets:
        label = f"{s.split} {s.side} ({'real' if s.side == 'query' else 'synthetic'}, {len(s.xy)})"
        ax.scatter(s.xy[:, 0], s.xy[:, 1], s=9, alpha=0.6, c=SIDE_COLOURS[s.side], marker=SPLIT_MARKERS[s.split],
                   linewidths=0, label=label)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", fontsize=8, markerscale=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, metadata={"Title": title})
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
