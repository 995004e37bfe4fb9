"""utils/clip/hf_clip.py on a tiny random transformers CLIP saved to a folder (no network): the tower
embeds with the model's own projection, the preprocessing follows the saved processor, and a model that
cannot be loaded is one line naming it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from utils.clip.hf_clip import HF_PREFIX, HFClipVisual, create_hf_visual
from utils.errors import KitError

transformers = pytest.importorskip("transformers")

MEAN, STD = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A 2-layer CLIP vision tower with a 16-d projection and a processor (resize 40, crop 32x24), saved."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-clip"
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        image_size=32, patch_size=8, projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPVisionModelWithProjection(cfg).eval()
    model.save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 24},
                                    image_mean=list(MEAN), image_std=list(STD)).save_pretrained(folder)
    return folder, model


def test_the_tower_gives_the_models_projected_embedding(tiny_clip):
    folder, reference = tiny_clip
    tower = create_hf_visual(str(folder))
    assert isinstance(tower, HFClipVisual) and tower.source == str(folder) and not tower.model.training
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        emb = tower(x)
        want = reference(pixel_values=x).image_embeds
    assert emb.shape == (3, 16)
    torch.testing.assert_close(emb, want)


def test_the_transform_follows_the_saved_processor(tiny_clip):
    folder, _ = tiny_clip
    tower = create_hf_visual(str(folder))
    assert tower.mean == MEAN and tower.std == STD
    grey = Image.fromarray(np.full((60, 90, 3), 128, np.uint8))  # short edge 60 -> 40, then a 32 x 24 centre crop
    pixels = tower.transform(grey)
    assert pixels.shape == (3, 32, 24)
    want = [(128 / 255 - m) / s for m, s in zip(MEAN, STD)]
    torch.testing.assert_close(pixels.mean(dim=(1, 2)), torch.tensor(want), atol=1e-4, rtol=0)


def test_a_folder_without_a_model_is_one_line_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(KitError, match=rf"--model {HF_PREFIX}{tmp_path / 'empty'}: cannot load a CLIP model from this folder"):
        create_hf_visual(str(tmp_path / "empty"))


def test_a_hub_name_offline_says_to_pass_a_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KitError, match=r"hf:nobody/no-such-clip: cannot load .* hub name \(offline\? pass a local folder"):
        create_hf_visual("nobody/no-such-clip")
