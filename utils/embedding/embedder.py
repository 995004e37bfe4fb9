"""One embedder object per model: everything a script passes to :func:`embed_images`, held once.

A model script builds one :class:`Embedder` (the model, its preprocessing, the
test-time views, batch size, AMP, where and under which key it caches) and hands
its :meth:`Embedder.embed_set` to the shared step:

    embedder = Embedder(model, transform, scale, device, key=f"resnet50|{weights_id(w)}",
                        views=tta_views(cfg.tta), amp=amp, batch_size=64, cache_dir=run_dir / "cache")
    emb = embed_task(task, embedder.embed_set)

Variants come from :meth:`Embedder.but` (the identity view without a cache for
the per-epoch validation, a new key once a checkpoint is restored). Under
``torchrun`` an embedder built with the run's ``dist_info`` embeds each rank's
share of every set and gathers the whole on every rank; the run files are
written by rank 0 alone (:func:`utils.runs.model_run.write_model_run`).

What identifies the embeddings for the cache is carried here: :attr:`key` (model,
weights fingerprint and the script's settings), :attr:`precision` and
:attr:`device_class`; :meth:`cache_tag` is the string handed to the cache.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from utils.data.image_dataset import Transform
from utils.distributed import DistInfo
from utils.embedding.embed import Forward, embed_images
from utils.embedding.views import PixelScale, View


@dataclass(frozen=True)
class Embedder:
    """A model with its preprocessing and embedding settings; ``embed_set(paths, desc)`` -> (n, d) L2-normalised.

    Attributes:
        forward: the model (an ``nn.Module`` is put in eval mode) or any batch -> embeddings callable.
        transform: PIL image -> (C, H, W) tensor in ``scale``'s units.
        scale: the model's pixel scale (mean, std), for the views.
        device: where the model runs.
        key: identifies the model and its weights (with a file's fingerprint) and the script's
            settings for the cache; '' embeds without a cache.
        views: test-time views, averaged (the identity first).
        batch_size, workers: images per batch and decoding processes.
        amp: autocast dtype, or None for float32.
        stack_views: all views of a batch in one model call.
        channels_last: NHWC batches with BatchNorm folded (CNNs; see ``embed_batches``).
        compile_model: ``torch.compile`` the model for this embedding.
        cache_dir: where embeddings are cached (None: nowhere).
        inputs: what each image is embedded from (e.g. its face or object crop); missing: itself.
        dist_info: under torchrun, each rank embeds its share of every set and all get the whole.
    """

    forward: Forward
    transform: Transform
    scale: PixelScale
    device: torch.device
    key: str = ""
    views: Sequence[View] = (View(),)
    batch_size: int = 64
    workers: int = 2
    amp: torch.dtype | None = None
    stack_views: bool = True
    channels_last: bool = False
    compile_model: bool = False
    cache_dir: Path | None = None
    inputs: Mapping[Path, Path] | None = None
    dist_info: DistInfo | None = None

    @property
    def precision(self) -> str:
        """The arithmetic the model runs in: ``float32`` or the autocast dtype (``bfloat16``, ``float16``)."""
        return "float32" if self.amp is None else str(self.amp).removeprefix("torch.")

    @property
    def device_class(self) -> str:
        """The kind of device (``cpu``, ``cuda``, ``mps``): results differ between kinds, not between GPUs of one."""
        return self.device.type

    def cache_tag(self) -> str:
        """The string that identifies these embeddings in the cache (with the files and the views)."""
        return self.key

    def but(self, **changes) -> Embedder:
        """A copy with some settings changed, e.g. ``but(views=views[:1], cache_dir=None)``."""
        return dataclasses.replace(self, **changes)

    def embed_set(self, paths: Sequence[Path], desc: str) -> np.ndarray:
        """The (n, d) float32 L2-normalised embeddings of ``paths`` (every view averaged), through the cache.

        Raises:
            KitError: an image cannot be read, or the model gives NaN/inf.
        """
        forward = self.forward.eval() if isinstance(self.forward, torch.nn.Module) else self.forward
        files = [self.inputs.get(p, p) for p in paths] if self.inputs is not None else paths
        cache_dir = self.cache_dir if self.key else None
        return embed_images(forward, files, self.transform, device=self.device, views=self.views, batch_size=self.batch_size,
                            workers=self.workers, amp=self.amp, scale=self.scale, desc=desc, cache_dir=cache_dir,
                            cache_tag=self.cache_tag() if cache_dir is not None else "", dist_info=self.dist_info,
                            stack_views=self.stack_views, channels_last=self.channels_last, compile_model=self.compile_model)
