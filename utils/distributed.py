"""DistributedDataParallel set-up in the nanoGPT style: the same script, one process per GPU.

    torchrun --standalone --nproc_per_node=4 train_clip_arcface.py --data DATA

``torchrun`` sets RANK/LOCAL_RANK/WORLD_SIZE; without them the script runs as
one plain process. Every rank trains on its share of each batch and embeds
its share of each image set (:func:`utils.embedding.embed.embed_images`);
rank 0 (``master``) alone logs and writes checkpoints, caches and run files. NCCL on GPUs, gloo on CPU (which lets tests run two
processes on a laptop).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from utils.device import pick_device
from utils.errors import KitError

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_TIMEOUT_MIN = 60.0  # --dist-timeout-min


@dataclass
class DistInfo:
    """Where this process stands; ``ddp`` is False for a plain single-process run."""

    ddp: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str = "auto", timeout_min: float = DEFAULT_TIMEOUT_MIN) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun; pick this process's device.

    Args:
        device_name: ``--device``.
        timeout_min: ``--dist-timeout-min``: how long a collective waits for a slow rank before the
            job is killed (NCCL's own default is 10 minutes, shorter than rank 0 reading a large
            dataset alone on a first run, or validating and writing checkpoints each epoch).

    Raises:
        KitError: more processes than GPUs on this node with a CUDA device; a timeout that is not positive.
    """
    if timeout_min <= 0:
        raise KitError(f"--dist-timeout-min {timeout_min}: must be positive (minutes)")
    if int(os.environ.get("RANK", -1)) == -1:
        return DistInfo(), pick_device(device_name)
    info = DistInfo(True, int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        if info.local_rank >= torch.cuda.device_count():
            raise KitError(f"LOCAL_RANK {info.local_rank}: only {torch.cuda.device_count()} GPUs; lower --nproc_per_node")
        device = torch.device(f"cuda:{info.local_rank}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(minutes=timeout_min))
    log.info("DDP rank %d/%d on %s", info.rank, info.world_size, device)
    return info, device


def barrier(info: DistInfo) -> None:
    if info.ddp:
        dist.barrier()


def broadcast(info: DistInfo, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a no-op without DDP)."""
    if not info.ddp:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def master_first(info: DistInfo, make: Callable[[], T]) -> T:
    """``make()`` on rank 0 first, then on the other ranks once rank 0 is done (a barrier between).

    For a step that fills a cache (face or object crops, detections): rank 0 computes and writes
    every entry; the other ranks find them all there and only read, so no file is written by two
    ranks. Without DDP it is ``make()``.
    """
    if not info.ddp:
        return make()
    value = make() if info.master else None
    barrier(info)
    return value if info.master else make()  # type: ignore[return-value]


def cleanup(info: DistInfo) -> None:
    if info.ddp and dist.is_initialized():
        dist.destroy_process_group()


def under_torchrun() -> bool:
    """Whether this process is one of several started by ``torchrun`` (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def refuse_torchrun(script: str, why: str) -> None:
    """Stop a script that runs as one process only, before it does anything, when torchrun started several.

    Raises:
        KitError: WORLD_SIZE > 1 (one line: the script, why, and how to start it).
    """
    if under_torchrun():
        raise KitError(f"{script}: runs as one process only ({why}); start it with python, not torchrun "
                       f"(WORLD_SIZE={os.environ['WORLD_SIZE']})")


def writes_runs() -> bool:
    """Whether this process writes run files: rank 0 under torchrun, and any plain single process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
