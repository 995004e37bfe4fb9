"""Run under torchrun with 2 ranks: a BatchNorm model trained on rank-dependent batches, validated by a collective.

    torchrun --nproc_per_node=2 tests/helpers/ddp_shared_eval.py RUN_DIR

The validation (``shared_evaluate=True``) gathers every rank's BatchNorm buffers and scores 1.0 when all ranks
hold the same ones, 0.0 when not; rank 0 writes last.pt with that history. Each rank's own last batch moves its
running statistics, so only buffers handed over from rank 0 before validation score 1.0.
"""

import gc
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from utils.distributed import barrier, cleanup, init_distributed  # noqa: E402
from utils.training.loop import LoopSettings, Trainer  # noqa: E402


class SquareLoss(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return self.model(x).pow(2).mean()


def same_buffers_everywhere(model: torch.nn.Module, world_size: int) -> float:
    mine = torch.cat([b.detach().double().flatten() for b in model.buffers()])
    every = [torch.zeros_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine)
    return float(all(torch.equal(every[0], other) for other in every[1:]))


if __name__ == "__main__":
    info, device = init_distributed("cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    gen = torch.Generator().manual_seed(100 + info.rank)  # each rank its own data
    batches = [(torch.randn(4, 3, generator=gen), torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.bool), [""] * 4)
               for _ in range(3)]
    trainer = Trainer(LoopSettings(epochs=2, grad_clip=0), run_dir=Path(sys.argv[1]), modules={"model": model},
                      step_module=DDP(SquareLoss(model)), optimizer=torch.optim.SGD(model.parameters(), lr=0.1), device=device,
                      amp=None, config={}, classes=["a"], dist_info=info, shared_evaluate=True,
                      evaluate=lambda: same_buffers_everywhere(model, info.world_size))
    trainer.fit(batches)
    del trainer  # DDP's reducer goes before the group: freed at interpreter exit after it, gloo can abort
    gc.collect()
    barrier(info)  # rank 0 writes last.pt after the last validation: neither rank tears the group down before
    cleanup(info)
