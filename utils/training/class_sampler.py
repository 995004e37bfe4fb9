"""M images per identity in every batch, reproducible per epoch and split across DDP ranks.

pml's ``MPerClassSampler`` makes batches that each hold ``m`` images of every
identity drawn (so every anchor has positives). It draws from pml's global
``NUMPY_RANDOM``; this wrapper gives it a private ``RandomState`` seeded from
(seed, epoch), so every rank draws the same global order, and hands each rank
its contiguous share of every global batch (``batch_size`` is per rank and a
multiple of ``m``, so an identity's ``m`` images stay on one rank).

    >>> sampler = MPerClassShardSampler(labels, m=4, batch_size=32, world_size=2, rank=0)
    >>> sampler.set_epoch(epoch)  # like DistributedSampler
    >>> DataLoader(dataset, batch_size=32, sampler=sampler, drop_last=True)
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from pytorch_metric_learning.samplers import MPerClassSampler
from pytorch_metric_learning.utils import common_functions as pml_common
from torch.utils.data import Sampler

from utils.errors import KitError


class MPerClassShardSampler(Sampler[int]):
    """Indices for one rank: per-rank batches of ``batch_size`` with ``m`` images per identity.

    Raises:
        KitError: ``batch_size`` not a multiple of ``m``, fewer than 2 identities, or fewer identities
            than one global batch needs.
    """

    def __init__(
        self, labels: Sequence[int], m: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
    ):
        n_classes = len(set(labels))
        global_batch = batch_size * world_size
        if m < 1 or batch_size % m:
            raise KitError(f"--batch-size {batch_size} must be a multiple of --m-per-class {m}")
        if n_classes < 2:  # lowering --batch-size, as the next line advises, would train every batch on one identity
            raise KitError(f"{n_classes} training identity: batches of --m-per-class images per identity need at least 2 "
                           "(with 2 identities in DATA/train one is held out for validation): add identities")
        if m * n_classes < global_batch:
            raise KitError(
                f"{n_classes} training identities x --m-per-class {m} < a global batch of {global_batch}; "
                "lower --batch-size or raise --m-per-class"
            )
        length = max(len(labels), global_batch)  # one epoch: about one pass over the training images
        self.inner = MPerClassSampler(np.asarray(labels), m, batch_size=global_batch, length_before_new_iter=length)
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.inner) // self.world_size

    def __iter__(self) -> Iterator[int]:
        saved = pml_common.NUMPY_RANDOM
        pml_common.NUMPY_RANDOM = np.random.RandomState((self.seed * 1_000_003 + self.epoch) % 2**32)
        self.inner.labels = sorted(self.inner.labels)  # pml shuffles this list in place
        try:
            order = np.asarray(list(iter(self.inner)))
        finally:
            pml_common.NUMPY_RANDOM = saved
        shards = order.reshape(-1, self.world_size, self.batch_size)[:, self.rank]
        return iter(shards.reshape(-1).tolist())
