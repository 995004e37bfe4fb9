"""A style library: real photos (or aligned face crops) rendered into many styles on the fly, for
learning style invariance from generated styles (domain randomisation).

    lib = StyleLibrary()                                    # every style of TRAIN_STYLES
    lib = StyleLibrary(exclude=("pencil",))                 # leave-one-style-out: pencil never rendered
    out = lib.render(img, random.Random(seed))              # RGB uint8 in, same shape and dtype out

A render composes 1 to ``max_compose`` styles drawn at random from the library and applies them to the
whole image or, with probability ``patch_prob``, to one random patch of it (local stylisation: the rest of
the image stays as it was). The same ``random.Random`` state gives the same render.

The styles, by name (:data:`STYLE_FUNCS`; each ``f(img, rng) -> img``):

- the kit's own renderers (OpenCV; also the hard face benchmark's styles, benchmarks/faces/face_styles.py):
  ``pencil`` (pencil sketch), ``stylise`` (watercolour-like), ``colour_map`` (false colour),
  ``cartoon`` (k-means colours + edges), ``oil`` (edge-preserving smoothing, paint levels, a warm cast);
- albumentations' colour, texture, noise, blur, quantisation and edge transforms, each with wide random
  parameters: ``jitter`` (colour jitter, any hue), ``sepia``, ``grey``, ``invert``, ``solarize``,
  ``posterize``, ``equalize``, ``clahe``, ``tone_curve``, ``channel_shuffle``, ``noise`` (Gaussian),
  ``iso_noise``, ``speckle`` (multiplicative), ``blur``, ``median``, ``motion``, ``downscale``, ``jpeg``,
  ``emboss``, ``sharpen``, ``morph`` (erosion/dilation), ``ringing``.

:data:`TRAIN_STYLES` is the explicit list the kit trains on by default: the library less
:data:`VALIDATION_STYLES`, which only the harder validation renders (utils/faces/tiebreak.py). A benchmark
that holds a style out passes it in ``exclude``: an excluded style is never rendered.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

import cv2
import numpy as np

from utils.errors import KitError

Renderer = Callable[[np.ndarray, random.Random], np.ndarray]


# ---- the kit's own renderers (RGB uint8 in and out) -------------------------------------------------
def pencil(img: np.ndarray) -> np.ndarray:
    grey, _ = cv2.pencilSketch(img, sigma_s=50, sigma_r=0.07, shade_factor=0.03)
    return cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)


def stylise(img: np.ndarray) -> np.ndarray:
    return cv2.stylization(img, sigma_s=60, sigma_r=0.45)


def colour_map(img: np.ndarray, cmap: int = cv2.COLORMAP_JET) -> np.ndarray:
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    return cv2.cvtColor(cv2.applyColorMap(grey, cmap), cv2.COLOR_BGR2RGB)


def cartoon(img: np.ndarray, colours: int = 6) -> np.ndarray:
    smooth = cv2.bilateralFilter(img, 9, 60, 7)
    data = smooth.reshape(-1, 3).astype(np.float32)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 10, 1.0)
    cv2.setRNGSeed(0)
    _, labels, centres = cv2.kmeans(data, colours, None, criteria, 2, cv2.KMEANS_PP_CENTERS)
    flat = centres.astype(np.uint8)[labels.ravel()].reshape(img.shape)
    grey = cv2.medianBlur(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), 5)
    edges = cv2.adaptiveThreshold(grey, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, 9, 5)
    return np.where(edges[..., None] > 0, flat, 0).astype(np.uint8)


def oil(img: np.ndarray) -> np.ndarray:
    out = cv2.edgePreservingFilter(img, flags=cv2.RECURS_FILTER, sigma_s=80, sigma_r=0.5)
    out = (out // 24) * 24 + 12  # coarse paint levels
    tint = np.array([1.15, 0.95, 0.75], np.float32)  # warm varnish
    return (out.astype(np.float32) * tint).clip(0, 255).astype(np.uint8)


KIT_RENDERERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "pencil": pencil, "stylise": stylise, "colour_map": colour_map, "cartoon": cartoon, "oil": oil}


# ---- albumentations' catalogue, wide random parameters ----------------------------------------------
def _albu(name: str):
    """A fresh albumentations transform for style ``name`` (imported here: albumentations is slow to import)."""
    import albumentations as A

    table = {
        "jitter": lambda: A.ColorJitter(brightness=(0.6, 1.4), contrast=(0.6, 1.4), saturation=(0.0, 2.0), hue=(-0.5, 0.5), p=1),
        "sepia": lambda: A.ToSepia(p=1),
        "grey": lambda: A.ToGray(p=1),
        "invert": lambda: A.InvertImg(p=1),
        "solarize": lambda: A.Solarize(threshold_range=(0.3, 0.8), p=1),
        "posterize": lambda: A.Posterize(num_bits=(2, 4), p=1),
        "equalize": lambda: A.Equalize(p=1),
        "clahe": lambda: A.CLAHE(clip_limit=(2, 8), p=1),
        "tone_curve": lambda: A.RandomToneCurve(scale=0.4, p=1),
        "channel_shuffle": lambda: A.ChannelShuffle(p=1),
        "noise": lambda: A.GaussNoise(std_range=(0.05, 0.25), p=1),
        "iso_noise": lambda: A.ISONoise(intensity=(0.2, 0.8), p=1),
        "speckle": lambda: A.MultiplicativeNoise(multiplier=(0.6, 1.4), per_channel=False, elementwise=True, p=1),
        "blur": lambda: A.GaussianBlur(sigma_limit=(0.5, 3.0), p=1),
        "median": lambda: A.MedianBlur(blur_limit=(3, 7), p=1),
        "motion": lambda: A.MotionBlur(blur_limit=(3, 11), p=1),
        "downscale": lambda: A.Downscale(scale_range=(0.2, 0.5), p=1),
        "jpeg": lambda: A.ImageCompression(quality_range=(10, 40), p=1),
        "emboss": lambda: A.Emboss(alpha=(0.4, 1.0), strength=(0.5, 1.5), p=1),
        "sharpen": lambda: A.Sharpen(alpha=(0.3, 1.0), lightness=(0.5, 1.5), p=1),
        "morph": lambda: A.Morphological(scale=(2, 4), operation="erosion", p=1),
        "ringing": lambda: A.RingingOvershoot(blur_limit=(7, 15), p=1),
    }
    if name not in table:
        raise KitError(f"style {name!r}: not an albumentations style of the library; choose from {sorted(table)}")
    return table[name]()


ALBU_STYLES = ("jitter", "sepia", "grey", "invert", "solarize", "posterize", "equalize", "clahe", "tone_curve", "channel_shuffle",
               "noise", "iso_noise", "speckle", "blur", "median", "motion", "downscale", "jpeg", "emboss", "sharpen", "morph", "ringing")


def albu_style(name: str) -> Renderer:
    """``name``'s albumentations transform as a renderer, its randomness drawn from ``rng`` (deterministic per state)."""
    def render(img: np.ndarray, rng: random.Random) -> np.ndarray:
        import albumentations as A

        return A.Compose([_albu(name)], seed=rng.randrange(2**31))(image=img)["image"]
    return render


def kit_style(name: str) -> Renderer:
    fn = KIT_RENDERERS[name]
    return lambda img, rng: fn(img)


STYLE_FUNCS: dict[str, Renderer] = {**{n: kit_style(n) for n in KIT_RENDERERS}, **{n: albu_style(n) for n in ALBU_STYLES}}
# styles kept out of training: the harder validation (utils/faces/tiebreak.py) renders its queries' photos in them
VALIDATION_STYLES: tuple[str, ...] = ("solarize", "emboss", "channel_shuffle", "morph", "ringing")
# the styles the kit trains on by default: the rest of the library (a benchmark that holds a style out excludes it too)
TRAIN_STYLES: tuple[str, ...] = tuple(s for s in (*KIT_RENDERERS, *ALBU_STYLES) if s not in VALIDATION_STYLES)


@dataclass(frozen=True)
class StyleLibrary:
    """Renders images into random compositions of its styles (``styles`` minus ``exclude``)."""

    styles: tuple[str, ...] = TRAIN_STYLES
    exclude: tuple[str, ...] = ()
    max_compose: int = 2  # styles composed per render: 1 to this many, in a random order
    patch_prob: float = 0.3  # probability that a render restyles one random patch instead of the whole image

    def __post_init__(self) -> None:
        unknown = [s for s in (*self.styles, *self.exclude) if s not in STYLE_FUNCS]
        if unknown:
            raise KitError(f"styles {unknown}: not in the style library; choose from {sorted(STYLE_FUNCS)}")
        if not self.names():
            raise KitError(f"style library: every style of {list(self.styles)} is excluded")
        if self.max_compose < 1 or not 0.0 <= self.patch_prob <= 1.0:
            raise KitError(f"style library: max_compose {self.max_compose} (at least 1), patch_prob {self.patch_prob} (in [0, 1])")

    def names(self) -> tuple[str, ...]:
        """The styles this library renders, in order."""
        return tuple(s for s in self.styles if s not in self.exclude)

    def render(self, img: np.ndarray, rng: random.Random) -> np.ndarray:
        """``img`` (H x W x 3 uint8) rendered into a random composition of styles; same shape and dtype."""
        return self.render_named(img, rng)[0]

    def render_named(self, img: np.ndarray, rng: random.Random) -> tuple[np.ndarray, tuple[str, ...]]:
        """:meth:`render` and the names of the styles it composed."""
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise KitError(f"style library: an RGB uint8 image (H x W x 3), not {img.dtype} {img.shape}")
        names = self.names()
        chosen = rng.sample(names, min(len(names), rng.randint(1, self.max_compose)))
        h, w = img.shape[:2]
        y0, y1, x0, x1 = 0, h, 0, w
        if rng.random() < self.patch_prob:
            ph, pw = max(8, int(h * rng.uniform(0.3, 0.7))), max(8, int(w * rng.uniform(0.3, 0.7)))
            y0, x0 = rng.randint(0, h - min(ph, h)), rng.randint(0, w - min(pw, w))
            y1, x1 = y0 + min(ph, h), x0 + min(pw, w)
        part = np.ascontiguousarray(img[y0:y1, x0:x1])
        for name in chosen:
            part = STYLE_FUNCS[name](part, rng)
        out = img.copy()
        out[y0:y1, x0:x1] = part.reshape(y1 - y0, x1 - x0, 3).astype(np.uint8)
        return out, tuple(chosen)

    def render_many(self, images: Sequence[np.ndarray], n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[tuple[str, ...]]]:
        """``n`` renders of each image (deterministic per ``seed``): the renders, the index of each one's
        source image, and the styles each one composed."""
        rng = random.Random(seed)
        out, src, used = [], [], []
        for i, img in enumerate(images):
            for _ in range(n):
                pixels, names = self.render_named(img, rng)
                out.append(pixels)
                src.append(i)
                used.append(names)
        if not out:
            return np.zeros((0, *np.shape(images)[1:]), np.uint8), np.zeros(0, np.int64), []
        return np.stack(out), np.array(src, np.int64), used

    def tag(self) -> str:
        """Identifies the renders (cache keys)."""
        return f"styles={','.join(self.names())}|compose={self.max_compose}|patch={self.patch_prob}"
