"""train_clip_arcface.py on tiny open_clip configs and the generated rehearsal dataset (CPU, ~1 min)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import train_clip_arcface as script
from tests.helpers.tiny_models import TINY_RN, TINY_VIT
from utils.clip.models import create_visual, unfreeze_last
from utils.errors import KitError
from utils.training.class_sampler import MPerClassShardSampler
from utils.training.projection_head import ProjectionHead

ROOT = Path(__file__).resolve().parent.parent
# what the tiny model learns with in a few seconds (the seed's s=64, m=28.6 deg needs far more steps)
TRAIN = ["--weights", "none", "--workers", "0", "--tta", "--embed-dim", "64", "--batch-size", "16",
         "--unfreeze", "-1", "--lr", "1e-3", "--scale", "16", "--margin-deg", "15", "--patience", "0"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread, no thrash


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("clip_configs")
    paths = {}
    for name, cfg in (("tiny-vit", TINY_VIT), ("tiny-rn", TINY_RN)):
        (out / f"{name}.json").write_text(json.dumps(cfg))
        paths[name] = str(out / f"{name}.json")
    return paths


def meta(run_dir: Path) -> dict:
    return json.loads((run_dir / "meta.json").read_text())


@pytest.mark.slow
def test_fine_tune_lowers_loss_and_beats_zero_shot(rehearsal_data, tmp_path, configs):
    runs = tmp_path / "runs"
    common = ["--data", str(rehearsal_data), "--runs", str(runs), "--model", configs["tiny-vit"], *TRAIN]
    assert script.main([*common, "--zero-shot"]) == 0
    assert script.main([*common, "--epochs", "40", "--eval-every", "10"]) == 0
    zs, ft = meta(runs / "clip_zeroshot"), meta(runs / "clip_arcface")
    losses = [h["loss"] for h in ft["history"]]
    assert len(losses) == 40 and np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert ft["metrics"]["val"]["score"] > zs["metrics"]["val"]["score"] + 100
    assert ft["metrics"]["val"]["map_all"] > zs["metrics"]["val"]["map_all"]
    for run in ("clip_zeroshot", "clip_arcface"):
        val = np.load(runs / run / "val_sim.npy")
        assert val.dtype == np.float32 and val.shape == (12, 12) and np.isfinite(val).all()
    assert (runs / "clip_arcface" / "best.pt").is_file() and not (runs / "clip_zeroshot" / "last.pt").exists()
    # the fine-tuned embedding uses the whole sphere: some pairs point away from each other
    assert np.load(runs / "clip_arcface" / "test_sim.npy").min() < 0


def test_projection_head_can_give_negative_cosines():
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    seed_head = nn.Sequential(nn.Linear(32, 64), nn.ReLU())  # the seed's defect, for contrast
    heads = {"seed": seed_head, "mlp": ProjectionHead(32, 64, "mlp"), "linear": ProjectionHead(32, 64, "linear")}
    cos = {}
    for name, head in heads.items():
        e = nn.functional.normalize(head.eval()(x), dim=1)
        cos[name] = (e @ e.T).min().item()
    assert cos["seed"] >= 0
    assert cos["mlp"] < -0.2 and cos["linear"] < -0.2
    with pytest.raises(KitError, match="--head 'relu'"):
        ProjectionHead(32, 64, "relu")


def trainable(module: nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def test_unfreeze_leaves_exactly_the_last_blocks_trainable(configs):
    vit = create_visual(configs["tiny-vit"], "none").visual
    everything = {n for n, _ in vit.named_parameters()}
    block = {1: {n for n in everything if n.startswith("transformer.resblocks.1.")},
             0: {n for n in everything if n.startswith("transformer.resblocks.0.")}}
    tail = {"proj", "ln_post.weight", "ln_post.bias"}
    unfreeze_last(vit, 0)
    assert trainable(vit) == set()
    groups = unfreeze_last(vit, 1)
    assert trainable(vit) == tail | block[1] and len(groups) == 2
    unfreeze_last(vit, 2)
    assert trainable(vit) == tail | block[1] | block[0]
    unfreeze_last(vit, -1)
    assert trainable(vit) == everything
    with pytest.raises(KitError, match="--unfreeze 3: this tower has 2 blocks"):
        unfreeze_last(vit, 3)

    rn = create_visual(configs["tiny-rn"], "none").visual  # ResNet tower: blocks are its bottlenecks
    unfreeze_last(rn, 1)
    assert trainable(rn) == {n for n, _ in rn.named_parameters() if n.startswith(("layer4.0.", "attnpool."))}

    # layer-wise learning rates: loss >= head > unfrozen blocks, no weight decay on the class weights
    cfg = script.Config(lr=1e-5, head_lr=1e-3, loss_lr=1e-3, layer_decay=0.5)
    groups = script.param_groups(cfg, unfreeze_last(vit, 2), ProjectionHead(32, 64), nn.Linear(64, 5))
    lr = {g["name"]: g["lr"] for g in groups}
    assert lr["head"] > lr["backbone.0"] == lr["backbone.1"] > lr["backbone.2"] == 0.5e-5
    assert all(g["weight_decay"] == 0 for g in groups if g["name"] == "loss")


def test_resume_continues_from_last_checkpoint(rehearsal_data, tmp_path, configs, monkeypatch):
    runs = tmp_path / "runs"
    common = ["--data", str(rehearsal_data), "--runs", str(runs), "--model", configs["tiny-vit"], *TRAIN, "--epochs", "3"]
    assert script.main([*common, "--run-name", "straight"]) == 0

    class Crash(Exception):
        pass

    import utils.training.loop as loop  # the shared loop writes the checkpoints

    real_save, saved = loop.save_checkpoint, []

    def save_then_crash(path, **state):
        real_save(path, **state)
        saved.append(Path(path).name)
        if saved.count("last.pt") == 2:
            raise Crash  # the machine dies after epoch 2 was saved

    monkeypatch.setattr(loop, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        script.main([*common, "--run-name", "crashed"])
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    assert not (runs / "crashed" / "meta.json").exists()
    assert script.main([*common, "--run-name", "crashed", "--resume"]) == 0

    straight, resumed = meta(runs / "straight"), meta(runs / "crashed")
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["history"] == pytest.approx(straight["history"])
    np.testing.assert_allclose(np.load(runs / "crashed" / "val_sim.npy"), np.load(runs / "straight" / "val_sim.npy"), atol=1e-5)
    with pytest.raises(KitError, match="made with other --embed-dim"):
        script.main([*common, "--run-name", "crashed", "--resume", "--embed-dim", "32"])


def test_weights_file_errors_are_one_clear_line(rehearsal_data, tmp_path, configs):
    common = ["--data", str(rehearsal_data), "--runs", str(tmp_path / "runs"), "--model", configs["tiny-vit"], "--file-tag", "none", "--zero-shot", "--workers", "0"]
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(KitError) as err:
        script.main([*common, "--weights", str(missing)])
    assert str(missing) in str(err.value) and "\n" not in str(err.value)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(KitError, match="not a readable torch checkpoint") as err:
        script.main([*common, "--weights", str(garbage)])
    assert "\n" not in str(err.value)

    other = tmp_path / "resnet.pt"  # tensors of another tower
    torch.save(create_visual(configs["tiny-rn"], "none").visual.state_dict(), other)
    with pytest.raises(KitError, match="weights do not fit this image tower") as err:
        create_visual(configs["tiny-vit"], weights=str(other), file_tag="none")
    assert "\n" not in str(err.value)

    good = tmp_path / "vit.pt"  # a full CLIP state dict loads, and gives the same tensors back
    torch.manual_seed(1)
    state = create_visual(configs["tiny-vit"], "none").visual.state_dict()
    torch.save({f"visual.{k}": v for k, v in state.items()}, good)
    loaded = create_visual(configs["tiny-vit"], weights=str(good), file_tag="none").visual.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())

    with pytest.raises(KitError, match="--weights 'no-such-tag'"):
        create_visual("ViT-B-32", "no-such-tag")


def test_m_per_class_sampler_shards_whole_identity_groups():
    labels = [i // 5 for i in range(60)]  # 12 identities x 5 images
    one = list(MPerClassShardSampler(labels, m=2, batch_size=8, world_size=1, seed=3))
    ranks = [MPerClassShardSampler(labels, m=2, batch_size=4, world_size=2, rank=r, seed=3) for r in (0, 1)]
    shards = [list(s) for s in ranks]
    # the two ranks split every global batch of 8 into halves; identity pairs are never cut
    assert [i for b in range(len(one) // 8) for r in (0, 1) for i in shards[r][4 * b: 4 * b + 4]] == one
    for shard in shards:
        for b in range(0, len(shard), 4):
            assert sorted(Counter(labels[i] for i in shard[b: b + 4]).values()) == [2, 2]
    ranks[0].set_epoch(1)
    assert list(ranks[0]) != shards[0]
    ranks[0].set_epoch(0)
    assert list(ranks[0]) == shards[0]  # reproducible per epoch
    with pytest.raises(KitError, match="multiple of --m-per-class 3"):
        MPerClassShardSampler(labels, m=3, batch_size=8)
    # one identity (2 in DATA/train, one held out) was told to 'lower --batch-size', which trains on one identity
    with pytest.raises(KitError, match=r"^1 training identity: batches of --m-per-class images per identity need at least 2"):
        MPerClassShardSampler([0] * 8, m=4, batch_size=16)
    with pytest.raises(KitError, match="1 training identity"):
        MPerClassShardSampler([0] * 8, m=4, batch_size=4)


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(rehearsal_data, tmp_path, configs):
    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train_clip_arcface.py"),
           "--data", str(rehearsal_data), "--runs", str(runs), "--model", configs["tiny-vit"], *TRAIN,
           "--epochs", "2", "--batch-size", "8", "--device", "cpu"]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    m = meta(runs / "clip_arcface")
    assert m["world_size"] == 2 and len(m["history"]) == 2
    assert np.isfinite(np.load(runs / "clip_arcface" / "test_sim.npy")).all()
