"""Test-time views of face crops: flip, small rotations, brightness, zoom.

A view is an affine resampling of the context crop (see :mod:`utils.faces.crop`)
down to the embedder's input size, plus a brightness gain. All views of a batch
are made on the device with ``affine_grid``/``grid_sample``; the identity and
flip views are pixel-exact centre crops. Query and gallery images get the same views: the
embedder averages the L2-normalised embedding of every view, then normalises
again (:func:`utils.faces.embedder.embed_crops`).

    --tta flip rot brightness scale   (all: 8 views with the identity)
    --tta                             (none: the identity only)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from utils.errors import KitError


@dataclass(frozen=True)
class View:
    """One test-time view of a face crop."""

    flip: bool = False  # mirror left-right
    angle_deg: float = 0.0  # rotate the face by this much
    zoom: float = 1.0  # >1: closer (a tighter crop), <1: wider (more context)
    gain: float = 1.0  # brightness factor on 0..255 pixels


TTA_GROUPS: dict[str, tuple[View, ...]] = {
    "flip": (View(flip=True),),
    "rot": (View(angle_deg=8.0), View(angle_deg=-8.0)),
    "brightness": (View(gain=0.8), View(gain=1.2)),
    "scale": (View(zoom=1.1), View(zoom=0.9)),
}


def tta_views(names: Sequence[str]) -> list[View]:
    """The identity view plus the views of each named group, in a fixed order.

    Raises:
        KitError: an unknown group name.
    """
    for n in names:
        if n not in TTA_GROUPS:
            raise KitError(f"--tta {n!r}: choose from {sorted(TTA_GROUPS)} (or give none)")
    views = [View()]
    for group in TTA_GROUPS:  # the dict's order, not the command line's: same views, same result
        if group in names:
            views.extend(TTA_GROUPS[group])
    return views


def render_view(crops: torch.Tensor, view: View, out_px: int) -> torch.Tensor:
    """Resample a batch of context crops into one view.

    Args:
        crops: (B, 3, C, C) float, 0..255.
        view: the view to make.
        out_px: output side (the embedder's input), at most C.

    Returns:
        (B, 3, out_px, out_px) float, 0..255.
    """
    b, _, c, _ = crops.shape
    if view in (View(), View(flip=True)):  # pixel-exact, no resampling
        lo = (c - out_px) // 2
        centre = crops[:, :, lo : lo + out_px, lo : lo + out_px]
        return centre.flip(3) if view.flip else centre
    s = out_px / c / view.zoom
    a = math.radians(view.angle_deg)
    fx = -1.0 if view.flip else 1.0
    theta = torch.tensor(
        [[s * math.cos(a) * fx, -s * math.sin(a), 0.0], [s * math.sin(a) * fx, s * math.cos(a), 0.0]],
        dtype=crops.dtype, device=crops.device,
    ).expand(b, 2, 3)
    grid = F.affine_grid(theta, [b, 3, out_px, out_px], align_corners=False)
    out = F.grid_sample(crops, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if view.gain != 1.0:
        out = (out * view.gain).clamp(0.0, 255.0)
    return out
