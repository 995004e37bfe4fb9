"""Gallery views: reading aids for stylised gallery faces, compared per pair with each query and fused.

A query photo is embedded as it is (its crop in ``--face-colour`` with the run's TTA). A gallery
image may also be embedded through views (``--gallery-views``):

    ``detector``  the transform with which the cascade's stage read the face (``mtcnn_invert``:
                  inverted grey; ``mtcnn_clahe``: CLAHE; ``mtcnn_hue``: hue read back to brightness;
                  ``mtcnn_sketch``: blurred and equalised), applied to the aligned crop. Faces found
                  upright or rotated on the plain image (mtcnn, mtcnn_low, rotate, hog, mmod) have no
                  such view: alignment already undoes a rotation.
    ``texture``   a Gaussian low-pass of the crop whose sigma is a fraction (``--texture-eye-frac``)
                  of the inter-eye distance: the aligned crop fixes the face's size, so the radius
                  follows the face in the original image (strokes, grain and print patterns smaller
                  than the fraction become shading), not a fixed count of image pixels.

Each view of a gallery image is compared with the query (cosine); a pair's view similarities are
fused by ``--view-fusion`` (:data:`FUSION_RULES`): ``max`` the closest view; ``zmax`` the closest
view after z-scoring each view's similarities per query (so that a view that is close to every
face, as a blurred one is, does not win every pair); ``softmax`` a soft maximum of the z-scores
(temperature 1); ``mean`` their mean (kept for comparison: it lost in the issue's trial).
``auto`` scores every rule and ``plain`` (no views) on validation and keeps the best; where two or
more tie at the top score, a harder validation decides (utils/faces/tiebreak.py: the validation queries'
photos rendered in held-out styles, relevant to their person's other photos) and the run's meta.json
records how many of its queries separate the choice from the runner-up (a warning below five); without
one (``choose_rule`` alone), the default rule is kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import cv2
import numpy as np

from utils.errors import KitError
from utils.faces.cascade import clahe_grey, hue_grey, inverted_grey

if TYPE_CHECKING:
    from utils.faces.tiebreak import HarderSet

log = logging.getLogger(__name__)

GALLERY_VIEWS = ("detector", "texture")
FUSION_RULES = ("zmax", "max", "softmax", "mean")  # the first is the default when validation ties
FUSIONS = ("auto", *FUSION_RULES, "plain")
GALLERY_NORMS = ("dual_softmax", "none")  # the face run's two-way normalisation of its matrices (the first is the default)
DLIB_EYE_FRAC = 0.356  # inter-eye distance / size_px in dlib's chips (measured on skimage's astronaut; tests)
BOX_EYE_FRAC = 0.4  # inter-eye distance / MTCNN box side (box aligner: the box fills size_px - margin_px)
SKETCH_EYE_FRAC = 0.08  # mtcnn_sketch's view: blur sigma as a fraction of the inter-eye distance


def eye_px(aligner: str, size_px: int, margin_px: int) -> float:
    """The inter-eye distance, in crop pixels, that an aligned crop of this geometry gives a face."""
    if aligner == "dlib":
        return DLIB_EYE_FRAC * size_px
    if aligner == "box":
        return BOX_EYE_FRAC * (size_px - margin_px)
    raise KitError(f"aligner {aligner!r}: choose from ['box', 'dlib']")


def low_pass(crop: np.ndarray, sigma_px: float) -> np.ndarray:
    """``crop`` blurred by a Gaussian of ``sigma_px`` (uint8 RGB in and out)."""
    return cv2.GaussianBlur(crop, (0, 0), sigma_px)


def sketch_view(crop: np.ndarray, sigma_px: float) -> np.ndarray:
    """The crop as ``mtcnn_sketch`` read its image: grey, blurred, histogram-equalised."""
    grey = cv2.GaussianBlur(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY), (0, 0), sigma_px)
    return cv2.cvtColor(cv2.equalizeHist(grey), cv2.COLOR_GRAY2RGB)


def stage_transform(stage: str, eye: float) -> Callable[[np.ndarray], np.ndarray] | None:
    """The per-crop transform of the cascade stage that found a face (None: the plain view read it)."""
    if stage == "mtcnn_clahe":
        return clahe_grey
    if stage == "mtcnn_invert":
        return inverted_grey
    if stage == "mtcnn_hue":
        return hue_grey
    if stage == "mtcnn_sketch":
        return lambda c: sketch_view(c, SKETCH_EYE_FRAC * eye)
    if stage in ("mtcnn", "mtcnn_low", "rotate", "hog", "mmod", ""):
        return None
    raise KitError(f"detector stage {stage!r}: no view for it")


@dataclass(frozen=True)
class ViewParams:
    """Which gallery views a run embeds; changes the view embeddings (their own cache key), not the plain ones."""

    views: tuple[str, ...] = GALLERY_VIEWS
    texture_eye_frac: tuple[float, ...] = (0.05,)  # measured: benchmarks/results/bench_faces_views.md

    def check(self) -> None:
        for v in self.views:
            if v not in GALLERY_VIEWS:
                raise KitError(f"--gallery-views {v!r}: choose from {list(GALLERY_VIEWS)} (the flag alone: none)")
        if "texture" in self.views and (not self.texture_eye_frac or not all(0.0 < f <= 1.0 for f in self.texture_eye_frac)):
            raise KitError(f"--texture-eye-frac {list(self.texture_eye_frac)}: one or more fractions of the inter-eye distance in (0, 1]")

    def names(self) -> list[str]:
        """The view names, in the order :func:`view_crops` returns them."""
        out = ["detector"] if "detector" in self.views else []
        if "texture" in self.views:
            out += [f"texture{f:g}" for f in self.texture_eye_frac]
        return out



def view_tag(view: str) -> str:
    """What identifies one view's embeddings beside the plain embedding's tag (cache keys)."""
    return f"view|{view}" + (f"|sketch{SKETCH_EYE_FRAC}|{BOX_EYE_FRAC}|{DLIB_EYE_FRAC}" if view == "detector" else f"|{BOX_EYE_FRAC}|{DLIB_EYE_FRAC}")


def view_crops(pixels: np.ndarray, stage_of: list[str], params: ViewParams, eye: float,
               colour: Callable[[np.ndarray], np.ndarray] | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per view name: (crops of the images that have that view, their indices). ``pixels`` are the
    stored crops; ``colour`` the run's ``--face-colour`` transform (texture views are made from the
    crop the embedder sees; the detector's views are the stage's own look)."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    c = pixels.shape[1] if pixels.ndim == 4 else 0
    if "detector" in params.views:
        idx, crops = [], []
        for i, stage in enumerate(stage_of):
            transform = stage_transform(stage, eye)
            if transform is not None:
                idx.append(i)
                crops.append(transform(pixels[i]))
        out["detector"] = (np.stack(crops) if crops else np.zeros((0, c, c, 3), np.uint8), np.array(idx, np.int64))
    for f in params.texture_eye_frac if "texture" in params.views else ():
        seen = [colour(p) if colour else p for p in pixels]
        crops = [low_pass(p, f * eye) for p in seen]
        out[f"texture{f:g}"] = (np.stack(crops) if crops else np.zeros((0, c, c, 3), np.uint8), np.arange(len(pixels)))
    return out


def full_view(plain: np.ndarray, emb: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """A view's embeddings for every gallery image: the plain one where the image has no such view."""
    out = plain.copy()
    if len(idx):
        out[idx] = emb
    return out


def fuse(query: np.ndarray, views: list[np.ndarray], rule: str) -> np.ndarray:
    """Query x gallery similarity from each gallery view's embeddings (the plain one first), fused per pair.

    Raises:
        KitError: unknown rule.
    """
    sims = np.stack([query @ g.T for g in views]).astype(np.float32)  # (V, nq, ng)
    if rule == "plain":
        return sims[0]
    if rule == "max":
        return sims.max(0)
    z = (sims - sims.mean(2, keepdims=True)) / (sims.std(2, keepdims=True) + 1e-6)
    if rule == "zmax":
        return z.max(0)
    if rule == "softmax":
        top = z.max(0)
        return top + np.log(np.exp(z - top).sum(0))
    if rule == "mean":
        return z.mean(0)
    raise KitError(f"--view-fusion {rule!r}: choose from {list(FUSIONS)}")


def gallery_normalised(sims: dict[str, np.ndarray], norm: str) -> tuple[dict[str, np.ndarray], dict]:
    """Each split's matrix after the two-way normalisation ``norm`` (:data:`GALLERY_NORMS`), and its record.

    ``dual_softmax``: ensemble.py's dual-softmax (temperature 1) on the row-z-scored matrix, a softmax
    over the gallery times a softmax over the queries: a gallery image close to every query (a hub,
    as the images of one style are to a photo) is discounted. It uses every query of the split, as
    re-ranking does. Chosen by leave-one-style-out: benchmarks/results/bench_faces_loso.md.

    Raises:
        KitError: unknown ``norm``.
    """
    from utils.ensemble.fusion import row_zscore
    from utils.ensemble.rerank import RerankParams, rerank

    if norm == "none":
        return sims, {"norm": "none"}
    if norm == "dual_softmax":
        params = RerankParams(steps=("dual_softmax",), temperature=1.0)
        return {k: rerank(row_zscore(s), params) for k, s in sims.items()}, {"norm": "dual_softmax", "temperature": 1.0}
    raise KitError(f"--gallery-norm {norm!r}: choose from {list(GALLERY_NORMS)}")


def choose_rule(score: Callable[[str], dict[str, float]], fusion: str) -> tuple[str, str, dict[str, dict[str, float]]]:
    """The fusion rule to use: ``fusion`` itself, or for ``auto`` the validation's choice among
    every rule and ``plain``. Returns the rule, how it was chosen, and each candidate's metrics."""
    if fusion != "auto":
        if fusion not in FUSIONS:
            raise KitError(f"--view-fusion {fusion!r}: choose from {list(FUSIONS)}")
        return fusion, "--view-fusion", {fusion: score(fusion)}
    metrics = {rule: score(rule) for rule in (*FUSION_RULES, "plain")}
    top = max(m["score"] for m in metrics.values())
    if metrics[FUSION_RULES[0]]["score"] >= top:
        return FUSION_RULES[0], "default (validation ties at the top score)", metrics
    best = max((r for r in metrics if metrics[r]["score"] >= top), key=lambda r: metrics[r]["map_all"])
    return best, "validation", metrics


def fused_similarities(task, emb: dict[str, np.ndarray], view_emb: dict[str, list[np.ndarray]], fusion: str,
                       harder: Callable[[], "HarderSet"] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """The run's val and test matrices with each gallery's views fused per pair, the rule chosen on
    validation (``auto``; where rules tie at the top, on the harder validation ``harder()`` if given:
    utils/faces/tiebreak.py), and a record of the choice for meta.json."""
    from utils.faces.tiebreak import break_tie, tied_at_top
    from utils.runs.metrics import evaluate, split_relevance

    rel = split_relevance(task, "val")
    val_views = [emb["val_gallery"], *view_emb["val_gallery"]]
    rule, how, metrics = choose_rule(lambda r: evaluate(fuse(emb["val_query"], val_views, r), rel), fusion)
    tied = tied_at_top(metrics) if fusion == "auto" else []
    tie = None
    if len(tied) > 1 and harder is not None:
        hard = harder()
        tie = break_tie(tied, lambda r: hard.sim(lambda q, g: fuse(q, g, r)), hard.rel, "--view-fusion auto")
        rule, how = tie.chosen, f"harder validation ({len(tied)} rules tied on validation)"
    log.info("view fusion: %s (%s)%s", rule, how, "".join(f"; {r} val {m['score']:.2f}" for r, m in metrics.items()))
    sims = {split: fuse(emb[f"{split}_query"], [emb[f"{split}_gallery"], *view_emb[f"{split}_gallery"]], rule) for split in ("val", "test")}
    record = {"rule": rule, "chosen_by": how, "val": {r: {k: round(float(v), 4) for k, v in m.items()} for r, m in metrics.items()}}
    if tie is not None:
        record["tie_break"] = tie.record()
    return sims, record
