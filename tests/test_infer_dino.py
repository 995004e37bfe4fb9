"""infer_dino.py end to end with a tiny random ViT (timm's DINOv2 ViT with small dims) into
ensemble.py and submit.py --dry-run; its pooling choices and its one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch

import ensemble
import infer_dino as script
import submit
from utils.errors import KitError
from utils.runs.similarity_io import load_run

TINY_ARGS = '{"depth": 1, "embed_dim": 32, "num_heads": 2}'
TINY = ["--weights", "none", "--model-args", TINY_ARGS, "--img-size", "28", "--workers", "0", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread, no thrash


def test_script_end_to_end_then_ensemble_and_submit_dry_run(rehearsal_data_session, tmp_path):
    data, runs = str(rehearsal_data_session), tmp_path / "runs"
    common = ["--data", data, "--runs", str(runs), *TINY]
    assert script.main([*common, "--pooling", "cls"]) == 0
    assert script.main([*common, "--pooling", "gem", "--run-name", "dino_gem"]) == 0
    cls, gem = load_run(runs / "dino"), load_run(runs / "dino_gem")
    assert cls.meta["feature_dim"] == 32 and cls.meta["pooling"] == "cls" and gem.meta["pooling"] == "gem"
    assert not np.allclose(cls.splits["val"].sim, gem.splits["val"].sim)  # another pooling, another feature
    assert "test" in cls.meta["metrics"]  # the rehearsal data has a ground truth
    # the same command again, its cache emptied: the same matrix
    first = np.load(runs / "dino" / "test_sim.npy")
    for f in (runs / "dino" / "cache").glob("emb_*.npy"):
        f.unlink()
    assert script.main([*common, "--pooling", "cls"]) == 0
    assert np.array_equal(first, np.load(runs / "dino" / "test_sim.npy"))

    assert ensemble.main(["--runs", str(runs), "--bootstrap", "5", "--no-plot"]) == 0
    fused = load_run(runs / "ensemble")
    assert [m["name"] for m in fused.meta["members"]] == ["dino", "dino_gem"]
    out = tmp_path / "subs"
    assert submit.main(["--run", str(runs / "ensemble"), "--group", "dino", "--out", str(out), "--data", data, "--dry-run"]) == 0
    body = json.loads(next(out.glob("*.json")).read_text())
    assert set(body["images"]) == set(fused.splits["test"].query_names)
    assert all(len(set(v)) == 10 for v in body["images"].values())


def test_poolings_by_hand():
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=28, depth=1, embed_dim=32, num_heads=2).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        tokens = vit.forward_features(x)
        patches = tokens[:, vit.num_prefix_tokens:]
        assert torch.equal(script.TokenPool(vit, "cls")(x), tokens[:, 0])
        assert torch.allclose(script.TokenPool(vit, "patch-mean")(x), patches.mean(1))
        gem = patches.clamp(min=1e-6).pow(3).mean(1).pow(1 / 3)
        assert torch.allclose(script.TokenPool(vit, "gem")(x), gem, atol=1e-6)


def test_bad_flags_are_one_clear_error(rehearsal_data_session, tmp_path):
    common = ["--data", str(rehearsal_data_session), "--runs", str(tmp_path / "runs"), *TINY[:2], *TINY[4:]]
    with pytest.raises(KitError, match=r"--model-args '\{depth: 1\}': not JSON"):
        script.main([*common, "--model-args", "{depth: 1}"])
    with pytest.raises(KitError, match=r"--model-args '\[1\]': give a JSON object"):
        script.main([*common, "--model-args", "[1]"])
    with pytest.raises(KitError, match="--model 'vit_9000': not a timm model"):
        script.main([*common, "--model", "vit_9000"])
    with pytest.raises(KitError, match=r"--model 'vit_small_patch14_dinov2': .*no_such_arg.*\(--model-args"):
        script.main([*common, "--model-args", '{"no_such_arg": 1}'])
    with pytest.raises(KitError, match="--model: ResNet is not a ViT"):
        script.TokenPool(timm.create_model("test_resnet", pretrained=False, num_classes=0), "cls")
    no_cls = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=28, depth=1, embed_dim=32,
                               num_heads=2, class_token=False, global_pool="avg")
    with pytest.raises(KitError, match="--pooling cls: this VisionTransformer has no CLS token"):
        script.TokenPool(no_cls, "cls")
    assert script.TokenPool(no_cls, "patch-mean")(torch.randn(1, 3, 28, 28)).shape == (1, 32)
