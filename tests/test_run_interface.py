"""One interface for a loaded split of either run form (full matrices, top-k): the submission's
lists come from ``load_split(run).top_lists(k)`` with no branch on the form; and the embedder
object gives exactly what ``embed_images`` gives with the same settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from utils.data.augment import eval_transform
from utils.embedding.embed import embed_images
from utils.embedding.embedder import Embedder
from utils.embedding.views import PixelScale, tta_views
from utils.errors import KitError
from utils.runs.similarity_io import SimMatrix, save_run
from utils.runs.topk_run import TopkSplit, load_split, write_topk_run

CPU = torch.device("cpu")


def _emb(seed: int, n: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_both_forms_load_as_one_interface_with_the_same_top_lists(tmp_path):
    q, g = _emb(0, 25), _emb(1, 60)
    qn, gn = [f"q{i}.jpg" for i in range(25)], [f"g{i}.png" for i in range(60)]
    save_run(tmp_path / "matrix", {"test": SimMatrix(q @ g.T, qn, gn)}, {"model": "m"})
    write_topk_run(tmp_path / "topk", {"test": (q, g, qn, gn)}, {"model": "m"}, k=20)
    matrix, topk = load_split(tmp_path / "matrix"), load_split(tmp_path / "topk")
    assert isinstance(matrix, SimMatrix) and isinstance(topk, TopkSplit) and topk.query_emb is None
    assert matrix.query_names == topk.query_names == qn and matrix.gallery_names == topk.gallery_names == gn
    assert matrix.top_lists(10) == topk.top_lists(10)
    assert matrix.top_lists(20) == topk.top_lists(20)
    with pytest.raises(KitError, match="kept 20 candidates per query; a top-21"):
        topk.top_lists(21)
    with pytest.raises(KitError, match="the gallery has 60 images; a top-61"):
        matrix.top_lists(61)


def test_embedder_equals_embed_images_with_the_same_settings_and_caches_under_its_key(tmp_path):
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(paths[-1])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    scale, tf, views = PixelScale((0.5,) * 3, (0.25,) * 3), eval_transform(16), tta_views(["flip"])
    direct = embed_images(model.eval(), paths, tf, device=CPU, views=views, batch_size=2, workers=0, scale=scale, stack_views=True)
    embedder = Embedder(model, tf, scale, CPU, key="m|none", views=views, batch_size=2, workers=0, cache_dir=tmp_path / "cache")
    assert np.array_equal(embedder.embed_set(paths, "set"), direct)
    assert len(list((tmp_path / "cache").glob("emb_*.npy"))) == 1  # cached under its key
    assert np.array_equal(embedder.but(key="").embed_set(paths, "set"), direct)  # no key: no cache
    assert len(list((tmp_path / "cache").glob("emb_*.npy"))) == 1
    assert embedder.precision == "float32" and embedder.but(amp=torch.bfloat16).precision == "bfloat16" and embedder.device_class == "cpu"
    # an input map embeds another file for an image (a crop) and keys the cache by that file
    crops = embedder.but(inputs={paths[0]: paths[1]})
    assert np.allclose(crops.embed_set(paths[:2], "set")[0], direct[1], atol=1e-6)
