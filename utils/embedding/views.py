"""Test-time views, one kind for every model script: flip, small rotations, brightness, zoom, blur.

A view is an affine resampling of a batch plus a brightness gain. Every
script's ``--tta`` names the view *groups* added to the identity view, in the
same grammar everywhere:

    --tta flip                        (the identity and its mirror: 2 views)
    --tta flip blur                   (and a softened copy: 3 views; the face default)
    --tta flip rot brightness scale   (8 views)
    --tta                             (none: the identity only)

Views without rotation or zoom (the identity, the flip, brightness, blur) start
from the pixel-exact centre crop, mirrored or not; rotated and zoomed views are
resampled on the device with ``affine_grid``/``grid_sample``. Brightness and
blur then act on the view's pixels. A
batch is either raw pixels (0..255, the face path) or normalised by a
per-channel ``mean``/``std`` (the CNN and CLIP paths); brightness is applied
to the underlying pixels in both cases and clamped to their valid range.
The embeddings of all views are averaged after L2 normalisation
(:mod:`utils.embedding.embed`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from utils.errors import KitError

if TYPE_CHECKING:  # torch is imported where views are rendered: the flag checks (utils.config) stay torch-free
    import torch


@dataclass(frozen=True)
class View:
    """One test-time view of an image batch."""

    flip: bool = False  # mirror left-right
    angle_deg: float = 0.0  # rotate by this much
    zoom: float = 1.0  # >1: closer (a tighter crop), <1: wider (more context)
    gain: float = 1.0  # brightness factor on the pixels
    blur_px: float = 0.0  # Gaussian blur sigma, in output pixels (0: none): hatching, JPEG blocks and grain softened


TTA_GROUPS: dict[str, tuple[View, ...]] = {
    "flip": (View(flip=True),),
    "rot": (View(angle_deg=8.0), View(angle_deg=-8.0)),
    "brightness": (View(gain=0.8), View(gain=1.2)),
    "scale": (View(zoom=1.1), View(zoom=0.9)),
    "blur": (View(blur_px=1.0),),
}


@dataclass(frozen=True)
class PixelScale:
    """How a batch's values relate to pixels in [0, 1]: ``value = (pixel - mean) / std`` per channel.

    Raw 0..255 pixels are ``PixelScale.raw255()``; ImageNet-normalised input is
    ``PixelScale(IMAGENET_MEAN, IMAGENET_STD)``.
    """

    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0 / 255, 1.0 / 255, 1.0 / 255)

    @classmethod
    def raw255(cls) -> "PixelScale":
        return cls()


def tta_views(groups: Sequence[str]) -> list[View]:
    """The identity view plus the views of each named group, in a fixed order.

    Raises:
        KitError: an unknown group name.
    """
    for g in groups:
        if g not in TTA_GROUPS:
            raise KitError(f"--tta {g!r}: choose from {sorted(TTA_GROUPS)} (or give none for the identity only)")
    views = [View()]
    for group in TTA_GROUPS:  # the dict's order, not the command line's: same views, same result
        if group in groups:
            views.extend(TTA_GROUPS[group])
    return views


def _adjust_gain(out: torch.Tensor, gain: float, scale: PixelScale) -> torch.Tensor:
    """Multiply the underlying [0, 1] pixels by ``gain`` and clamp, in the batch's own units."""
    import torch

    mean = torch.tensor(scale.mean, dtype=out.dtype, device=out.device).view(1, -1, 1, 1)
    std = torch.tensor(scale.std, dtype=out.dtype, device=out.device).view(1, -1, 1, 1)
    lo, hi = (0.0 - mean) / std, (1.0 - mean) / std
    shifted = out * gain + (gain - 1.0) * mean / std
    return torch.maximum(torch.minimum(shifted, hi), lo)


def render_view(batch: torch.Tensor, view: View, out_px: int | None = None, scale: PixelScale | None = None) -> torch.Tensor:
    """Resample a batch into one view.

    Args:
        batch: (B, C, H, W) float.
        view: the view to make.
        out_px: output side, at most min(H, W); None keeps (H, W) for views
            without rotation or zoom and min(H, W) for the others.
        scale: what the values mean (default: raw 0..255 pixels).

    Returns:
        (B, C, out, out) float, in the batch's units.
    """
    import torch
    import torch.nn.functional as F

    scale = scale or PixelScale.raw255()
    b, c, h, w = batch.shape
    if view.angle_deg == 0.0 and view.zoom == 1.0:  # no geometry change: a centre crop, mirrored or not
        if out_px is None or (out_px == h and out_px == w):
            out = batch
        else:
            top, left = (h - out_px) // 2, (w - out_px) // 2
            out = batch[:, :, top : top + out_px, left : left + out_px]
        out = out.flip(3) if view.flip else out
    else:
        side = out_px or min(h, w)
        s = side / min(h, w) / view.zoom
        a = math.radians(view.angle_deg)
        fx = -1.0 if view.flip else 1.0
        theta = torch.tensor(
            [[s * math.cos(a) * fx * min(h, w) / w, -s * math.sin(a), 0.0], [s * math.sin(a) * fx, s * math.cos(a) * min(h, w) / h, 0.0]],
            dtype=batch.dtype, device=batch.device,
        ).expand(b, 2, 3)
        grid = F.affine_grid(theta, [b, c, side, side], align_corners=False)
        out = F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if view.gain != 1.0:
        out = _adjust_gain(out, view.gain, scale)
    if view.blur_px > 0:
        out = blur(out, view.blur_px)
    return out


def blur(batch: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """A separable Gaussian blur of a (B, C, H, W) batch, edges replicated; values stay in range."""
    import torch
    import torch.nn.functional as F

    radius = max(1, math.ceil(3 * sigma_px))
    x = torch.arange(-radius, radius + 1, dtype=batch.dtype, device=batch.device)
    k = torch.exp(-0.5 * (x / sigma_px) ** 2)
    k = k / k.sum()
    c = batch.shape[1]
    out = F.pad(batch, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
