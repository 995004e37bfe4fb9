"""Run under torchrun with 2 ranks: rank 0 does a long step (until the test writes DIR/go), rank 1 waits at a barrier.

    torchrun --nproc_per_node=2 tests/helpers/slow_rank.py DIR TIMEOUT_MIN

Each rank writes DIR/rank<N>_done after the barrier; with a timeout shorter than rank 0's step, rank 1's
barrier fails and the job dies.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from utils.distributed import barrier, cleanup, init_distributed  # noqa: E402

if __name__ == "__main__":
    folder, timeout_min = Path(sys.argv[1]), float(sys.argv[2])
    info, _ = init_distributed("cpu", timeout_min)
    if info.rank == 0:
        while not (folder / "go").exists():  # the long step: rank 0 reading every image alone, say
            time.sleep(0.05)
    else:
        (folder / "rank1_waiting").touch()
    barrier(info)
    (folder / f"rank{info.rank}_done").touch()
    cleanup(info)
