"""The shared training loop, the schedule, the loss factories and the augmentation pipeline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.helpers.toy_training import Toy, toy_loader, toy_trainer
from utils.data.augment import eval_transform, train_transform
from utils.errors import KitError
from utils.training.loop import LoopSettings, Trainer
from utils.training.margin_loss import build_margin_loss
from utils.training.pair_loss import PAIR_LOSSES, build_pair_loss
from utils.training.schedule import warmup_cosine

# ----------------------------------------------------------------------------- schedule


def test_warmup_rises_linearly_then_cosine_decays_to_zero():
    total, warm = 100, 10
    f = [warmup_cosine(s, total, warm) for s in range(total)]
    assert f[:warm] == pytest.approx([(s + 1) / warm for s in range(warm)])
    assert f[warm] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[warm:], f[warm + 1 :]))  # never rises after warm-up
    mid = warm + (total - warm) // 2
    assert f[mid] == pytest.approx(0.5, abs=1e-9)
    assert f[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * (total - 1 - warm) / (total - warm))))
    assert f[-1] < 0.001


# ----------------------------------------------------------------------------- margin and pair losses


def _arcface_reference(emb: torch.Tensor, labels: torch.Tensor, W: torch.Tensor, margin_rad: float, scale: float) -> torch.Tensor:
    """ArcFace written out: s * cos(theta_y + m) for the target, s * cos(theta_j) for the others, then cross-entropy."""
    cos = F.normalize(emb, dim=1) @ F.normalize(W, dim=0)
    theta = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
    target = torch.cos(theta + margin_rad)
    logits = cos.clone()
    rows = torch.arange(len(labels))
    logits[rows, labels] = torch.where(theta[rows, labels] <= math.pi - margin_rad, target[rows, labels],
                                       cos[rows, labels] - margin_rad * math.sin(margin_rad))
    return F.cross_entropy(scale * logits, labels)


@pytest.mark.parametrize("margin_deg", [28.6, 10.0])
def test_arcface_factory_takes_degrees_and_matches_the_formula(margin_deg):
    torch.manual_seed(0)
    loss = build_margin_loss("arcface", num_classes=5, embedding_size=8, margin_deg=margin_deg, scale=16.0)
    assert loss.margin == pytest.approx(math.radians(margin_deg))  # pml converts degrees to radians
    emb, labels = torch.randn(12, 8), torch.randint(0, 5, (12,))
    ref = _arcface_reference(emb, labels, loss.W.detach(), math.radians(margin_deg), 16.0)
    assert loss(emb, labels).item() == pytest.approx(ref.item(), rel=1e-4)


def test_margin_loss_factory_refuses_radians_and_unknown_kinds():
    with pytest.raises(KitError, match="degrees"):
        build_margin_loss("arcface", 5, 8, margin_deg=0.5 * 180)  # 90 deg: someone meant something else
    with pytest.raises(KitError, match="--loss 'cosface'"):
        build_margin_loss("cosface", 5, 8)
    sub = build_margin_loss("subcenter", 5, 8, sub_centers=3)
    assert sub.W.shape == (8, 15)


@pytest.mark.parametrize("kind", PAIR_LOSSES)
def test_pair_losses_are_lower_for_clustered_embeddings(kind):
    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(4)
    centres = F.normalize(torch.randn(4, 16), dim=1)
    clustered = centres[labels] + 0.05 * torch.randn(16, 16)
    shuffled = clustered[torch.randperm(16)]
    loss = build_pair_loss(kind)
    assert loss(clustered, labels).item() < loss(shuffled, labels).item()
    with pytest.raises(KitError, match="--loss 'npair'"):
        build_pair_loss("npair")


# ----------------------------------------------------------------------------- augmentation


def _photo(seed: int = 0, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_train_transform_is_reproducible_per_seed_and_varies_across_seeds():
    tf = train_transform(32)
    img = _photo()
    tf.set_random_seed(7)
    a = tf(img)
    tf.set_random_seed(7)
    b = tf(img)
    tf.set_random_seed(8)
    c = tf(img)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_aug_strength_zero_keeps_colours_and_eval_is_resize_plus_normalise():
    img = _photo(1)
    ev = eval_transform(48)(img)
    expected = (torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1) - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.allclose(ev, expected, atol=1e-4)  # same size in, so only normalisation
    weak, strong = train_transform(48, strength=0.0), train_transform(48, strength=1.0)
    means_weak, means_strong = [], []
    for s in range(40):
        weak.set_random_seed(s)
        strong.set_random_seed(s)
        means_weak.append(weak(img).mean(dim=(1, 2)))
        means_strong.append(strong(img).mean(dim=(1, 2)))
    spread = lambda m: torch.stack(m).std(dim=0).mean().item()  # noqa: E731
    assert spread(means_strong) > 2 * spread(means_weak)  # colour jitter/greyscale only with strength


# ----------------------------------------------------------------------------- the loop


def test_loop_trains_and_saves_the_full_state(tmp_path):
    trainer, model = toy_trainer(tmp_path, scores=[100.0, 300.0, 200.0])
    state = trainer.fit(toy_loader())
    assert [h["epoch"] for h in state.history] == [1, 2, 3]
    assert state.history[-1]["loss"] < state.history[0]["loss"]
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scaler", "epoch", "step", "best_score", "bad_evals", "history", "config", "classes", "kit_version"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 12 and ckpt["best_score"] == 300.0 and ckpt["bad_evals"] == 1
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == 1  # the epoch with 300
    assert trainer.final_checkpoint() == tmp_path / "best.pt"


def test_a_stale_best_pt_from_an_earlier_run_is_never_used(tmp_path):
    torch.save({"model": {"net.weight": torch.zeros(3, 4), "net.bias": torch.zeros(3)}}, tmp_path / "best.pt")
    trainer, _ = toy_trainer(tmp_path, scores=None)  # no validation in this run
    trainer.fit(toy_loader())
    assert not (tmp_path / "best.pt").exists()
    assert trainer.final_checkpoint() == tmp_path / "last.pt"


def test_full_train_embeds_with_last_and_never_stops_early(tmp_path):
    trainer, _ = toy_trainer(tmp_path, scores=[300.0, 200.0, 100.0], full_train=True, patience=1)
    state = trainer.fit(toy_loader())
    assert len(state.history) == 3
    assert trainer.final_checkpoint() == tmp_path / "last.pt"


def test_early_stopping_after_patience_evaluations_without_improvement(tmp_path):
    trainer, _ = toy_trainer(tmp_path, scores=[300.0, 200.0, 100.0, 50.0], epochs=4, patience=2)
    state = trainer.fit(toy_loader())
    assert [h["val_score"] for h in state.history] == [300.0, 200.0, 100.0]


def test_no_training_means_no_checkpoint_to_embed_with(tmp_path):
    trainer, _ = toy_trainer(tmp_path, epochs=0)
    trainer.fit(toy_loader())
    assert trainer.final_checkpoint() is None


def test_resume_equals_a_straight_run_and_checks_the_config(tmp_path):
    straight, m1 = toy_trainer(tmp_path / "s", scores=[1.0, 2.0, 3.0])
    straight.fit(toy_loader())

    def killed(epoch: int) -> None:  # the process dies as epoch 2 starts, after epoch 1's checkpoints
        if epoch == 1:
            raise RuntimeError("killed")

    first, _ = toy_trainer(tmp_path / "r", scores=[1.0, 2.0, 3.0])
    with pytest.raises(RuntimeError, match="killed"):
        first.fit(toy_loader(), on_epoch=killed)
    again, m2 = toy_trainer(tmp_path / "r", scores=[2.0, 3.0], resume=True)
    state = again.fit(toy_loader())
    assert [h["epoch"] for h in state.history] == [1, 2, 3]  # the history survives the resume
    assert state.history == straight.state.history
    assert torch.equal(m2.net.weight, m1.net.weight) and torch.equal(m2.net.bias, m1.net.bias)
    model = Toy()
    with pytest.raises(KitError, match="made with other --model"):
        Trainer(LoopSettings(resume=True), run_dir=tmp_path / "r", modules={"model": model}, step_module=model,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.1), device=torch.device("cpu"), amp=None,
                config={"model": "other"}, classes=["a", "b", "c"], resume_keys=("model",))


def test_resume_before_any_epoch_was_saved_starts_from_the_beginning(tmp_path, caplog):
    """Ctrl-C before the first last.pt: the printed --resume command still runs, and trains like a straight run."""
    straight, m1 = toy_trainer(tmp_path / "s", scores=[1.0, 2.0, 3.0])
    straight.fit(toy_loader())
    (tmp_path / "r").mkdir()
    torch.save({"model": {}}, tmp_path / "r" / "best.pt")  # an earlier run's best never stands for this one
    with caplog.at_level("WARNING"):
        again, m2 = toy_trainer(tmp_path / "r", scores=[1.0, 2.0, 3.0], resume=True)
    assert "no last.pt to resume from" in caplog.text
    assert not (tmp_path / "r" / "best.pt").exists()
    state = again.fit(toy_loader())
    assert state.history == straight.state.history
    assert torch.equal(m2.net.weight, m1.net.weight)


def test_a_nan_loss_stops_with_one_line(tmp_path):
    trainer, model = toy_trainer(tmp_path)
    with torch.no_grad():
        model.net.weight.fill_(float("nan"))
    with pytest.raises(KitError, match="loss is nan at step 0"):
        trainer.fit(toy_loader())


def test_negative_loop_settings_name_the_flag():
    with pytest.raises(KitError, match="--max-steps -1"):
        LoopSettings(max_steps=-1).check()


def test_a_finished_run_with_the_same_settings_is_reused_not_retrained(tmp_path):
    first, m1 = toy_trainer(tmp_path, scores=[1.0, 3.0, 2.0], data_key="files-A")
    first.fit(toy_loader())
    assert torch.load(tmp_path / "last.pt", weights_only=True)["finished"] is True
    again, m2 = toy_trainer(tmp_path, scores=[1.0, 3.0, 2.0], data_key="files-A")
    state = again.fit(toy_loader())
    assert m2.steps == 0, "a finished run with the same settings should have been reused"
    assert state.history == first.state.history and again.final_checkpoint() == tmp_path / "best.pt"
    # other training files, --retrain, or other settings: train again
    for kwargs in ({"data_key": "files-B"}, {"data_key": "files-A", "retrain": True},
                   {"data_key": "files-A", "config": {"model": "toy", "lr": 0.1}}):
        other, model = toy_trainer(tmp_path, scores=[1.0, 1.0, 1.0], **kwargs)
        other.fit(toy_loader())
        assert model.steps, kwargs


def test_a_killed_run_is_never_reused(tmp_path):
    def killed(epoch: int) -> None:
        if epoch == 1:
            raise RuntimeError("killed")

    first, _ = toy_trainer(tmp_path, scores=[1.0, 2.0, 3.0], data_key="files-A")
    with pytest.raises(RuntimeError):
        first.fit(toy_loader(), on_epoch=killed)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["finished"] is False
    again, _ = toy_trainer(tmp_path, scores=[1.0, 2.0, 3.0], data_key="files-A")
    assert len(again.fit(toy_loader()).history) == 3


def test_a_temp_file_left_by_a_killed_checkpoint_write_is_removed(tmp_path):
    import os

    tmp_path.mkdir(exist_ok=True)
    stale = tmp_path / ".last.pt.abc123.tmp"
    stale.write_bytes(b"x" * 1000)
    os.utime(stale, (1, 1))  # long ago
    fresh = tmp_path / ".best.pt.def456.tmp"
    fresh.write_bytes(b"y")  # a writer still at work
    trainer, _ = toy_trainer(tmp_path, epochs=0)
    assert not stale.exists() and fresh.exists()
