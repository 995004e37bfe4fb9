"""A toy model, data and Trainer for the tests of the shared training loop (utils/training/loop.py):
a linear classifier on 4-d points of 3 classes, trained in milliseconds on the CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from utils.training.loop import LoopSettings, Trainer


class Toy(nn.Module):
    """A linear classifier; ``forward(x, y)`` is the loss, as the loop expects. ``steps`` counts the
    loss computations, i.e. the training steps the loop took with it as its ``step_module``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 3)
        self.steps = 0

    def forward(self, x, y):
        self.steps += 1
        return F.cross_entropy(self.net(x), y)


def toy_loader(n_batches: int = 4, seed: int = 0) -> list[tuple]:
    """``n_batches`` batches of 8 separable points, shaped as the loop's loader yields them: (x, y, ok, error)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        y = torch.randint(0, 3, (8,), generator=g)
        x = F.one_hot(y, 4).float() * 3 + 0.1 * torch.randn(8, 4, generator=g)
        batches.append((x, y, torch.ones(8, dtype=torch.bool), [""] * 8))
    return batches


def toy_trainer(tmp_path, scores=None, data_key="", config=None, **settings) -> tuple[Trainer, Toy]:
    """A Trainer of a fresh :class:`Toy` writing to ``tmp_path``; validation returns ``scores`` in turn
    (None: no validation); ``settings`` override :class:`LoopSettings` (3 epochs, half an epoch of warm-up)."""
    torch.manual_seed(0)
    model = Toy()
    it = iter(scores) if scores is not None else None
    trainer = Trainer(
        LoopSettings(**{"epochs": 3, "warmup_epochs": 0.5, **settings}), run_dir=tmp_path, modules={"model": model},
        step_module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), device=torch.device("cpu"), amp=None,
        config=config or {"model": "toy", "lr": 0.5}, classes=["a", "b", "c"], resume_keys=("model",),
        evaluate=(lambda: next(it)) if it is not None else None, data_key=data_key,
    )
    return trainer, model
