"""Seeds and determinism: the same command twice gives the same .npy on the CPU, and on a GPU with --deterministic.

Which guarantee holds where (docs/gpu.md):

- CPU: deterministic kernels asked for (``warn_only``), cuDNN irrelevant; the same .npy every time.
- CUDA, default: ``cudnn.benchmark`` on (the fastest convolution per shape) and nondeterministic
  kernels allowed (atomics in some backward passes): runs agree to float rounding, not bit for bit.
- ``--deterministic`` (CPU or CUDA): ``torch.use_deterministic_algorithms(True)`` without
  ``warn_only``, so an op with no deterministic version raises an error naming it;
  ``cudnn.benchmark`` off; ``CUBLAS_WORKSPACE_CONFIG`` set for cuBLAS.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs for reproducible matmuls under use_deterministic_algorithms


def seed_everything(seed: int, deterministic: bool = False, device: torch.device | None = None) -> torch.Generator:
    """Seed python, numpy and torch, set the determinism of ``device`` (:func:`set_determinism`);
    return a generator for DataLoader shuffling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    set_determinism(deterministic, device or torch.device("cpu"))
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def set_determinism(deterministic: bool, device: torch.device) -> str:
    """Apply ``--deterministic`` for ``device``; returns which guarantee now holds (strict, cpu or fast).

    Args:
        deterministic: strict mode: an op without a deterministic kernel raises (naming the op).
        device: without strict mode, CUDA gets cuDNN autotuning and any kernel; the CPU keeps
            deterministic kernels (warn-only), as it always had.
    """
    if deterministic:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)
        return "strict"
    if device.type == "cpu":
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
        return "cpu"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.use_deterministic_algorithms(False)
        return "fast"
    raise ValueError(f"device type {device.type!r}: expected cpu or cuda")


def worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive numpy/python seeds from torch's per-worker seed."""
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)
