"""Fine-tuning FaceNet's first or last blocks on the training identities' face crops (for GPU boxes).

``train_face_adapter.py --adapter finetune`` trains ``--finetune-blocks`` blocks of
facenet-pytorch's InceptionResnetV1 with the shared training loop and a pair loss over
real<->synthetic pairs; the rest stays frozen. ``--finetune-part late`` (the default) trains
the last blocks (of :data:`FACENET_BLOCKS`, from the end: ``last_bn``, ``last_linear``,
``block8``, ``repeat_3``, ...), ``early`` the first ones (of :data:`EARLY_BLOCKS`, from the
start: ``conv2d_1a``, ``conv2d_2a``, ``conv2d_2b``, ...), where strokes and texture are read.
The inputs are the face path's cached context crops. Each training view is a random
``input_px`` window of the crop (up to ``shift_px`` off centre), flipped half the time.
With :class:`StepRenders`, each step's batch also holds fresh renders of its real photos
in random styles of a :class:`~utils.faces.styles.StyleLibrary` (synthetic side, the
photo's identity), so real<->rendered pairs enter the pair loss.

BatchNorm: the frozen blocks run in eval mode (their statistics stay as loaded). Trained late
blocks update theirs (:func:`norm_train_blocks`); trained early blocks keep theirs as loaded
and train only their weights and BatchNorm scales and shifts: the frozen blocks after them
were trained on activations normalised by those statistics, and batches of a few identities
mixing photos, synthetic images and renders would move them.

    names = unfreeze_blocks(embedder.model, "early", 3)
    renders = StepRenders(stored_pixels, side == 0, StyleLibrary(), per_photo=2, colour=grey3, seed=0)
    step = CropPairStep(embedder.model, crops.pixels, side, "multi-similarity", cross=True, renders=renders)
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import KitError
from utils.faces.adapter import cross_domain_pairs
from utils.faces.styles import StyleLibrary
from utils.training.pair_loss import build_pair_loss

FACENET_BLOCKS = ("conv2d_4b", "repeat_1", "mixed_6a", "repeat_2", "mixed_7a", "repeat_3", "block8", "last_linear", "last_bn")
# InceptionResnetV1's first blocks in forward order (maxpool_3a, between conv2d_2b and conv2d_3b, has no weights)
EARLY_BLOCKS = ("conv2d_1a", "conv2d_2a", "conv2d_2b", "conv2d_3b", "conv2d_4a", "conv2d_4b", "repeat_1")
FINETUNE_PARTS = ("late", "early")


def finetune_block_names(part: str, n: int) -> list[str]:
    """The ``n`` blocks ``--finetune-part part`` trains: the last ``n`` of :data:`FACENET_BLOCKS` (late)
    or the first ``n`` of :data:`EARLY_BLOCKS` (early).

    Raises:
        KitError: an unknown part, or ``n`` out of range for it.
    """
    if part == "late":
        blocks = FACENET_BLOCKS
    elif part == "early":
        blocks = EARLY_BLOCKS
    else:
        raise KitError(f"--finetune-part {part!r}: choose from {list(FINETUNE_PARTS)}")
    if not 1 <= n <= len(blocks):
        raise KitError(f"--finetune-blocks {n}: between 1 and {len(blocks)} for --finetune-part {part} ({list(blocks)})")
    return list(blocks[-n:] if part == "late" else blocks[:n])


def unfreeze_blocks(model: nn.Module, part: str, n: int) -> list[str]:
    """Freeze ``model`` except the blocks of :func:`finetune_block_names`; returns their names.

    Raises:
        KitError: ``part`` or ``n`` out of range, or not an InceptionResnetV1.
    """
    names = finetune_block_names(part, n)
    missing = [b for b in (*EARLY_BLOCKS, *FACENET_BLOCKS) if not hasattr(model, b)]
    if missing:
        raise KitError(f"{type(model).__name__} has no {missing[:2]}: --adapter finetune needs FaceNet (InceptionResnetV1)")
    model.requires_grad_(False)
    for name in names:
        getattr(model, name).requires_grad_(True)
    return names


def unfreeze_last_blocks(model: nn.Module, n: int) -> list[str]:
    """:func:`unfreeze_blocks` of the last ``n`` blocks."""
    return unfreeze_blocks(model, "late", n)


def norm_train_blocks(part: str, names: list[str]) -> list[str]:
    """The trained blocks whose BatchNorm statistics update in training: the late part's, none of the early part's."""
    if part == "late":
        return list(names)
    if part == "early":
        return []
    raise KitError(f"--finetune-part {part!r}: choose from {list(FINETUNE_PARTS)}")


def freeze_frozen_norms(model: nn.Module, trainable: list[str]) -> None:
    """Eval mode for every block outside ``trainable`` (their BatchNorm statistics stay as loaded)."""
    for name, child in model.named_children():
        child.train(name in trainable and model.training)


class StepRenders:
    """Fresh renders of a batch's real photos, ``per_photo`` each, for :class:`CropPairStep`.

    ``pixels`` are the stored (colour) context crops of every training image; a render is made
    from the crop, then put through ``colour`` (the run's ``--face-colour``, None for rgb), as the
    face path treats any crop. The same ``seed`` gives the same renders in the same order.
    ``rendered`` and ``styles_used`` count what was rendered.
    """

    def __init__(self, pixels: np.ndarray, real: np.ndarray, library: StyleLibrary, per_photo: int,
                 colour: Callable[[np.ndarray], np.ndarray] | None, seed: int):
        if per_photo < 1:
            raise KitError(f"--rendered-pairs {per_photo}: at least 1 render per real photo")
        self.pixels, self.real, self.library, self.per_photo, self.colour = pixels, np.asarray(real, bool), library, per_photo, colour
        self.rng = random.Random(seed)
        self.rendered, self.styles_used = 0, Counter()

    def __call__(self, rows: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """The renders (k, C, C, 3) uint8 of the real photos among training rows ``rows``, and
        each render's position in ``rows``."""
        out, pos = [], []
        for j, row in enumerate(rows.tolist()):
            if not self.real[row]:
                continue
            for _ in range(self.per_photo):
                img, names = self.library.render_named(self.pixels[row], self.rng)
                out.append(img if self.colour is None else self.colour(img))
                pos.append(j)
                self.styles_used.update(names)
        self.rendered += len(out)
        if not out:
            return torch.zeros((0, *self.pixels.shape[1:]), dtype=torch.uint8), np.zeros(0, np.int64)
        return torch.from_numpy(np.stack(out)), np.array(pos, np.int64)


class CropPairStep(nn.Module):
    """``forward(idx, labels)``: the pair loss of FaceNet's embeddings of training crops ``idx``
    (random window and flip), over real<->synthetic pairs when ``cross``; with ``renders``, the
    batch also holds renders of its real photos (synthetic side, the photo's identity)."""

    def __init__(self, model: nn.Module, pixels: np.ndarray, side: np.ndarray, loss: str, cross: bool,
                 input_px: int = 160, shift_px: int = 8, seed: int = 0, renders: StepRenders | None = None):
        super().__init__()
        self.model, self.loss, self.cross, self.input_px, self.shift_px = model, build_pair_loss(loss), cross, input_px, shift_px
        self.pixels = torch.from_numpy(pixels)  # (n, C, C, 3) uint8, kept on the CPU
        self.side = torch.from_numpy(side)
        self.gen = torch.Generator().manual_seed(seed)
        self.renders = renders
        self.batch_sizes: list[int] = []  # images per step (training images + renders)

    def views(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, input_px, input_px) standardised training views of crops ``pixels`` (B, C, C, 3) uint8."""
        c, s = pixels.shape[1], self.input_px
        out = []
        for crop in pixels:
            lo = max(0, (c - s) // 2 - self.shift_px)
            hi = min(c - s, (c - s) // 2 + self.shift_px)
            y, x = (int(v) for v in torch.randint(lo, hi + 1, (2,), generator=self.gen))
            win = crop[y:y + s, x:x + s]
            if torch.rand((), generator=self.gen) < 0.5:
                win = win.flip(1)
            out.append(win)
        x = torch.stack(out).permute(0, 3, 1, 2).float()
        return (x - 127.5) / 128.0  # facenet-pytorch's fixed_image_standardization

    def batch(self, idx: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step's crops, identities and domain sides: training rows ``idx``, then their renders."""
        rows = idx.cpu()
        pixels, labels, side = self.pixels[rows], labels.cpu(), self.side[rows]
        if self.renders is not None:
            extra, pos = self.renders(rows.numpy())
            pixels = torch.cat([pixels, extra])
            labels = torch.cat([labels, labels[torch.from_numpy(pos)]])
            side = torch.cat([side, torch.ones(len(pos), dtype=side.dtype)])
        return pixels, labels, side

    def forward(self, idx: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        pixels, labels, side = self.batch(idx, labels)
        self.batch_sizes.append(len(pixels))
        emb = F.normalize(self.model(self.views(pixels).to(device)).float(), dim=1)
        labels = labels.to(device)
        if not self.cross:
            return self.loss(emb, labels)
        return self.loss.loss(emb, labels, cross_domain_pairs(labels, side.to(device)))
