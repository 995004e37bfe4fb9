"""Run under torchrun with 2 ranks: each rank's loss is its rank + 1; rank 0 writes last.pt with the logged loss.

    torchrun --nproc_per_node=2 tests/helpers/ddp_loss_mean.py RUN_DIR
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from utils.distributed import barrier, cleanup, init_distributed  # noqa: E402
from utils.training.loop import LoopSettings, Trainer  # noqa: E402


class RankLoss(torch.nn.Module):
    def __init__(self, rank: int):
        super().__init__()
        self.w, self.rank = torch.nn.Parameter(torch.zeros(1)), rank

    def forward(self, x, y):
        return (self.w * x.sum()).sum() * 0 + (self.rank + 1.0)


if __name__ == "__main__":
    info, device = init_distributed("cpu")
    model = RankLoss(info.rank)
    batches = [(torch.ones(2, 1), torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.bool), ["", ""])] * 3
    trainer = Trainer(LoopSettings(epochs=1, grad_clip=0), run_dir=Path(sys.argv[1]), modules={"model": model}, step_module=model,
                      optimizer=torch.optim.SGD(model.parameters(), lr=0.1), device=device, amp=None, config={},
                      classes=["a"], dist_info=info)
    trainer.fit(batches)
    barrier(info)  # rank 0 writes last.pt after the step: neither rank tears the group down while the other still uses it
    cleanup(info)
