"""Crop an image to its main object when the object stands on a plain background.

The retail project's references were products on white; its photos had busy
backgrounds. Without a segmentation model (none can be fetched offline
here), this offline stand-in finds the background as the median colour of
the image's border and crops to the box of pixels that differ from it by
more than ``tolerance`` (0..255, any channel). An image whose object box is
nearly the whole image (a busy background, a photo) or nearly empty is kept
whole, and counted. Crops are PNG files in a cache folder keyed by the files
and the settings.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from utils.atomic import atomic_write_bytes
from utils.cache import files_key
from utils.data.images import load_image
from utils.errors import KitError
from utils.progress import track

log = logging.getLogger(__name__)

OBJECT_CROPS = ("none", "border")
MIN_SHARE = 0.01  # object box below this share of the image: nothing found, keep it whole
MAX_SHARE = 0.95  # object box above this share: no plain background, keep it whole


def object_box(img: Image.Image, tolerance: int = 30, margin: float = 0.05) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of what differs from the border colour, widened by ``margin``; None to keep it whole."""
    rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
    h, w = rgb.shape[:2]
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    background = np.median(border, axis=0)
    mask = (np.abs(rgb - background).max(axis=2) > tolerance)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    share = (bottom - top) * (right - left) / (h * w)
    if not MIN_SHARE <= share <= MAX_SHARE:
        return None
    dx, dy = int(margin * (right - left)), int(margin * (bottom - top))
    return int(max(0, left - dx)), int(max(0, top - dy)), int(min(w, right + dx)), int(min(h, bottom + dy))


@dataclass
class ObjectCrops:
    """What to use instead of each image: its object crop, or the image itself."""

    paths: list[Path]
    n_whole: int


def object_crops(paths: Sequence[Path], mode: str, cache_dir: Path, tolerance: int = 30, desc: str = "images") -> ObjectCrops:
    """Object crops of ``paths`` (``none``: the images themselves).

    Raises:
        KitError: an unknown mode or tolerance, or an unreadable image.
    """
    paths = [Path(p) for p in paths]
    if mode == "none":
        return ObjectCrops(paths, len(paths))
    if mode != "border":
        raise KitError(f"--crop-object {mode!r}: choose one of {OBJECT_CROPS}")
    if not 0 <= tolerance < 255:
        raise KitError(f"--object-tolerance {tolerance}: between 0 and 254")
    folder = cache_dir / f"object_crops_{files_key(paths, f'{mode}|{tolerance}')}"
    out, n_whole = [], 0
    for i, p in enumerate(track(paths, f"{desc}: object crops")):
        crop, whole = folder / f"{i:06d}.png", folder / f"{i:06d}.whole"
        if not crop.is_file() and not whole.is_file():
            img = load_image(p)
            box = object_box(img, tolerance)
            if box is None:
                atomic_write_bytes(whole, b"")
            else:
                buf = io.BytesIO()
                img.crop(box).save(buf, format="PNG")
                atomic_write_bytes(crop, buf.getvalue())
        if crop.is_file():
            out.append(crop)
        else:
            out.append(p)
            n_whole += 1
    log.info("%s: object crop for %d of %d images (the rest whole)", desc, len(paths) - n_whole, len(paths))
    return ObjectCrops(out, n_whole)
