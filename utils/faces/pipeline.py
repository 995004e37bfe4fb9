"""The face path from image files to embeddings: detector -> aligned crops -> embedder x TTA views.

Built from a face run's settings (``infer_facenet.py``'s flags, or the
``config`` of a face run's ``meta.json``), so a script that reads an existing
face run, like ``train_face_adapter.py``, embeds exactly as that run did and
reuses its cached crops and embeddings from ``runs/face_cache/``:

    pipe = FacePipeline(cfg, device, cache_dir=cfg.runs / "face_cache")
    emb = pipe.embed_set(paths, "val query")      # (n, d) L2-normalised, cached
    pipe.faces["val_query"]                        # images, faces found, fallbacks, by stage

``cfg`` is any object with the fields of ``infer_facenet.Config`` that concern
faces (:data:`FACE_FIELDS`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from utils.cache import cached, files_key, numbers_tag
from utils.device import amp_dtype, resolve_processes, resolve_workers
from utils.embedding.embed import embed_arrays
from utils.embedding.views import View, tta_views
from utils.errors import KitError
from utils.faces.cascade import CascadeParams, FaceCascade, grey3, hue_grey
from utils.faces.crop import CropParams, Crops, face_crops
from utils.faces.detect import DetectorParams, FaceDetector
from utils.faces.embedder import build_embedder
from utils.faces.views import ViewParams, eye_px, full_view, stage_transform, view_crops, view_tag

log = logging.getLogger(__name__)

# the settings that decide a face run's embeddings (and their cache keys)
FACE_FIELDS = ("embedder", "weights", "shape_predictor", "detector", "detector_stages", "detector_rotations", "detector_rotated_stages", "min_face_frac", "face_fallback", "face_colour",
               "detect_px", "min_face_px", "thresholds", "face_select", "margin_px", "align_eyes", "tta",
               "detect_batch_size", "embed_batch_size", "amp", "workers")

# face settings added later (gallery views, the early face-count warning): read with their defaults where an
# older face run's config lacks them (train_face_adapter.py reads the source run's config)
OPTIONAL_FACE_FIELDS = ("gallery_views", "texture_eye_frac", "face_warn_share", "face_warn_after")
# not among them: dlib_processes, a setting of the machine (infer_facenet.py --dlib-processes), not of the embeddings;
# a script that rebuilds a face run's pipeline (train_face_adapter.py, visualize.py) uses every core of its own machine


FACE_FALLBACKS = ("center", "letterbox", "best")  # best: the cascade's best box below its gates, else center
# what the embedder sees, per crop (None: unchanged); measured in benchmarks/results/bench_faces_hard_scores.md
COLOUR_VIEWS = {"grey": grey3, "rgb": None, "hue": hue_grey}
FACE_COLOURS = tuple(COLOUR_VIEWS)


def colour_transform(mode: str):
    """The per-crop transform of ``--face-colour mode`` (None for rgb); a KitError for an unknown mode."""
    if mode not in COLOUR_VIEWS:
        raise KitError(f"--face-colour {mode!r}: choose from {list(FACE_COLOURS)}")
    return COLOUR_VIEWS[mode]


def colour_view(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Crops as the embedder sees them: ``rgb`` unchanged; ``grey`` greyscale (a style's colour
    cast or palette removed, on query and gallery alike); ``hue`` false colour read back to
    brightness (:func:`~utils.faces.cascade.hue_grey`; grey where unsaturated)."""
    view = colour_transform(mode)
    if view is None or len(pixels) == 0:
        return pixels
    return np.stack([view(p) for p in pixels])


def build_detector(cfg: Any, device: torch.device, processes: int = 1) -> FaceDetector | FaceCascade | None:
    """MTCNN with the configured canvas, thresholds and selection, the cascade of
    ``detector_stages`` (its mmod stage on ``processes`` worker processes), or None for ``detector`` none."""
    mtcnn = DetectorParams(cfg.detect_px, cfg.min_face_px, tuple(cfg.thresholds), cfg.face_select)
    if cfg.detector == "mtcnn":
        return FaceDetector(mtcnn, device)
    if cfg.detector == "cascade":
        return FaceCascade(CascadeParams(stages=tuple(cfg.detector_stages), stage_rotations=tuple(cfg.detector_rotations),
                                         rotated_stages=tuple(cfg.detector_rotated_stages), mtcnn=mtcnn,
                                         min_face_frac=cfg.min_face_frac,
                                         fallback="best" if cfg.face_fallback == "best" else "center"), device,
                           warn_share=getattr(cfg, "face_warn_share", 0.0), warn_after=getattr(cfg, "face_warn_after", 64),
                           processes=processes)
    if cfg.detector == "none":
        return None
    raise KitError(f"--detector {cfg.detector!r}: choose mtcnn, cascade or none")


class FacePipeline:
    """One face path: its embedder (weights checked first), crop geometry, detector and views."""

    def __init__(self, cfg: Any, device: torch.device, cache_dir: Path):
        missing = [f for f in FACE_FIELDS if not hasattr(cfg, f)]
        if missing:
            raise KitError(f"face settings lack {missing}: not a face run's config")
        if cfg.face_fallback not in FACE_FALLBACKS:
            raise KitError(f"--face-fallback {cfg.face_fallback!r}: choose from {list(FACE_FALLBACKS)}")
        colour_transform(cfg.face_colour)  # an unknown --face-colour fails here, before any detection
        if not 0.0 <= getattr(cfg, "face_warn_share", 0.0) <= 1.0 or getattr(cfg, "face_warn_after", 1) < 1:
            raise KitError(f"--face-warn-share {cfg.face_warn_share} / --face-warn-after {cfg.face_warn_after}: a share in [0, 1] and at least 1 image")
        if cfg.face_fallback == "best" and cfg.detector != "cascade":
            raise KitError(f"--face-fallback best needs --detector cascade (its boxes below the gates), not {cfg.detector}")
        self.cfg, self.device, self.cache_dir = cfg, device, Path(cache_dir)
        processes = resolve_processes(getattr(cfg, "dlib_processes", -1))  # dlib's face model and the mmod stage
        self.embedder = build_embedder(cfg.embedder, cfg.weights, device, amp_dtype(device, cfg.amp), processes=processes)
        self.crop_params = CropParams(size_px=self.embedder.input_px, aligner=self.embedder.aligner, margin_px=cfg.margin_px,
                                      align_eyes=cfg.align_eyes, shape_predictor=cfg.shape_predictor,
                                      fallback="letterbox" if cfg.face_fallback == "letterbox" else "center")
        self.crop_params.check()
        self.detector = build_detector(cfg, device, processes)
        self.views = tta_views(cfg.tta)
        # the gallery views' TTA: the run's without its blur group (a view is a reading aid already; the blur pass cost a
        # third of the views' time and no score: benchmarks/results/bench_faces_time.md)
        self.view_tta = tta_views([g for g in cfg.tta if g != "blur"])
        self.det_tag = self.detector.params.tag() if self.detector is not None else "no-detector"
        self.faces: dict[str, dict[str, Any]] = {}  # per image set: images, faces found, fallbacks, by stage
        # gallery views (utils.faces.views); a face run made before they existed has none
        self.view_params = ViewParams(tuple(getattr(cfg, "gallery_views", ())), tuple(getattr(cfg, "texture_eye_frac", (0.05,))))
        self.view_params.check()
        self.image_views: dict[str, dict[str, list[str]]] = {}  # per gallery set: image name -> its views

    @property
    def tag(self) -> str:
        """Identifies the embeddings: detector, crop geometry, colour, embedder weights, views."""
        return "|".join([self.det_tag, self.crop_params.tag(), f"colour={self.cfg.face_colour}", self.embedder.tag, repr(self.views),
                         numbers_tag(self.embedder, amp_dtype(self.device, self.cfg.amp), self.device)])

    def crops(self, paths: Sequence[Path], desc: str) -> Crops:
        """Detected, aligned context crops of ``paths`` (cached), in the run's ``face_colour``;
        counts the set's faces and fallbacks."""
        crops = self._stored_crops(paths, desc)
        return replace(crops, pixels=colour_view(crops.pixels, self.cfg.face_colour))

    def _stored_crops(self, paths: Sequence[Path], desc: str) -> Crops:
        """The crops as the crop cache holds them (colour); counts the set's faces and fallbacks."""
        cfg = self.cfg
        crops = face_crops(paths, self.detector, self.crop_params, batch_size=cfg.detect_batch_size,
                           workers=resolve_workers(cfg.workers), cache_dir=self.cache_dir, desc=desc)
        self.faces[desc.replace(" ", "_")] = {"images": len(paths), "faces_found": len(paths) - crops.n_fallback,
                                              "fallback": crops.n_fallback, "by_stage": crops.stage_counts()}
        return crops

    def embed_pixels(self, pixels: np.ndarray, desc: str, views: Sequence[View] | None = None) -> np.ndarray:
        """The embedder over crops (every view, averaged; ``views`` None: the run's views), uncached."""
        views = self.views if views is None else views
        return embed_arrays(self.embedder, pixels, views, device=self.device, out_px=self.embedder.input_px,
                            batch_size=self.cfg.embed_batch_size, desc=f"{desc}: embedding x{len(views)} views")

    def embed_set(self, paths: Sequence[Path], desc: str, use_cache: bool = True) -> np.ndarray:
        """Crops (cached), then every view's embedding of one image set (cached unless ``use_cache``
        is off: for an embedder whose weights change, e.g. while fine-tuning). The colour view is
        made only when the embedder runs, not when the embedding cache answers."""
        crops = self._stored_crops(paths, desc)
        embed = lambda: self.embed_pixels(colour_view(crops.pixels, self.cfg.face_colour), desc)  # noqa: E731
        if not use_cache:
            return embed()
        return cached(self.cache_dir / f"emb_{files_key(paths, self.tag)}.npy", embed, desc)

    def log_fallbacks(self) -> None:
        """One line: images without a face, per image set."""
        n_fb = sum(f["fallback"] for f in self.faces.values())
        log.info("no face found in %d of %d images (fallback crop used): %s", n_fb, sum(f["images"] for f in self.faces.values()),
                 ", ".join(f"{k} {v['fallback']}/{v['images']}" for k, v in self.faces.items()))

    def embed_views(self, paths: Sequence[Path], names: Sequence[str], desc: str) -> list[np.ndarray]:
        """Each gallery view's embeddings of ``paths`` (cached per view; the plain embedding where an
        image has no such view), in :meth:`ViewParams.names` order; records each image's views."""
        if not self.view_params.views:
            return []
        crops = self._stored_crops(paths, desc)
        plain = self.embed_set(paths, desc)
        stage_of = [crops.stage_names[s] if s >= 0 else "" for s in crops.stage] if crops.stage is not None else [""] * len(paths)
        eye = eye_px(self.crop_params.aligner, self.crop_params.size_px, self.crop_params.margin_px)
        made: dict[str, tuple[np.ndarray, np.ndarray]] = {}

        def build() -> dict[str, tuple[np.ndarray, np.ndarray]]:
            if not made:
                made.update(view_crops(crops.pixels, stage_of, self.view_params, eye, colour_transform(self.cfg.face_colour)))
            return made

        out, used = [], {n: ["plain"] for n in names}
        for view in self.view_params.names():
            idx = np.array([i for i, s in enumerate(stage_of) if stage_transform(s, eye) is not None] if view == "detector"
                           else range(len(paths)), np.int64)
            key = files_key(paths, f"{self.tag}|{view_tag(view)}|view_tta={self.view_tta!r}")  # one key per view: adding or dropping another view keeps it
            compute = partial(self._embed_view, build, view, f"{desc} ({view} view)") if len(idx) else partial(np.zeros, (0, plain.shape[1]), np.float32)
            emb = cached(self.cache_dir / f"emb_{key}.npy", compute, f"{desc} ({view} view)")
            for i in idx:
                used[names[i]].append(f"{view}:{stage_of[i]}" if view == "detector" else view)
            out.append(full_view(plain, emb, idx))
        self.image_views[desc.replace(" ", "_")] = used
        return out

    def _embed_view(self, build, view: str, desc: str) -> np.ndarray:
        return self.embed_pixels(build()[view][0], desc, views=self.view_tta)


    def stored_crops(self, paths: Sequence[Path], desc: str) -> Crops:
        """The crops as the crop cache holds them (before ``--face-colour``): what a style library renders."""
        return self._stored_crops(paths, desc)

    def embed_rendered(self, paths: Sequence[Path], rows: Sequence[int], library, n: int, seed: int, desc: str,
                       with_views: bool = False) -> tuple[np.ndarray, np.ndarray, list, list[np.ndarray]]:
        """``n`` renders of the stored crop of each ``paths[i]``, ``i`` in ``rows``, by ``library`` (a
        :class:`~utils.faces.styles.StyleLibrary`), in ``--face-colour``, embedded (cached per paths, rows,
        library, ``n`` and ``seed``; the crops come from the set's crop cache). Returns the embeddings,
        each render's source row (into ``paths``), the styles each render composed, and (``with_views``)
        each gallery view's embeddings of the renders in :meth:`ViewParams.names` order (a render has
        no detector view: the plain embedding stands in)."""
        rows = np.asarray(rows, np.int64)
        if not len(rows):
            raise KitError(f"{desc}: no images to render")
        crops = self._stored_crops(paths, desc)
        names = self.view_params.names() if with_views else []
        key = files_key(paths, f"{self.tag}|rendered|{library.tag()}|n={n}|seed={seed}|rows={','.join(map(str, rows.tolist()))}|views={names}"
                              + (f"|view_tta={self.view_tta!r}" if names else ""))
        z = cached(self.cache_dir / f"rendered_{key}.npz",
                   lambda: self._rendered_arrays(library.render_many(list(crops.pixels[rows]), n, seed), names, desc), f"{desc} (rendered)")
        return z["emb"], rows[z["src"]], [tuple(u.split("+")) for u in z["used"].tolist()], [z[f"view.{v}"] for v in names]

    def _rendered_arrays(self, renders: tuple[np.ndarray, np.ndarray, list], views: list[str], desc: str) -> dict[str, np.ndarray]:
        pixels, src, used = renders
        emb = self.embed_pixels(colour_view(pixels, self.cfg.face_colour), f"{desc} (rendered)").astype(np.float32)
        out = {"emb": emb, "src": src, "used": np.array(["+".join(u) for u in used], dtype=str)}
        if views:
            eye = eye_px(self.crop_params.aligner, self.crop_params.size_px, self.crop_params.margin_px)
            made = view_crops(pixels, [""] * len(pixels), self.view_params, eye, colour_transform(self.cfg.face_colour))
            for v in views:
                out[f"view.{v}"] = full_view(emb, self.embed_pixels(made[v][0], f"{desc} (rendered, {v} view)", views=self.view_tta),
                                             made[v][1]) if len(made[v][1]) else emb
        return out
