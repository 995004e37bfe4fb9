"""FaceNet fine-tuning (utils/faces/finetune.py, train_face_adapter.py --adapter finetune): the early part
(its first blocks trained, the rest frozen, every BatchNorm statistic as loaded) and renders of the real
training photos made afresh each step (--rendered-pairs), as synthetic-side pairs of the pair loss."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

import infer_facenet
import train_face_adapter
from utils.errors import KitError, run_cli
from utils.faces.cascade import grey3
from utils.faces.finetune import (
    EARLY_BLOCKS,
    CropPairStep,
    StepRenders,
    finetune_block_names,
    freeze_frozen_norms,
    norm_train_blocks,
    unfreeze_blocks,
)
from utils.faces.styles import TRAIN_STYLES, StyleLibrary

FAST_STYLES = StyleLibrary(styles=("colour_map", "oil", "pencil"), max_compose=1)  # OpenCV only: quick on tiny crops


def test_the_early_part_trains_the_first_blocks_and_keeps_every_batchnorm_statistic():
    from facenet_pytorch import InceptionResnetV1

    model = InceptionResnetV1()
    names = unfreeze_blocks(model, "early", 3)
    assert names == ["conv2d_1a", "conv2d_2a", "conv2d_2b"] == list(EARLY_BLOCKS[:3])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.split(".")[0] in names for n in trained)
    assert "conv2d_1a.bn.weight" in trained and "conv2d_3b.conv.weight" not in trained and "last_linear.weight" not in trained
    model.train()
    freeze_frozen_norms(model, norm_train_blocks("early", names))
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d))
    model.train()
    freeze_frozen_norms(model, norm_train_blocks("late", finetune_block_names("late", 2)))
    assert model.last_bn.training and not model.conv2d_1a.bn.training  # the late part's own statistics update
    assert finetune_block_names("early", 7)[-1] == "repeat_1" and finetune_block_names("late", 1) == ["last_bn"]
    with pytest.raises(KitError, match=r"--finetune-blocks 8: between 1 and 7 for --finetune-part early"):
        finetune_block_names("early", 8)
    with pytest.raises(KitError, match="--finetune-part 'middle'"):
        unfreeze_blocks(model, "middle", 2)


class Recorder(nn.Module):
    """A tiny embedder that keeps the batches it was given."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 8))
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.net(x)


def _crops(n: int = 6) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 40, 40, 3), dtype=np.uint8)


def test_renders_of_a_batchs_real_photos_join_it_as_synthetic_pairs_of_their_person():
    torch.manual_seed(0)
    pixels = _crops()
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    only_real = np.zeros(6, np.int64)  # no synthetic image in the batch: real<->synthetic pairs are none
    idx = torch.arange(6)
    model = Recorder()
    plain = CropPairStep(model, pixels, only_real, "contrastive", cross=True, input_px=32)
    assert plain(idx, labels).item() == 0.0 and model.seen[-1].shape[0] == 6  # nothing to pair
    renders = StepRenders(pixels, only_real == 0, FAST_STYLES, per_photo=2, colour=None, seed=5)
    step = CropPairStep(model, pixels, only_real, "contrastive", cross=True, input_px=32, renders=renders)
    loss = step(idx, labels)
    assert loss.item() > 0 and model.seen[-1].shape[0] == 6 + 12 and step.batch_sizes == [18]
    loss.backward()
    assert model.net[0].weight.grad.abs().sum() > 0  # the real<->rendered pairs reach the weights
    crops, batch_labels, side = step.batch(idx, labels)
    assert batch_labels.tolist() == [0, 0, 1, 1, 2, 2, *[0] * 4, *[1] * 4, *[2] * 4] and side.tolist() == [0] * 6 + [1] * 12
    assert not any(torch.equal(crops[6 + 2 * i], crops[i]) for i in range(6))  # renders, not copies
    assert renders.rendered == 24 and sum(renders.styles_used.values()) == 24 and set(renders.styles_used) <= set(FAST_STYLES.names())


def test_only_real_photos_are_rendered_in_the_run_colour_and_the_same_seed_gives_the_same_renders():
    pixels = _crops()
    real = np.array([True, False, True, False, False, True])
    a = StepRenders(pixels, real, FAST_STYLES, per_photo=3, colour=grey3, seed=1)
    b = StepRenders(pixels, real, FAST_STYLES, per_photo=3, colour=grey3, seed=1)
    rows = np.array([1, 0, 5, 3])
    (ra, pa), (rb, pb) = a(rows), b(rows)
    assert pa.tolist() == [1, 1, 1, 2, 2, 2] and torch.equal(ra, rb) and np.array_equal(pa, pb)
    assert torch.equal(ra[..., 0], ra[..., 1]) and torch.equal(ra[..., 1], ra[..., 2])  # --face-colour grey, as every crop
    assert not torch.equal(a(rows)[0], ra)  # the next step draws new styles and patches
    assert a(np.array([1, 3]))[0].shape == (0, 40, 40, 3)
    with pytest.raises(KitError, match="--rendered-pairs 0"):
        StepRenders(pixels, real, FAST_STYLES, per_photo=0, colour=None, seed=0)


@pytest.mark.parametrize("flags, message", [
    (["--adapter", "mlp", "--finetune-part", "early"], "--finetune-part early: chooses FaceNet's blocks for --adapter finetune, not --adapter mlp"),
    (["--adapter", "finetune", "--finetune-part", "early", "--finetune-blocks", "8"], "--finetune-blocks 8: between 1 and 7 for --finetune-part early"),
    (["--adapter", "none", "--rendered-pairs", "2"], "--rendered-pairs trains the adapter or the fine-tune"),
])
def test_a_bad_combination_is_one_line_and_exit_2_before_anything_is_written(rehearsal_data_session, tmp_path, monkeypatch, capsys, flags, message):
    runs = tmp_path / "runs"
    monkeypatch.setattr(sys, "argv", ["train_face_adapter.py", "--data", str(rehearsal_data_session), "--runs", str(runs), "--source", "facenet", *flags])
    with pytest.raises(SystemExit) as done:
        run_cli(train_face_adapter.main)
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and "\n" not in err and err.startswith("error: ") and message in err
    assert not runs.exists()


def _early_run(common: list[str], name: str) -> list[str]:
    return [*common, "--source", "facenet", "--adapter", "finetune", "--finetune-part", "early", "--finetune-blocks", "3",
            "--rendered-pairs", "2", "--rendered-exclude", "pencil", "--epochs", "1", "--max-steps", "2", "--batch-size", "8",
            "--m-per-class", "2", "--finetune-lr", "1e-2", "--eval-every", "0", "--run-name", name]


@pytest.mark.slow
def test_early_finetune_with_step_renders_trains_only_the_first_blocks_and_repeats_exactly(rehearsal_data, tmp_path, caplog):
    from utils.faces.embedder import FaceNetEmbedder
    from utils.runs.similarity_io import load_run
    from utils.seed import seed_everything

    runs = tmp_path / "runs"
    common = ["--data", str(rehearsal_data), "--runs", str(runs)]
    face = ["--detector", "none", "--tta", "--workers", "0", "--embed-batch-size", "16"]
    assert infer_facenet.main([*common, "--embedder", "facenet", "--weights", "none", *face]) == 0
    caplog.set_level("INFO", logger="train_face_adapter")
    assert train_face_adapter.main(_early_run(common, "early_a")) == 0
    meta = json.loads((runs / "early_a" / "meta.json").read_text())
    ft, adapt = meta["adaptation"]["finetune"], meta["adaptation"]
    assert ft["part"] == "early" and ft["blocks"] == ["conv2d_1a", "conv2d_2a", "conv2d_2b"] and ft["norm_stats_updated"] == []
    rendered = ft["rendered"]
    assert rendered["styles"] == len(TRAIN_STYLES) - 1 and "pencil" not in rendered["style_names"] and "pencil" not in rendered["styles_used_this_run"]
    # the renders were in the batches: two steps of 8 training images, plus 2 renders of each real photo among them
    assert ft["steps_this_run"] == 2 and rendered["renders_this_run"] > 0 and rendered["renders_this_run"] % 2 == 0
    assert ft["images_this_run"] == 2 * 8 + rendered["renders_this_run"]
    assert any(f"{rendered['renders_this_run']} renders entered 2 training steps" in r.getMessage() for r in caplog.records)
    # validation decided: the fine-tune replaces the source only when it ranks strictly higher (it has no tie-break)
    cand = "finetune first 3 blocks"
    assert set(adapt["val"]) == {"source", cand} and adapt["tie_break"] is None
    better = train_face_adapter.rank_key(adapt["val"][cand]) > train_face_adapter.rank_key(adapt["val"]["source"])
    assert adapt["chosen"] == (cand if better else "source")
    assert load_run(runs / "early_a").meta["metrics"]["val"]["score"] == pytest.approx(adapt["val"][adapt["chosen"]]["score"])

    seed_everything(0)  # the source's random init, as infer_facenet made it
    init = FaceNetEmbedder("none", torch.device("cpu")).model.state_dict()
    tuned = torch.load(runs / "early_a" / "last.pt", weights_only=False)["facenet"]
    changed = {k for k in init if not torch.equal(tuned[k], init[k])}
    assert {"conv2d_1a.conv.weight", "conv2d_2a.conv.weight", "conv2d_2b.conv.weight"} <= changed
    assert all(k.split(".")[0] in ft["blocks"] and ("running" not in k and "num_batches" not in k) for k in changed), sorted(changed)
    # the same command (another run folder) gives the same weights and the same matrices
    assert train_face_adapter.main(_early_run(common, "early_b")) == 0
    again = torch.load(runs / "early_b" / "last.pt", weights_only=False)["facenet"]
    assert all(torch.equal(again[k], tuned[k]) for k in tuned)
    npys = sorted((runs / "early_a").glob("*.npy"))
    assert npys
    for npy in npys:
        assert np.array_equal(np.load(npy), np.load(runs / "early_b" / npy.name)), npy.name
    assert json.loads((runs / "early_b" / "meta.json").read_text())["adaptation"]["finetune"] == ft
