"""The top-k run form: embeddings and each query's top-K candidates instead of the full matrices.

A run whose split has more than ``MAX_MATRIX_CELLS`` query x gallery cells
(default 4e8, i.e. the matrix form up to about 20,000 x 20,000) is written in
this form (:func:`use_topk_form`). Per split, in ``runs/<model>/``:

- ``<split>_query_emb.npy``, ``<split>_gallery_emb.npy``: float32 (n, d), L2-normalised rows;
- ``<split>_topk_idx.npy``: int64 (n_query, K) gallery row indices, best first (ties to the lower index);
- ``<split>_topk_scores.npy``: float32 (n_query, K), the cosine similarities of those pairs;
- ``meta.json``, written last: ``"form": "topk"``, ``"topk": K``, and per split the
  query and gallery names (row order) and the SHA-256 of each file, checked on load.

A fused run (``ensemble.py`` on top-k runs) holds only ``_topk_idx`` and
``_topk_scores`` per split (``"fused": true``): its scores are not cosines. Its
``members`` record each member's files and their SHA-256; loading it refuses a
member that changed since (:mod:`utils.runs.provenance`).

Fusion over candidates (:func:`fuse_topk`): for each query, the candidates are
the union of the models' top-K lists. Every (query, candidate) pair is scored
exactly by every model, as the dot product of its embeddings, so a candidate
that one model ranks first and another never listed is still scored by both.
The per-query normalisation (z-score, min-max, rank, RRF, as in
:mod:`utils.ensemble.fusion`) is taken over that candidate set, not over the
whole gallery. This is an approximation of the matrix form: the candidates are
the head of each model's distribution, so their mean is higher and their spread
smaller than the full row's, and a model whose head is flat gets stretched more.
The ranking among the candidates can therefore differ from the full-matrix
fusion with the same weights; weights searched on validation in this form (see
:func:`candidate_matrices`) are searched under the same approximation. An image
outside every model's top-K is never returned; with K = 100 and top-10 lists,
that needs all models to rank it below 100th.

Example:
    >>> split = make_topk_split(q_emb, g_emb, q_names, g_names, k=100)
    >>> save_topk_run("runs/resnet", {"val": val_split, "test": split}, {"model": "resnet"})
    >>> lists = topk_lists("runs/resnet", k=10)          # what submit.py sends
"""

from __future__ import annotations

import hashlib
import io
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from utils.atomic import atomic_write_bytes, atomic_write_json
from utils.errors import KitError
from utils.file_hash import file_sha256
from utils.progress import ProgressBar
from utils.runs.provenance import check_members, member_record, parse_json_file
from utils.runs.run_lock import run_lock
from utils.runs.search import DEFAULT_BUDGET_BYTES, search_topk
from utils.runs.similarity_io import SimMatrix, load_run

FORM = "topk"
MAX_MATRIX_CELLS = 20_000 * 20_000  # past this many query x gallery cells, a run is written in the top-k form
DEFAULT_K = 100  # candidates kept per query
FUSIONS = ("zscore", "minmax", "rank", "rrf")
RRF_K = 60.0  # as utils.ensemble.fusion.RRF_K
PAD = -1  # candidate index of an empty slot
FILES = {"query_emb": "query_emb", "gallery_emb": "gallery_emb", "indices": "topk_idx", "scores": "topk_scores"}


@dataclass
class TopkSplit:
    """One split in the top-k form. ``query_emb``/``gallery_emb`` are None in a fused run."""

    indices: np.ndarray  # (n_query, K) int64 gallery rows, best first
    scores: np.ndarray  # (n_query, K) float32
    query_names: list[str]
    gallery_names: list[str]
    query_emb: np.ndarray | None = None  # (n_query, d) float32, unit rows
    gallery_emb: np.ndarray | None = None  # (n_gallery, d) float32, unit rows

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def top_lists(self, k: int = 10) -> dict[str, list[str]]:
        """Each query's ``k`` best gallery names, best first, from the stored candidates.

        Raises:
            KitError: the run kept fewer than ``k`` candidates per query.
        """
        if self.k < k:
            raise KitError(f"the run kept {self.k} candidates per query; a top-{k} needs at least {k} (re-run with a larger --topk)")
        g = self.gallery_names
        return {q: [g[j] for j in row] for q, row in zip(self.query_names, self.indices[:, :k].tolist())}


def use_topk_form(n_query: int, n_gallery: int, max_cells: int = MAX_MATRIX_CELLS) -> bool:
    """True when a split this size should be written in the top-k form rather than as a matrix."""
    return n_query * n_gallery > max_cells


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Float32 copy of ``x`` with unit rows (a zero row stays zero)."""
    x = np.array(x, dtype=np.float32, copy=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x /= np.where(norms > 0, norms, 1.0)
    return x


def make_topk_split(
    query_emb: np.ndarray, gallery_emb: np.ndarray, query_names: Sequence[str], gallery_names: Sequence[str],
    k: int = DEFAULT_K, backend: str = "exact", memory_budget_bytes: int = DEFAULT_BUDGET_BYTES, progress: bool = False,
) -> TopkSplit:
    """Normalise the embeddings and find each query's top-``k`` (at most the gallery size) candidates.

    Raises:
        KitError: names that do not match the rows, bad embeddings (see :func:`search_topk`).
    """
    if len(query_names) != len(query_emb) or len(gallery_names) != len(gallery_emb):
        raise KitError(f"{len(query_names)} query / {len(gallery_names)} gallery names for "
                       f"{len(query_emb)} / {len(gallery_emb)} embeddings; names and rows must match")
    q, g = l2_normalise(query_emb), l2_normalise(gallery_emb)
    scores, idx = search_topk(q, g, min(k, len(g)), backend, memory_budget_bytes=memory_budget_bytes, progress=progress)
    return TopkSplit(idx, scores, list(query_names), list(gallery_names), q, g)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def save_topk_split(run_dir: str | Path, split: str, data: TopkSplit) -> dict[str, Any]:
    """Write one split's files atomically; returns its entry for ``meta.json`` (names, K, file hashes)."""
    run_dir = Path(run_dir)
    _check_split(data, run_dir / f"{split}_{FILES['indices']}.npy")
    arrays = {"indices": np.ascontiguousarray(data.indices, np.int64), "scores": np.ascontiguousarray(data.scores, np.float32)}
    if data.query_emb is not None and data.gallery_emb is not None:
        arrays["query_emb"] = np.ascontiguousarray(data.query_emb, np.float32)
        arrays["gallery_emb"] = np.ascontiguousarray(data.gallery_emb, np.float32)
    hashes = {}
    for key, array in arrays.items():
        name = f"{split}_{FILES[key]}.npy"
        raw = _npy_bytes(array)
        atomic_write_bytes(run_dir / name, raw)
        hashes[name] = hashlib.sha256(raw).hexdigest()
    return {"query_names": list(data.query_names), "gallery_names": list(data.gallery_names), "topk": data.k, "files": hashes}


def save_topk_run(run_dir: str | Path, splits: dict[str, TopkSplit], meta: dict[str, Any], fused: bool = False) -> Path:
    """Write every split, then ``meta.json`` with ``"form": "topk"`` (last, so a reader never sees a half run)."""
    run_dir = Path(run_dir)
    meta = dict(meta)
    meta["form"] = FORM
    meta["fused"] = fused
    with run_lock(run_dir):
        (run_dir / "meta.json").unlink(missing_ok=True)
        meta["splits"] = {split: save_topk_split(run_dir, split, data) for split, data in splits.items()}
        meta["topk"] = min((s["topk"] for s in meta["splits"].values()), default=0)
        atomic_write_json(run_dir / "meta.json", meta)
    return run_dir


def write_topk_run(
    run_dir: str | Path, embeddings: dict[str, tuple[np.ndarray, np.ndarray, Sequence[str], Sequence[str]]],
    meta: dict[str, Any], k: int = DEFAULT_K, backend: str = "exact", progress: bool = False,
) -> Path:
    """A model script's run in the top-k form from ``{split: (query_emb, gallery_emb, query_names, gallery_names)}``."""
    splits = {split: make_topk_split(*parts, k=k, backend=backend, progress=progress) for split, parts in embeddings.items()}
    return save_topk_run(run_dir, splits, dict(meta, search_backend=backend))


def read_meta(run_dir: str | Path) -> dict[str, Any]:
    """The run's ``meta.json``.

    Raises:
        KitError: missing or not JSON.
    """
    path = Path(run_dir) / "meta.json"
    if not path.is_file():
        raise KitError(f"{path}: not found; run the model script first")
    return parse_json_file(path)


def is_topk_run(run_dir: str | Path) -> bool:
    """True when the run folder's ``meta.json`` says ``"form": "topk"``."""
    path = Path(run_dir) / "meta.json"
    return path.is_file() and read_meta(run_dir).get("form") == FORM


def _load_array(path: Path, sha: str | None) -> np.ndarray:
    if not path.is_file():
        raise KitError(f"{path}: not found; the model run did not finish")
    if sha is not None and file_sha256(path) != sha:
        raise KitError(f"{path}: does not match the hash in meta.json (changed or half-copied); re-run the model")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise KitError(f"{path}: cannot read ({err})") from None


def load_topk_split(run_dir: str | Path, split: str = "test", with_embeddings: bool = True, verify: bool = True) -> TopkSplit:
    """Load and check one split of a top-k run (hashes, shapes, index range, names).

    Args:
        with_embeddings: also load the embeddings (the lists alone need only indices and names).
        verify: compare each file with its SHA-256 in ``meta.json``.

    Raises:
        KitError: not a top-k run, a missing or changed file, shapes or names that do not agree;
            a fused run whose members changed since (:class:`utils.runs.provenance.StaleEnsemble`).
    """
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    if meta.get("form") != FORM:
        raise KitError(f"{run_dir / 'meta.json'}: not a top-k run (no \"form\": \"topk\"); load it with similarity_io.load_run")
    if verify:
        check_members(run_dir, meta)
    entry = meta.get("splits", {}).get(split)
    if entry is None:
        raise KitError(f"{run_dir / 'meta.json'}: no split {split!r}")
    hashes = entry.get("files", {})
    keys = ["indices", "scores"] + (["query_emb", "gallery_emb"] if with_embeddings and not meta.get("fused") else [])
    arrays = {}
    for key in keys:
        name = f"{split}_{FILES[key]}.npy"
        arrays[key] = _load_array(run_dir / name, hashes.get(name) if verify else None)
    data = TopkSplit(arrays["indices"], arrays["scores"], list(entry["query_names"]), list(entry["gallery_names"]),
                     arrays.get("query_emb"), arrays.get("gallery_emb"))
    _check_split(data, run_dir / f"{split}_{FILES['indices']}.npy")
    return data


def _check_split(d: TopkSplit, where: Path) -> None:
    n_q, n_g = len(d.query_names), len(d.gallery_names)
    for what, names in (("query", d.query_names), ("gallery", d.gallery_names)):
        if len(set(names)) != len(names):
            raise KitError(f"{where}: {what} names repeat")
    if d.indices.ndim != 2 or d.indices.shape[0] != n_q or d.scores.shape != d.indices.shape:
        raise KitError(f"{where}: indices {d.indices.shape} / scores {d.scores.shape} do not match {n_q} queries")
    if d.indices.size and (d.indices.min() < 0 or d.indices.max() >= n_g):
        raise KitError(f"{where}: gallery indices outside 0..{n_g - 1}")
    if not np.isfinite(d.scores).all():
        raise KitError(f"{where}: NaN or infinite scores; re-run the model")
    if any(len(set(row)) != len(row) for row in d.indices[: min(n_q, 1000)].tolist()):
        raise KitError(f"{where}: a query lists the same gallery image twice")
    for what, emb, n in (("query", d.query_emb, n_q), ("gallery", d.gallery_emb, n_g)):
        if emb is not None and (emb.ndim != 2 or emb.shape[0] != n):
            raise KitError(f"{where}: {what} embeddings {emb.shape} do not match {n} names")
    if d.query_emb is not None and d.gallery_emb is not None and d.query_emb.shape[1] != d.gallery_emb.shape[1]:
        raise KitError(f"{where}: query and gallery embeddings differ in size")


def topk_lists(run: str | Path | TopkSplit, k: int = 10, split: str = "test") -> dict[str, list[str]]:
    """Each query's ``k`` best gallery names, best first, from a top-k run folder or a loaded split (:meth:`TopkSplit.top_lists`)."""
    data = run if isinstance(run, TopkSplit) else load_topk_split(run, split, with_embeddings=False)
    return data.top_lists(k)


def load_split(run_dir: str | Path, split: str = "test") -> TopkSplit | SimMatrix:
    """One split of a run of either form, as the loaded-split interface: ``query_names``,
    ``gallery_names`` and ``top_lists(k)`` (a :class:`TopkSplit` without its embeddings, or a
    :class:`~utils.runs.similarity_io.SimMatrix`), each checked as its form's loader checks it.

    Raises:
        KitError: the run is incomplete, corrupt, or lacks the split.
    """
    if is_topk_run(run_dir):
        return load_topk_split(run_dir, split, with_embeddings=False)
    return load_run(run_dir, splits=(split,)).splits[split]


def align_topk(splits: list[TopkSplit]) -> list[TopkSplit]:
    """The splits with rows, gallery rows and candidate indices in the first split's name order.

    Raises:
        KitError: the splits do not hold the same query and gallery names, or lack embeddings.
    """
    ref = splits[0]
    out = []
    for i, s in enumerate(splits):
        if s.query_emb is None or s.gallery_emb is None:
            raise KitError(f"top-k run #{i + 1} has no embeddings (a fused run?); fuse the model runs instead")
        if set(s.query_names) != set(ref.query_names) or set(s.gallery_names) != set(ref.gallery_names):
            raise KitError(f"top-k run #{i + 1}: query or gallery names differ from the first run's; re-run both on the same data")
        if s.query_names == ref.query_names and s.gallery_names == ref.gallery_names:
            out.append(s)
            continue
        rows = {n: j for j, n in enumerate(s.query_names)}
        cols = {n: j for j, n in enumerate(s.gallery_names)}
        r = np.array([rows[n] for n in ref.query_names])
        c = np.array([cols[n] for n in ref.gallery_names])
        new_of_old = np.empty_like(c)
        new_of_old[c] = np.arange(len(c))
        out.append(TopkSplit(new_of_old[s.indices[r]], s.scores[r], ref.query_names, ref.gallery_names,
                             s.query_emb[r], s.gallery_emb[c]))
    return out


def _union(splits: list[TopkSplit], rows: slice) -> np.ndarray:
    """(n_rows, width) union of the splits' candidates per query, ascending, PAD at the end."""
    n_g = len(splits[0].gallery_names)
    cat = np.concatenate([s.indices[rows] for s in splits], axis=1)
    cat.sort(axis=1)
    cat[:, 1:][cat[:, 1:] == cat[:, :-1]] = n_g  # repeats become pads
    cat.sort(axis=1)
    width = int((cat < n_g).sum(axis=1).max())
    cat = cat[:, :width]
    cat[cat == n_g] = PAD
    return cat


def _pair_scores(s: TopkSplit, rows: slice, cand: np.ndarray, step: int = 32) -> np.ndarray:
    """Exact cosine of each (query, candidate) pair: (n_rows, width) float32.

    The candidates' embeddings are gathered ``step`` queries at a time, so the
    gathered block stays in the CPU cache (3x faster than one big gather).
    """
    q = s.query_emb[rows]
    safe = np.maximum(cand, 0)
    out = np.empty(cand.shape, np.float32)
    for i in range(0, len(cand), step):
        out[i : i + step] = np.matmul(s.gallery_emb[safe[i : i + step]], q[i : i + step, :, None])[:, :, 0]
    return out


def _normalise(sim: np.ndarray, valid: np.ndarray, fusion: str, rrf_k: float = RRF_K) -> np.ndarray:
    """``fusion``'s per-query transform over the valid candidates of each row; pads become 0."""
    count = valid.sum(axis=1, keepdims=True)
    if fusion == "zscore":
        mean = np.where(valid, sim, 0).sum(axis=1, keepdims=True) / count
        var = np.where(valid, (sim - mean) ** 2, 0).sum(axis=1, keepdims=True) / count
        std = np.sqrt(var)
        out = (sim - mean) / np.where(std > 0, std, 1.0)
    elif fusion == "minmax":
        lo = np.where(valid, sim, np.inf).min(axis=1, keepdims=True)
        span = np.where(valid, sim, -np.inf).max(axis=1, keepdims=True) - lo
        out = (sim - lo) / np.where(span > 0, span, 1.0)
    elif fusion in ("rank", "rrf"):
        order = np.argsort(np.where(valid, -sim, np.inf), axis=1, kind="stable")  # ties to the lower index
        ranks = np.empty_like(order)
        np.put_along_axis(ranks, order, np.arange(sim.shape[1])[None, :], axis=1)
        out = 1.0 - ranks / np.maximum(count - 1, 1) if fusion == "rank" else 1.0 / (rrf_k + 1.0 + ranks)
    else:
        raise KitError(f"--fusion {fusion!r}: unknown; use one of {', '.join(FUSIONS)}")
    return np.where(valid, out, 0).astype(np.float32)


def _check_weights(weights: Sequence[float], n_models: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float32)
    if w.shape != (n_models,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise KitError(f"--weights {list(weights)}: need {n_models} non-negative numbers, not all zero")
    return w


def _chunk_rows(splits: list[TopkSplit], memory_budget_bytes: int) -> int:
    width = sum(s.k for s in splits)
    return max(1, memory_budget_bytes // (width * 64))  # a few (rows, width) arrays per model


def fuse_topk(
    runs: list[TopkSplit], weights: Sequence[float], fusion: str = "zscore", k: int = 10,
    memory_budget_bytes: int = DEFAULT_BUDGET_BYTES, progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Fused top-``k`` per query over the union of the runs' candidates (see the module doc).

    Args:
        runs: one split per model (joined by name to the first one's order).
        weights: one non-negative weight per run.
        fusion: per-query normalisation over the candidates: zscore, minmax, rank or rrf.
        k: results per query; at most the smallest candidate union (at least the largest K).
        memory_budget_bytes: bound on the temporaries of one query chunk.
        progress: draw a progress bar.

    Returns:
        ``(scores, indices)``: (n_query, k) float32 fused scores and int64 gallery indices in the
        first run's gallery order, best first, ties to the lower index.
    """
    runs = align_topk(runs)
    w = _check_weights(weights, len(runs))
    if k > max(s.k for s in runs):
        raise KitError(f"a fused top-{k} needs runs that kept at least {k} candidates per query")
    n_q = len(runs[0].query_names)
    out_s = np.empty((n_q, k), np.float32)
    out_i = np.empty((n_q, k), np.int64)
    step = _chunk_rows(runs, memory_budget_bytes)
    with ProgressBar(f"fuse {len(runs)} runs", total=n_q) if progress else nullcontext() as bar:
        for start in range(0, n_q, step):
            rows = slice(start, min(n_q, start + step))
            cand = _union(runs, rows)
            valid = cand != PAD
            fused = np.zeros(cand.shape, np.float32)
            for wm, s in zip(w, runs):  # summed model by model, as utils.ensemble.fusion.weighted_sum
                fused += wm * _normalise(_pair_scores(s, rows, cand), valid, fusion)
            fused[~valid] = -np.inf
            order = np.lexsort((cand, -fused), axis=1)[:, :k]
            out_s[rows] = np.take_along_axis(fused, order, axis=1)
            out_i[rows] = np.take_along_axis(cand, order, axis=1)
            if progress:
                bar.advance(len(cand))
    return out_s, out_i


@dataclass
class CandidateMatrices:
    """Per query, the union of the models' candidates and each model's transformed score on them."""

    cols: np.ndarray  # (n_query, width) gallery indices, PAD where empty
    mats: list[np.ndarray]  # per model, (n_query, width) float32 transformed scores; pads below every real value

    def relevance(self, query_ids: np.ndarray, gallery_ids: np.ndarray) -> np.ndarray:
        """(n_query, width) bool: the candidate has the query's identity (pads never)."""
        return (self.cols != PAD) & (gallery_ids[np.maximum(self.cols, 0)] == query_ids[:, None])


def candidate_matrices(runs: list[TopkSplit], fusion: str, memory_budget_bytes: int = DEFAULT_BUDGET_BYTES) -> CandidateMatrices:
    """What the ensemble's weight search needs in the top-k form.

    Column j of row i is candidate ``cols[i, j]``, so the matrices are not
    indexed by gallery image; the weight search only ranks within rows, so it
    can score them as it scores full matrices (with :meth:`CandidateMatrices.relevance`
    as the relevance mask; a right answer outside every model's top-K counts as a miss).
    """
    runs = align_topk(runs)
    n_q = len(runs[0].query_names)
    width = sum(s.k for s in runs)
    cols = np.full((n_q, width), PAD, np.int64)
    mats = [np.zeros((n_q, width), np.float32) for _ in runs]
    step = _chunk_rows(runs, memory_budget_bytes)
    for start in range(0, n_q, step):
        rows = slice(start, min(n_q, start + step))
        cand = _union(runs, rows)
        valid = cand != PAD
        cols[rows, : cand.shape[1]] = cand
        for m, s in zip(mats, runs):
            m[rows, : cand.shape[1]] = _normalise(_pair_scores(s, rows, cand), valid, fusion)
    used = int((cols != PAD).sum(axis=1).max())
    cols = cols[:, :used]
    floor = min(float(m[:, :used][cols != PAD].min()) for m in mats) - 1.0
    mats = [np.where(cols != PAD, m[:, :used], floor).astype(np.float32) for m in mats]
    return CandidateMatrices(cols, mats)


def ensemble_topk(
    run_dirs: Sequence[str | Path], weights: Sequence[float], fusion: str, out_dir: str | Path,
    meta: dict[str, Any] | None = None, k: int = DEFAULT_K, splits: Sequence[str] = ("val", "test"),
) -> Path:
    """Fuse top-k model runs and write the result as a fused top-k run (what ``submit.py`` reads).

    Each split of each run is loaded (hashes checked), joined by name, fused with
    :func:`fuse_topk` keeping ``k`` candidates per query (at most the largest run's K).
    """
    members = [member_record(out_dir, d, read_meta(d)) for d in run_dirs]  # the hashes the loads below check
    loaded = {split: [load_topk_split(d, split) for d in run_dirs] for split in splits}
    out = {}
    for split, parts in loaded.items():
        kk = min(k, max(p.k for p in parts))
        scores, idx = fuse_topk(parts, weights, fusion, kk, progress=True)
        out[split] = TopkSplit(idx, scores, parts[0].query_names, parts[0].gallery_names)
    record = dict(meta or {})
    record.setdefault("model", "ensemble")
    record.update({"members": members, "weights": [float(x) for x in weights],
                   "fusion": fusion})
    return save_topk_run(out_dir, out, record, fused=True)
