"""The one embedding stack: views, the batched core, the array cache, sharding, and optional packages."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.paths import ROOT
from utils.cache import cached, files_key
from utils.data.augment import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from utils.deps import require
from utils.embedding.embed import embed_arrays, embed_images
from utils.embedding.step import similarities
from utils.embedding.views import PixelScale, View, render_view, tta_views
from utils.errors import KitError
from utils.runs.cosine import cosine_similarity

CPU = torch.device("cpu")


def _images(folder, n=7, size=24):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def _cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()


# ----------------------------------------------------------------------------- views


def test_brightness_view_means_the_same_on_raw_and_normalised_pixels():
    raw = torch.rand(2, 3, 16, 16) * 255
    scale = PixelScale(IMAGENET_MEAN, IMAGENET_STD)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    norm = (raw / 255 - mean) / std
    for view in (View(gain=1.2), View(gain=0.8, angle_deg=8.0), View(zoom=0.9)):
        a = render_view(raw, view, 16)
        b = render_view(norm, view, 16, scale)
        assert torch.allclose((a / 255 - mean) / std, b, atol=1e-4), view
    assert render_view(raw, View(gain=1.2), 16).max() <= 255.0  # clamped to the pixel range


def test_identity_and_flip_are_pixel_exact_and_groups_have_one_grammar():
    x = torch.rand(2, 3, 10, 12)
    assert render_view(x, View()) is x
    assert torch.equal(render_view(x, View(flip=True)), x.flip(3))
    assert tta_views([]) == [View()]
    assert tta_views(["flip"]) == [View(), View(flip=True)]
    assert tta_views(["scale", "flip"]) == tta_views(["flip", "scale"])
    with pytest.raises(KitError, match="--tta 'id'"):
        tta_views(["id"])


def test_blur_view_softens_fine_texture_and_keeps_flat_regions_and_range():
    x = torch.zeros(1, 3, 32, 32)
    x[..., ::2, :] = 255.0  # one-pixel stripes: the texture a sketch's hatching or JPEG blocks add
    x[:, :, 16:, :] = 100.0  # a flat region
    out = render_view(x, View(blur_px=1.0), 32)
    assert out.shape == x.shape and 0.0 <= out.min() and out.max() <= 255.0
    stripes = lambda t: (t[..., 2:12, 1:-1] - t[..., 3:13, 1:-1]).abs().mean()
    assert stripes(out) < 0.2 * stripes(x)  # the stripes nearly gone ...
    assert torch.allclose(out[..., 22:, :], x[..., 22:, :], atol=1e-3)  # ... a flat region unchanged
    assert tta_views(["blur", "flip"]) == [View(), View(flip=True), View(blur_px=1.0)]
    scale = PixelScale(IMAGENET_MEAN, IMAGENET_STD)  # linear: the same view on normalised input
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose((out / 255 - mean) / std, render_view((x / 255 - mean) / std, View(blur_px=1.0), 32, scale), atol=1e-4)


# ----------------------------------------------------------------------------- the core


def test_flip_tta_changes_embeddings_only_for_a_model_that_sees_left_from_right(tmp_path):
    paths = _images(tmp_path / "imgs")
    tf = eval_transform(24)
    pooled = lambda x: x.mean(dim=(2, 3))  # noqa: E731 - mirror-invariant
    a = embed_images(pooled, paths, tf, device=CPU, workers=0)
    b = embed_images(pooled, paths, tf, device=CPU, views=tta_views(["flip"]), workers=0)
    assert np.allclose(a, b, atol=1e-6)
    left = lambda x: x[:, :, :, : x.shape[3] // 2].mean(dim=(2, 3))  # noqa: E731 - not invariant
    c = embed_images(left, paths, tf, device=CPU, workers=0)
    d = embed_images(left, paths, tf, device=CPU, views=tta_views(["flip"]), workers=0)
    assert not np.allclose(c, d, atol=1e-3)
    assert np.allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)


def test_batch_size_does_not_change_embeddings(tmp_path):
    paths = _images(tmp_path / "imgs")
    model = _cnn()
    one = embed_images(model, paths, eval_transform(24), device=CPU, batch_size=1, workers=0)
    many = embed_images(model, paths, eval_transform(24), device=CPU, batch_size=5, workers=0)
    assert np.allclose(one, many, atol=1e-5)
    pixels = np.stack([np.asarray(Image.open(p).resize((24, 24))) for p in paths])
    arr1 = embed_arrays(lambda x: x.mean(dim=(2, 3)), pixels, tta_views(["flip"]), device=CPU, out_px=20, batch_size=2)
    arr2 = embed_arrays(lambda x: x.mean(dim=(2, 3)), pixels, tta_views(["flip"]), device=CPU, out_px=20, batch_size=7)
    assert arr1.shape == (7, 3) and np.allclose(arr1, arr2, atol=1e-6)


def test_a_broken_image_stops_embedding_with_its_name(tmp_path):
    paths = _images(tmp_path / "imgs")
    paths[3].write_bytes(b"not a png")
    with pytest.raises(KitError, match="img3.png"):
        embed_images(_cnn(), paths, eval_transform(24), device=CPU, workers=0)


def test_similarities_are_float32_cosines():
    rng = np.random.default_rng(0)
    e = {k: rng.standard_normal((n, 5)).astype(np.float32) for k, n in
         (("val_query", 3), ("val_gallery", 4), ("test_query", 2), ("test_gallery", 6))}
    e = {k: v / np.linalg.norm(v, axis=1, keepdims=True) for k, v in e.items()}
    s = similarities(e)
    assert s["val"].shape == (3, 4) and s["test"].shape == (2, 6) and s["test"].dtype == np.float32
    assert np.allclose(s["val"], e["val_query"] @ e["val_gallery"].T)
    assert cosine_similarity(e["test_query"], e["test_gallery"]).dtype == np.float32


# ----------------------------------------------------------------------------- the cache


def test_cache_reuses_then_recovers_from_corrupt_or_nan_entries(tmp_path, caplog):
    calls = []

    def compute():
        calls.append(1)
        return np.ones((3, 2), np.float32)

    path = tmp_path / "emb_x.npy"
    assert cached(path, compute, "gallery").sum() == 6 and len(calls) == 1
    assert cached(path, compute, "gallery").sum() == 6 and len(calls) == 1  # from the cache
    path.write_bytes(path.read_bytes()[:40])  # truncated by a kill
    with caplog.at_level(logging.WARNING):
        assert cached(path, compute, "gallery").shape == (3, 2)
    assert len(calls) == 2 and "corrupt cache entry" in caplog.text
    np.save(path, np.full((3, 2), np.nan, np.float32))  # NaN cached by an older kit
    assert np.isfinite(cached(path, compute, "gallery")).all() and len(calls) == 3
    assert "NaN" in caplog.text


def test_a_nan_result_is_an_error_and_is_never_cached(tmp_path):
    path = tmp_path / "emb_y.npy"
    with pytest.raises(KitError, match="gallery: the model gave NaN"):
        cached(path, lambda: np.array([[np.nan, 1.0]], np.float32), "gallery")
    assert not path.exists()


def test_truncated_npz_crop_cache_is_recomputed(tmp_path):
    path = tmp_path / "crops_x.npz"
    make = lambda: {"pixels": np.zeros((2, 4, 4, 3), np.uint8), "boxes": np.full((2, 4), np.nan, np.float32)}  # noqa: E731
    cached(path, make, "query crops", finite_keys=())  # NaN boxes mean "no face": allowed
    path.write_bytes(path.read_bytes()[:100])
    out = cached(path, make, "query crops", finite_keys=())
    assert out["pixels"].shape == (2, 4, 4, 3)


def test_files_key_changes_with_content_and_settings(tmp_path):
    paths = _images(tmp_path / "imgs", n=2)
    k = files_key(paths, "a")
    assert files_key(paths, "b") != k
    os.utime(paths[0], ns=(1, 1))
    assert files_key(paths, "a") != k


# ----------------------------------------------------------------------------- optional packages and sharding


def test_a_missing_optional_package_is_one_line_with_the_install_command():
    with pytest.raises(KitError, match="--embedder x needs the Python package 'no_such_pkg_kit'.*pip install"):
        require("no_such_pkg_kit", "--embedder x")
    require("numpy", "anything")


@pytest.mark.slow
def test_embedding_sharded_under_torchrun_equals_one_process(tmp_path):
    paths = _images(tmp_path / "imgs", n=7)
    single = embed_images(_cnn(), paths, eval_transform(24), device=CPU, views=tta_views(["flip"]), batch_size=3, workers=0)
    out = tmp_path / "sharded.npy"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "tests" / "helpers" / "sharded_embed.py"), str(tmp_path / "imgs"), str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert np.allclose(np.load(out), single, atol=1e-6)


def test_stacked_views_and_channels_last_give_the_same_embeddings(tmp_path):
    paths = _images(tmp_path / "imgs")
    views = tta_views(["flip", "rot", "brightness", "scale"])
    base = embed_images(_cnn(), paths, eval_transform(24), device=CPU, views=views, workers=0)
    stacked = embed_images(_cnn(), paths, eval_transform(24), device=CPU, views=views, workers=0, stack_views=True)
    nhwc = embed_images(_cnn(), paths, eval_transform(24), device=CPU, views=views, workers=0, stack_views=True, channels_last=True)
    assert np.allclose(base, stacked, atol=1e-5) and np.allclose(base, nhwc, atol=1e-5)


def test_worker_count_is_chosen_for_the_machine():
    from utils.device import default_workers, is_cnn, resolve_workers

    assert 1 <= default_workers() <= 8 and resolve_workers(-1) == default_workers() and resolve_workers(0) == 0
    with pytest.raises(KitError, match="--workers -2"):
        resolve_workers(-2)
    assert is_cnn(torch.nn.Sequential(*[torch.nn.Conv2d(3, 3, 1) for _ in range(5)]))
    assert not is_cnn(torch.nn.Linear(3, 3))


@pytest.mark.slow
def test_compiled_model_gives_the_same_embeddings(tmp_path):
    paths = _images(tmp_path / "imgs", n=5)
    plain = embed_images(_cnn(), paths, eval_transform(24), device=CPU, batch_size=2, workers=0)
    compiled = embed_images(_cnn(), paths, eval_transform(24), device=CPU, batch_size=2, workers=0, compile_model=True)
    assert np.allclose(plain, compiled, atol=1e-5)  # batches of 2, 2 and 1: dynamic shapes, one compile


def _bn_cnn():
    """Conv-BN-ReLU twice with trained-looking BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3), torch.nn.BatchNorm2d(8)]
    for bn in layers[1::3] + layers[4:]:
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2), bn.bias.data.uniform_(-1, 1)
    return torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()


class _Untraceable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _bn_cnn()

    def forward(self, x):
        return self.net(x) if x.sum() > -1e9 else -self.net(x)  # data-dependent control flow: torch.fx cannot trace it


def test_batchnorm_is_folded_into_an_inference_copy_with_the_same_embeddings(tmp_path):
    from utils.embedding.embed import fold_batchnorm

    model, x = _bn_cnn(), torch.randn(3, 3, 16, 16)
    folded = fold_batchnorm(model)
    has_bn = lambda m: any(isinstance(k, torch.nn.BatchNorm2d) for k in m.modules())  # noqa: E731
    assert folded is not model and not has_bn(folded) and has_bn(model)  # the caller's model is left as it was
    with torch.inference_mode():
        assert torch.allclose(model(x), folded(x), atol=1e-5)
    assert fold_batchnorm(model.train()) is model.train()  # batch statistics in training: nothing to fold
    odd = _Untraceable().eval()
    assert fold_batchnorm(odd) is odd  # not traceable: used as it is
    paths = _images(tmp_path / "imgs", n=5)
    plain = embed_images(_bn_cnn(), paths, eval_transform(24), device=CPU, batch_size=2, workers=0)
    fast = embed_images(_bn_cnn(), paths, eval_transform(24), device=CPU, batch_size=2, workers=0, channels_last=True)
    assert np.allclose(plain, fast, atol=1e-5)


def test_stage_features_fold_their_batchnorm():
    import timm

    from utils.embedding.embed import fold_batchnorm
    from utils.embedding.stage_features import StageFeatures

    feats = StageFeatures(timm.create_model("resnet18", pretrained=False, num_classes=0), stage=2, pool="gem").eval()
    folded = fold_batchnorm(feats)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(feats(x), folded(x), atol=1e-5)


def test_a_cnn_on_the_cpu_runs_in_cache_sized_slices(tmp_path):
    from utils.embedding.embed import CPU_CNN_SLICE

    seen = []
    model = _cnn()
    model.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    paths = _images(tmp_path / "imgs", n=20)
    sliced = embed_images(model, paths, eval_transform(24), device=CPU, batch_size=20, workers=0, channels_last=True)
    assert seen == [CPU_CNN_SLICE, CPU_CNN_SLICE, 20 - 2 * CPU_CNN_SLICE]
    seen.clear()
    whole = embed_images(model, paths, eval_transform(24), device=CPU, batch_size=20, workers=0)  # not a channels-last CNN: one call
    assert seen == [20] and np.allclose(sliced, whole, atol=1e-5)
