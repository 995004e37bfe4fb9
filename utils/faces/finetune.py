"""Fine-tuning FaceNet's last blocks on the training identities' face crops (for GPU boxes).

``train_face_adapter.py --adapter finetune`` trains the last ``--finetune-blocks``
blocks of facenet-pytorch's InceptionResnetV1 (of :data:`FACENET_BLOCKS`, from
the end: ``last_bn``, ``last_linear``, ``block8``, ``repeat_3``, ...) with the
shared training loop and a pair loss over real<->synthetic pairs. The rest stays
frozen, BatchNorm included. The inputs are the face path's cached context crops.
Each training view is a random ``input_px`` window of the crop (up to ``shift_px``
off centre), flipped half the time.

    names = unfreeze_last_blocks(embedder.model, 3)
    step = CropPairStep(embedder.model, crops.pixels, side, "multi-similarity", cross=True)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import KitError
from utils.faces.adapter import cross_domain_pairs
from utils.training.pair_loss import build_pair_loss

FACENET_BLOCKS = ("conv2d_4b", "repeat_1", "mixed_6a", "repeat_2", "mixed_7a", "repeat_3", "block8", "last_linear", "last_bn")


def unfreeze_last_blocks(model: nn.Module, n: int) -> list[str]:
    """Freeze ``model`` except its last ``n`` blocks of :data:`FACENET_BLOCKS`; returns their names.

    Raises:
        KitError: ``n`` out of range, or not an InceptionResnetV1.
    """
    if not 1 <= n <= len(FACENET_BLOCKS):
        raise KitError(f"--finetune-blocks {n}: between 1 and {len(FACENET_BLOCKS)}")
    missing = [b for b in FACENET_BLOCKS if not hasattr(model, b)]
    if missing:
        raise KitError(f"{type(model).__name__} has no {missing[:2]}: --adapter finetune needs FaceNet (InceptionResnetV1)")
    names = list(FACENET_BLOCKS[-n:])
    model.requires_grad_(False)
    for name in names:
        getattr(model, name).requires_grad_(True)
    return names


def freeze_frozen_norms(model: nn.Module, trainable: list[str]) -> None:
    """Eval mode for every block outside ``trainable`` (their BatchNorm statistics stay as loaded)."""
    for name, child in model.named_children():
        child.train(name in trainable and model.training)


class CropPairStep(nn.Module):
    """``forward(idx, labels)``: the pair loss of FaceNet's embeddings of training crops ``idx``
    (random window and flip), over real<->synthetic pairs when ``cross``."""

    def __init__(self, model: nn.Module, pixels: np.ndarray, side: np.ndarray, loss: str, cross: bool,
                 input_px: int = 160, shift_px: int = 8, seed: int = 0):
        super().__init__()
        self.model, self.loss, self.cross, self.input_px, self.shift_px = model, build_pair_loss(loss), cross, input_px, shift_px
        self.pixels = torch.from_numpy(pixels)  # (n, C, C, 3) uint8, kept on the CPU
        self.side = torch.from_numpy(side)
        self.gen = torch.Generator().manual_seed(seed)

    def views(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, 3, input_px, input_px) standardised training views of crops ``idx``."""
        c, s = self.pixels.shape[1], self.input_px
        out = []
        for i in idx.cpu().tolist():
            lo = max(0, (c - s) // 2 - self.shift_px)
            hi = min(c - s, (c - s) // 2 + self.shift_px)
            y, x = (int(v) for v in torch.randint(lo, hi + 1, (2,), generator=self.gen))
            win = self.pixels[i, y:y + s, x:x + s]
            if torch.rand((), generator=self.gen) < 0.5:
                win = win.flip(1)
            out.append(win)
        x = torch.stack(out).permute(0, 3, 1, 2).float()
        return (x - 127.5) / 128.0  # facenet-pytorch's fixed_image_standardization

    def forward(self, idx: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        emb = F.normalize(self.model(self.views(idx).to(device)).float(), dim=1)
        if not self.cross:
            return self.loss(emb, labels)
        return self.loss.loss(emb, labels, cross_domain_pairs(labels, self.side[idx.cpu()].to(labels.device)))
