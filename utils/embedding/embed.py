"""Batched embedding with test-time views, one core for every model script.

:func:`embed_batches` is the core: every batch goes to the device once, each
view of it (:mod:`utils.embedding.views`) goes through the model, and the
L2-normalised embeddings of the views are averaged, then normalised again.
:func:`embed_images` feeds it from image files (a DataLoader decoding in
worker processes); :func:`embed_arrays` from an in-memory pixel array (the
face path's crops). Both cache through :mod:`utils.cache` and, under
``torchrun``, split the images across ranks and gather the result on every rank.
"""

from __future__ import annotations

import logging
import weakref
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from utils.cache import cached, files_key, model_of, numbers_tag, weights_version
from utils.data.image_dataset import ImageDataset, Transform
from utils.distributed import DistInfo
from utils.embedding.views import PixelScale, View, render_view
from utils.errors import KitError
from utils.progress import ProgressBar

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], torch.Tensor]
CPU_CNN_SLICE = 8  # images per forward call of a CNN on the CPU (benchmarks/embedding/bench_embed.py)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32, copy=False)


@torch.inference_mode()
def embed_batches(
    forward: Forward,
    batches: Iterable[torch.Tensor],
    views: Sequence[View],
    *,
    device: torch.device,
    total: int,
    amp: torch.dtype | None = None,
    out_px: int | None = None,
    scale: PixelScale | None = None,
    desc: str = "embedding",
    stack_views: bool = False,
    channels_last: bool = False,
) -> np.ndarray:
    """Embed every view of every batch; (n, d) float32, L2-normalised, TTA-averaged.

    Args:
        forward: batch (B, C, H, W) on ``device`` -> embeddings (B, d).
        batches: (B, C, H, W) float tensors (CPU or device).
        views: test-time views; the identity first (see ``tta_views``).
        total: number of images, for the progress bar.
        out_px, scale: passed to :func:`render_view` (model input side, pixel units).
        stack_views: put all views of a batch through the model in one call
            (fewer, bigger calls; the same result up to float rounding).
        channels_last: hand the model NHWC batches (convert a CNN with
            ``model.to(memory_format=torch.channels_last)`` to match); on the CPU,
            in slices of :data:`CPU_CNN_SLICE` images.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    # a CNN on the CPU runs sub-batches whose activations stay in cache (ResNet-50 at 224 px,
    # 2 cores: 14 images/s in slices of 8 vs 10 in batches of 32); the GPU takes the whole batch
    step = CPU_CNN_SLICE if channels_last and device.type == "cpu" else None

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            if step is not None and len(x) > step:
                return torch.cat([forward(part.contiguous(memory_format=fmt)).float() for part in x.split(step)])
            return forward(x.contiguous(memory_format=fmt)).float()

    chunks = []
    with ProgressBar(desc, total=total) as bar:
        for x in batches:
            x = x.to(device, non_blocking=True)
            if stack_views and len(views) > 1:
                parts = run(torch.cat([render_view(x, v, out_px, scale) for v in views])).split(len(x))
            else:
                parts = [run(render_view(x, v, out_px, scale)) for v in views]
            acc = None
            for e in parts:
                e = torch.nn.functional.normalize(e, dim=1)
                acc = e if acc is None else acc + e
            chunks.append(acc.cpu().numpy())
            bar.advance(len(x))
    if not chunks:
        raise KitError(f"{desc}: no images to embed")
    return l2_normalize(np.concatenate(chunks))


def fold_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """An inference copy of an eval-mode network with every BatchNorm folded into the
    convolution (or linear layer) before it, by ``torch.fx``; ``module`` itself when it
    is training, has no BatchNorm, is already compiled (``torch.compile``: fold before
    compiling), or cannot be traced (data-dependent control flow).

    Folding saves the BatchNorm's pass over each activation map: ResNet-50 on 2 CPU
    cores embeds about 1.3x faster (benchmarks/embedding/bench_embed.py). Outputs equal the
    unfolded module's up to float rounding.
    """
    if module.training or hasattr(module, "_orig_mod") or not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        return module
    from torch.fx.experimental.optimization import fuse  # imported here: fx is slow to import and only CNNs need it

    try:
        return fuse(module)
    except Exception as exc:  # torch.fx raises many kinds on untraceable code
        log.debug("BatchNorm not folded (%s is not traceable: %s)", type(module).__name__, exc)
        return module


_PREPARED: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, tuple[tuple, Forward]]]" = weakref.WeakKeyDictionary()


def prepared_forward(forward: Forward, channels_last: bool = False, compile_model: bool = False) -> Forward:
    """``forward`` ready for inference: a CNN module folded (:func:`fold_batchnorm`) and channels-last,
    then ``torch.compile``-d, each once per process for a model and its weights' version.

    The four image sets of a run (and validation between epochs while the weights do not change) reuse
    one folded copy and one compiled graph; a step of the optimiser or a checkpoint loaded into the
    model makes a new one (the folded copy holds the weights it was made from).
    """
    if not channels_last and not compile_model:
        return forward
    model = model_of(forward)
    version = weights_version(model) if model is not None else None
    key = (getattr(forward, "__name__", "__call__"), channels_last, compile_model)
    memo = _PREPARED.get(model, {}) if model is not None else {}
    if version is not None and key in memo and memo[key][0] == version:
        return memo[key][1]
    out = forward
    if channels_last and isinstance(out, torch.nn.Module):
        out = fold_batchnorm(out).to(memory_format=torch.channels_last)
    if compile_model:
        out = torch.compile(out, dynamic=True)
    if version is not None:
        _PREPARED.setdefault(model, {})[key] = (version, out)
    return out


def _shard(n: int, info: DistInfo | None) -> slice:
    """This rank's contiguous share of ``n`` items (everything without DDP)."""
    if info is None or not info.ddp:
        return slice(0, n)
    per = -(-n // info.world_size)
    return slice(min(n, info.rank * per), min(n, (info.rank + 1) * per))


def _gather(part: np.ndarray, info: DistInfo | None) -> np.ndarray:
    """Every rank's part, concatenated in rank order, on every rank."""
    if info is None or not info.ddp:
        return part
    parts: list[np.ndarray | None] = [None] * info.world_size
    dist.all_gather_object(parts, part)
    return np.concatenate([p for p in parts if p is not None and len(p)])


def _readable_batches(loader: DataLoader) -> Iterator[torch.Tensor]:
    """The loader's image batches; a file that cannot be read stops with its one-line error."""
    for x, _, ok, err in loader:
        if not bool(ok.all()):
            raise KitError(next(e for e, good in zip(err, ok.tolist()) if not good))
        yield x


def embed_images(
    forward: Forward,
    paths: Sequence[Path],
    transform: Transform,
    *,
    device: torch.device,
    views: Sequence[View] = (View(),),
    batch_size: int = 64,
    workers: int = 2,
    amp: torch.dtype | None = None,
    scale: PixelScale | None = None,
    desc: str = "embedding",
    cache_dir: Path | None = None,
    cache_tag: str = "",
    dist_info: DistInfo | None = None,
    stack_views: bool = False,
    channels_last: bool = False,
    compile_model: bool = False,
) -> np.ndarray:
    """Embed image files in batches; (n, d) float32, L2-normalised.

    Args:
        transform: PIL image -> (C, H, W) tensor in ``scale``'s units.
        views: test-time views, averaged.
        cache_dir: if given, reuse embeddings saved there for the same files,
            views and ``cache_tag`` (which must identify the model weights).
        dist_info: under torchrun, each rank embeds its share; all get the whole.
        stack_views, channels_last: see :func:`embed_batches` (a CNN module is
            converted to channels-last here, on an inference copy with its
            BatchNorms folded into the convolutions: :func:`fold_batchnorm`).
        compile_model: run ``forward`` through ``torch.compile`` (dynamic batch size);
            the first batch pays the compile time, which large galleries and GPUs win back.

    Raises:
        KitError: an image cannot be read (query and gallery need every one).
    """
    paths = [Path(p) for p in paths]
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"emb_{files_key(paths, f'{cache_tag}|{views!r}|{numbers_tag(forward, amp, device)}')}.npy"
    forward = prepared_forward(forward, channels_last, compile_model)

    def compute() -> np.ndarray:
        mine = paths[_shard(len(paths), dist_info)]
        loader = DataLoader(ImageDataset(mine, transform), batch_size=batch_size, shuffle=False,
                            num_workers=workers, pin_memory=device.type == "cuda")
        part = embed_batches(forward, _readable_batches(loader), views, device=device, total=len(mine), amp=amp, scale=scale,
                             desc=desc, stack_views=stack_views, channels_last=channels_last) if mine else np.zeros((0, 0), np.float32)
        return _gather(part, dist_info)

    if dist_info is not None and dist_info.ddp:
        return compute()  # every rank takes part; sharded runs are not cached
    return cached(cache, compute, desc)


def embed_arrays(
    forward: Forward,
    pixels: np.ndarray,
    views: Sequence[View],
    *,
    device: torch.device,
    out_px: int,
    batch_size: int = 64,
    amp: torch.dtype | None = None,
    desc: str = "embedding",
    stack_views: bool = True,
) -> np.ndarray:
    """Embed an (n, H, W, 3) uint8 pixel array (e.g. face context crops) with every view (stacked in one call by default)."""

    def batches() -> Iterator[torch.Tensor]:
        for start in range(0, len(pixels), batch_size):
            batch = torch.from_numpy(pixels[start : start + batch_size])
            if device.type == "cuda":
                batch = batch.pin_memory()
            yield batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float()

    return embed_batches(forward, batches(), views, device=device, total=len(pixels), amp=amp,
                         out_px=out_px, scale=PixelScale.raw255(), desc=desc, stack_views=stack_views)
