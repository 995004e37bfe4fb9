"""infer_caption_match.py with a tiny random BLIP captioner (built here) and a tiny open_clip model,
on generated images: captions, their cache, the ablation mode, and the run into ensemble.py and submit.py."""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ensemble
import infer_caption_match as script
import submit
from tests.helpers.serving import competition_server
from utils.clip.captions import Captioner, CaptionParams, caption_images, read_cache
from utils.clip.text import create_clip, encode_texts
from utils.embedding.views import View
from utils.errors import KitError
from utils.runs.similarity_io import load_run

WORDS = "a photo of the dog cat red blue green square circle star on white black background painting sketch".split()
# CLIP's tokenizer has 49408 ids; the text tower must have as many (tiny otherwise)
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    """A random BLIP captioner of ~50k parameters with a 25-word BERT vocabulary, saved like a hub folder."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    out = tmp_path_factory.mktemp("tiny_blip")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True, bos_token="[DEC]")
    config = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=32,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                         sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id),
        projection_dim=32,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(out)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("clip") / "tiny-clip-text.json"
    path.write_text(json.dumps(TINY_CLIP))
    return str(path)


class CountingCaptioner:
    """The real captioner, counting how often it is built and how many images it captions."""

    built = 0
    images = 0

    def __init__(self, params, device):
        type(self).built += 1
        self.inner = Captioner(params, device)

    def caption(self, images):
        type(self).images += len(images)
        return self.inner.caption(images)


def make_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (40 + 4 * i, 36, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_captions_are_cached_and_reused(tiny_blip, tmp_path):
    paths = make_images(tmp_path / "imgs", 5)
    cache = tmp_path / "captions.json"
    params = CaptionParams(str(tiny_blip), max_new_tokens=6, num_beams=2, batch_size=2)
    CountingCaptioner.built = CountingCaptioner.images = 0

    first = caption_images(paths, params, torch.device("cpu"), cache, captioner_factory=CountingCaptioner)
    assert CountingCaptioner.built == 1 and CountingCaptioner.images == 5
    assert len(first) == 5 and all(isinstance(c, str) and c for c in first)
    assert set(" ".join(first).split()) <= set(WORDS)  # decoded from the tiny vocabulary, special tokens dropped
    saved = read_cache(cache)
    assert list(saved) == [params.tag()] and len(saved[params.tag()]) == 5

    # same files, same settings: the model is not even built
    again = caption_images(paths, params, torch.device("cpu"), cache, captioner_factory=CountingCaptioner)
    assert again == first and CountingCaptioner.built == 1 and CountingCaptioner.images == 5

    # a changed file is captioned again, alone
    Image.new("RGB", (30, 30), (200, 10, 10)).save(paths[2])
    os.utime(paths[2], ns=(1, 1))
    caption_images(paths, params, torch.device("cpu"), cache, captioner_factory=CountingCaptioner)
    assert CountingCaptioner.built == 2 and CountingCaptioner.images == 6

    # another captioner setting is another cache entry; the first one stays
    other = CaptionParams(str(tiny_blip), max_new_tokens=3, num_beams=1, batch_size=4)
    short = caption_images(paths, other, torch.device("cpu"), cache, captioner_factory=CountingCaptioner)
    assert CountingCaptioner.images == 11 and all(len(c.split()) <= 3 for c in short)
    assert set(read_cache(cache)) == {params.tag(), other.tag()}

    # a second cache file fed with --captions: a fresh run's cache needs no model either
    fresh = tmp_path / "run2" / "captions.json"
    reused = caption_images(paths, other, torch.device("cpu"), fresh, extra_caches=[cache], captioner_factory=CountingCaptioner)
    assert reused == short and (CountingCaptioner.built, CountingCaptioner.images) == (3, 11)
    assert read_cache(fresh)[other.tag()] == read_cache(cache)[other.tag()]


def test_blip2_captioner_in_batches(tmp_path):
    """BLIP-2 (Q-Former + OPT language model), tiny and random, saved and loaded like a hub folder."""
    from transformers import (
        BertTokenizer,
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        OPTConfig,
    )

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "<image>", *WORDS]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, bos_token="[DEC]", eos_token="[SEP]")
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            encoder_hidden_size=32, vocab_size=len(vocab)),
        text_config=OPTConfig(vocab_size=len(vocab), hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                              word_embed_proj_dim=32, max_position_embeddings=64, bos_token_id=5, eos_token_id=3,
                              pad_token_id=0).to_dict(),
        num_query_tokens=4, image_token_index=vocab.index("<image>"),
    )
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).save_pretrained(tmp_path / "blip2")
    Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok,
                   num_query_tokens=4).save_pretrained(tmp_path / "blip2")
    paths = make_images(tmp_path / "imgs", 3)
    params = CaptionParams(str(tmp_path / "blip2"), max_new_tokens=4, num_beams=2, prompt="a photo of", batch_size=2)
    captions = caption_images(paths, params, torch.device("cpu"), tmp_path / "captions.json")
    assert len(captions) == 3 and all(c.startswith("a photo of") for c in captions)
    assert all(len(c.split()) <= 3 + 4 for c in captions)  # the prompt and at most 4 new tokens


def test_captioner_errors_are_one_line(tmp_path, tiny_blip):
    with pytest.raises(KitError, match="offline, pass a local folder"):
        Captioner(CaptionParams(str(tmp_path / "no-such-model")), torch.device("cpu"))
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path / "bert")
    with pytest.raises(KitError, match="not supported; use a BLIP or BLIP-2"):
        Captioner(CaptionParams(str(tmp_path / "bert")), torch.device("cpu"))
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(KitError, match="not a caption cache"):
        caption_images([], CaptionParams(str(tiny_blip)), torch.device("cpu"), tmp_path / "bad.json")


def test_text_encoding_matches_open_clip(tiny_clip, tmp_path):
    torch.manual_seed(0)
    clip = create_clip(tiny_clip, "none")
    texts = ["a red square", "a blue circle", "a red square"]
    emb = encode_texts(clip, texts, torch.device("cpu"))
    assert emb.shape == (3, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert np.array_equal(emb[0], emb[2]) and not np.allclose(emb[0], emb[1])
    with torch.no_grad():
        ref = torch.nn.functional.normalize(clip.model.encode_text(clip.tokenizer(texts[:2])), dim=1).numpy()
    assert np.allclose(emb[:2], ref, atol=1e-5)
    with pytest.raises(KitError, match="file not found"):
        create_clip(tiny_clip, "/no/such/weights.bin")
    with pytest.raises(KitError, match="no such open_clip tag"):
        create_clip(tiny_clip, "laion-typo")
    # --weights PATH: the whole model from a file gives the same texts' embeddings; an image tower alone is refused
    torch.save(clip.model.state_dict(), tmp_path / "clip.pt")
    again = create_clip(tiny_clip, str(tmp_path / "clip.pt"), file_tag="none")  # a config of our own: no tag
    assert np.allclose(encode_texts(again, texts, torch.device("cpu")), emb, atol=1e-6)
    torch.save({k: v for k, v in clip.model.state_dict().items() if k.startswith("visual.")}, tmp_path / "visual.pt")
    with pytest.raises(KitError, match="needs both towers"):
        create_clip(tiny_clip, str(tmp_path / "visual.pt"), file_tag="none")


def test_blend_zscores_rows():
    img2txt = np.array([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]], np.float32)
    img2img = np.array([[0.9, 0.1, 0.0], [0.0, 0.1, 0.9]], np.float32)
    assert np.array_equal(script.blend_similarity(img2txt, img2img, 0.0), img2txt)
    both = script.blend_similarity(img2txt, img2img, 0.5)
    assert np.allclose(both.mean(axis=1), 0, atol=1e-6)
    z = lambda m: (m - m.mean(axis=1, keepdims=True)) / m.std(axis=1, keepdims=True)  # noqa: E731
    assert np.allclose(both, 0.5 * z(img2txt) + 0.5 * z(img2img), atol=1e-5)
    assert np.array_equal(script.blend_similarity(img2txt, img2img, 1.0).argmax(axis=1), [0, 2])


def test_end_to_end_into_ensemble_and_submit(rehearsal_data, tiny_blip, tiny_clip, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    common = ["--data", str(rehearsal_data), "--runs", str(runs), "--model", tiny_clip, "--weights", "none",
              "--captioner", str(tiny_blip), "--max-new-tokens", "6", "--num-beams", "1", "--workers", "0",
              "--caption-batch-size", "8", "--embed-batch-size", "32"]
    assert script.main([*common]) == 0
    run = load_run(runs / "caption_match")
    assert run.splits["val"].sim.dtype == np.float32 and np.isfinite(run.splits["test"].sim).all()
    assert run.splits["test"].sim.shape == (16, 16) and set(run.meta["metrics"]) == {"val", "test"}
    captions = json.loads((runs / "caption_match" / "gallery_captions.json").read_text())
    assert sorted(captions["test"]) == sorted(run.splits["test"].gallery_names)
    assert (runs / "caption_match" / "captions.json").is_file()
    first = np.load(runs / "caption_match" / "test_sim.npy")

    # a re-run that fails leaves no complete-looking run behind
    with pytest.raises(KitError):
        script.main([*common, "--captions", str(tmp_path / "missing.json")])
    assert load_run(runs / "caption_match").meta  # a bad flag stops before anything is touched
    with pytest.raises(KitError):
        script.main([*common, "--weights", str(tmp_path / "missing.pt")])
    with pytest.raises(KitError):
        load_run(runs / "caption_match")
    assert script.main([*common]) == 0

    # second run, another name, reuses the captions: the captioner must not be built
    def no_captioner(*_a, **_k):
        raise AssertionError("captioner built although every caption was cached")

    monkeypatch.setattr("utils.clip.captions.Captioner.__init__", no_captioner)
    blend = [*common, "--run-name", "caption_blend", "--blend", "0.5", "--captions", str(runs / "caption_match" / "captions.json")]
    assert script.main(blend) == 0
    mixed = np.load(runs / "caption_blend" / "test_sim.npy")
    assert not np.allclose(mixed, first) and np.allclose(mixed.mean(axis=1), 0, atol=1e-5)
    shutil.rmtree(runs / "caption_match" / "cache")  # embeddings recomputed, captions from captions.json
    assert script.main([*common]) == 0  # the same command again: the same matrix, nothing captioned
    assert np.array_equal(np.load(runs / "caption_match" / "test_sim.npy"), first)

    assert ensemble.main(["--runs", str(runs), "--data", str(rehearsal_data), "--bootstrap", "10"]) == 0
    with competition_server(rehearsal_data) as url:
        assert submit.main(["--run", str(runs / "ensemble"), "--url", url, "--group", "captions",
                            "--out", str(tmp_path / "subs"), "--data", str(rehearsal_data)]) == 0
    reply = json.loads(next((tmp_path / "subs").glob("*.response.json")).read_text())
    assert np.isclose(reply["accuracy"], load_run(runs / "ensemble").meta["metrics"]["test"]["score"])


def words_dataset(src: Path, dst: Path) -> Path:
    """The rehearsal data with its training identities renamed to words (id000 -> alpha...)."""
    shutil.copytree(src, dst)
    names = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo",
             "lima", "mike", "november", "oscar", "papa", "quebec", "romeo"]
    mapping = {d.name: names[i] for i, d in enumerate(sorted((dst / "train").iterdir()))}
    for old, new in mapping.items():
        (dst / "train" / old).rename(dst / "train" / new)
    rows = list(csv.reader(open(dst / "domains.csv")))
    for row in rows[1:]:
        parts = row[0].split("/")
        if parts[0] == "train":
            row[0] = "/".join(["train", mapping[parts[1]], *parts[2:]])
    with open(dst / "domains.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return dst


def test_label_captions_modes(rehearsal_data, tiny_clip, tmp_path):
    """true-labels (the paper's ablation: true classes, test ones from --test-labels) and clip-labels --closed-set
    (CLIP's nearest class name) are two runs with two names; the old spelling is refused with a hint."""
    common = ["--model", tiny_clip, "--weights", "none", "--workers", "0", "--label-template", "a photo of a {}"]
    with pytest.raises(KitError, match="not words"):  # rehearsal identities are id000, id001, ...
        script.main(["--data", str(rehearsal_data), "--runs", str(tmp_path / "r1"), *common, "--captions-from", "clip-labels", "--closed-set"])
    data = words_dataset(rehearsal_data, tmp_path / "words")
    runs = ["--data", str(data), "--runs", str(tmp_path / "r2")]
    for old in (["--captions-from", "labels"], ["--captions-from=labels"]):
        with pytest.raises(KitError, match="renamed; use true-labels .* or clip-labels --closed-set"):
            script.main([*runs, *common, *old, "--closed-set"])
    with pytest.raises(KitError, match="pass --closed-set"):
        script.main([*runs, *common, "--captions-from", "clip-labels"])
    with pytest.raises(KitError, match="pass --test-labels FILE"):
        script.main([*runs, *common, "--captions-from", "true-labels"])

    # true labels: validation from the identity folders, test from a file naming each test gallery image's class
    truth = json.loads((data / "test" / "ground_truth.json").read_text())
    gallery = sorted(p.name for p in (data / "test" / "gallery").iterdir())
    group = {g: f"class{chr(97 + i)}" for i, gs in enumerate(sorted(truth.values())) for g in gs}  # classa, classb, ...
    labels = {g: group.get(g, "other") for g in gallery}
    (tmp_path / "labels.json").write_text(json.dumps(dict(list(labels.items())[:-1])))
    with pytest.raises(KitError, match="no label for 1 test gallery images"):
        script.main([*runs, *common, "--captions-from", "true-labels", "--test-labels", str(tmp_path / "labels.json")])
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    assert script.main([*runs, *common, "--run-name", "true", "--captions-from", "true-labels", "--test-labels", str(tmp_path / "labels.json")]) == 0
    captions = json.loads((tmp_path / "r2" / "true" / "gallery_captions.json").read_text())
    for name, text in captions["val"].items():
        assert text == f"a photo of a {name.split('/')[1]}"
    assert captions["test"] == {g: f"a photo of a {c}" for g, c in labels.items()}
    run = load_run(tmp_path / "r2" / "true")
    # every validation gallery image of one identity has the same caption, so their columns are equal
    val = run.splits["val"]
    ids = [n.split("/")[1] for n in val.gallery_names]
    same = [j for j, i in enumerate(ids) if i == ids[0]]
    assert len(same) > 1 and np.allclose(val.sim[:, same[0]], val.sim[:, same[1]])
    assert run.meta["captions"]["source"] == "true-labels"

    # CLIP's labels: every gallery image (validation too) gets the nearest class name
    assert script.main([*runs, *common, "--run-name", "clip", "--captions-from", "clip-labels", "--closed-set"]) == 0
    captions = json.loads((tmp_path / "r2" / "clip" / "gallery_captions.json").read_text())
    names = {f"a photo of a {n}" for n in ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
                                           "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo")}
    assert set(captions["val"].values()) <= names and set(captions["test"].values()) <= names
    assert load_run(tmp_path / "r2" / "clip").meta["captions"]["source"] == "clip-labels"


@pytest.fixture
def tiny_vit_h14(tmp_path):
    """A tiny model registered under the paper's name ViT-H-14 (open_clip.add_model_config); the real config is
    put back afterwards."""
    import open_clip
    from open_clip import factory

    saved = factory._MODEL_CONFIGS.get("ViT-H-14")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "ViT-H-14.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / "cfg" / "ViT-H-14.json")
    try:
        torch.manual_seed(0)
        weights = tmp_path / "vit-h-14-laion2b.pt"
        torch.save(open_clip.create_model("ViT-H-14").state_dict(), weights)
        yield weights
    finally:
        factory._MODEL_CONFIGS["ViT-H-14"] = saved


def test_paper_preset_builds_the_papers_models_without_tta(rehearsal_data, tiny_blip, tiny_vit_h14, tmp_path, monkeypatch):
    """--preset paper: CLIP ViT-H-14 (both towers) read as laion2b_s32b_b79k, captions by Salesforce/blip2-opt-2.7b,
    the identity view only. Tiny stand-ins take the real names' place: a tiny config registered as ViT-H-14,
    the tiny BLIP captioner answering for the BLIP-2 hub name."""
    built, captioners, views = [], [], []
    real_create = script.create_clip

    def spy_create(model, weights, file_tag, img_size):
        clip = real_create(model, weights, file_tag, img_size)
        built.append((model, weights, file_tag, clip))
        return clip

    def stand_in(params, device):
        captioners.append(params.captioner)
        return Captioner(replace(params, captioner=str(tiny_blip)), device)

    real_caption, real_embedder = script.caption_images, script.Embedder
    monkeypatch.setattr(script, "create_clip", spy_create)
    monkeypatch.setattr(script, "caption_images", lambda *a, **k: real_caption(*a, **k, captioner_factory=stand_in))
    monkeypatch.setattr(script, "Embedder", lambda *a, **k: views.append(k["views"]) or real_embedder(*a, **k))
    runs = tmp_path / "runs"
    assert script.main(["--data", str(rehearsal_data), "--runs", str(runs), "--preset", "paper", "--weights", str(tiny_vit_h14),
                        "--workers", "0", "--max-new-tokens", "4", "--num-beams", "1"]) == 0
    [(model, weights, file_tag, clip)] = built
    assert (model, weights, file_tag, clip.name) == ("ViT-H-14", str(tiny_vit_h14), "laion2b_s32b_b79k", "ViT-H-14")
    assert clip.model.visual is not None and clip.model.transformer is not None  # image and text towers, one model
    assert set(captioners) == {"Salesforce/blip2-opt-2.7b"}
    assert views and all(len(v) == 1 and v[0] == View() for v in views)  # the identity view only: no TTA
    cfg = load_run(runs / "caption_match").meta["config"]
    assert (cfg["preset"], cfg["model"], cfg["captioner"], cfg["tta"]) == ("paper", "ViT-H-14", "Salesforce/blip2-opt-2.7b", [])
    assert json.loads((runs / "caption_match" / "captions.json").read_text())["captions"].keys() == {
        CaptionParams("Salesforce/blip2-opt-2.7b", 4, 1).tag()}


def test_paper_preset_fills_in_and_refuses_contradictions(tmp_path):
    paper = script.apply_preset(script.Config(preset="paper"))
    assert (paper.model, paper.weights, paper.file_tag, paper.captioner, paper.tta) == (
        "ViT-H-14", "laion2b_s32b_b79k", "laion2b_s32b_b79k", "Salesforce/blip2-opt-2.7b", [])
    assert script.apply_preset(script.Config()) == script.Config()  # kit: ViT-L-14 openai, flip TTA
    assert (script.Config().model, script.Config().weights, script.Config().tta) == ("ViT-L-14", "openai", ["flip"])
    for bad, flag in ((dict(model="ViT-B-32"), "--model"), (dict(tta=["rot"]), "--tta"),
                      (dict(captioner="Salesforce/blip-image-captioning-base"), "--captioner"),
                      (dict(weights="laion400m_e32"), "--weights")):
        with pytest.raises(KitError, match=f"--preset paper.*{flag}"):
            script.apply_preset(script.Config(preset="paper", **bad))


def test_pacs_benchmark_runs_and_writes_its_table(tmp_path):
    """benchmarks/methods/bench_methods.py on a PACS-shaped folder of generated images (4 classes, photo and sketch):
    Table I's layout (a block per metric, pairs as columns, a mean), P@50 where the gallery allows, and `tied`
    with a warning for a matrix whose rows depend on tie order."""
    from benchmarks.methods import bench_methods

    rng = np.random.default_rng(0)
    for domain in ("photo", "sketch"):
        for c, cls in enumerate(("dog", "horse", "house", "person")):
            (tmp_path / "pacs" / domain / cls).mkdir(parents=True)
            for i in range(16):
                pixels = np.full((24, 24, 3), 60 * c, np.uint8) + rng.integers(0, 30, (24, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "pacs" / domain / cls / f"{i}.jpg")
    results = tmp_path / "table.md"
    assert bench_methods.main(["--pacs", str(tmp_path / "pacs"), "--out", str(tmp_path / "out"), "--results", str(results),
                               "--pairs", "photo:sketch", "sketch:photo", "--methods", "clip_img2img", "caption_true_labels",
                               "--per-class", "13", "--threads", "1"]) == 0
    pair = tmp_path / "out" / "photo-sketch"
    truth = json.loads((pair / "data" / "test" / "ground_truth.json").read_text())
    assert len(truth) == 52 and all(len(g) == 13 for g in truth.values())
    labels = json.loads((pair / "data" / "test" / "gallery_labels.json").read_text())
    assert len(labels) == 52 and set(labels.values()) == {"dog", "horse", "house", "person"}
    table = results.read_text()
    assert table.startswith("- Date: ") and "\n# PACS" in table and "- Commit: " in table and "GFLOP/s" in table
    assert "- Command: `python benchmarks/methods/bench_methods.py --pacs" in table
    for block in ("## P@1", "## P@5", "## P@15", "## mAP@All", "## P@50", "## competition score"):
        assert f"{block}\n\n| method | weights | P->S | S->P | mean |" in table
    assert "## P@100" not in table  # a gallery of 52
    for row in ("chance (random scores", "CLIP image-to-image, zero-shot | random", "true class labels (the paper's ablation) | random"):
        assert row in table
    sim = np.load(pair / "runs" / "caption_true_labels" / "test_sim.npy")
    assert sim.shape == (52, 52)


def test_tie_order_check():
    """A figure that depends on the order of tied scores is found (constant rows, a tie across the cut);
    ties within one relevance, or behind the cut, are harmless."""
    from benchmarks.methods.bench_methods import tie_dependent

    rel = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], bool)
    constant = np.full((2, 4), 0.5, np.float32)
    assert tie_dependent(constant, rel, 1) == 2 and tie_dependent(constant, rel, None) == 2
    by_class = np.array([[0.9, 0.9, 0.1, 0.1], [0.2, 0.2, 0.7, 0.7]], np.float32)  # true labels: ties within a class
    assert tie_dependent(by_class, rel, 1) == 0 and tie_dependent(by_class, rel, None) == 0
    across = np.array([[0.9, 0.5, 0.5, 0.1], [0.1, 0.2, 0.9, 0.8]], np.float32)  # row 0: rel and non-rel tied at ranks 2-3
    assert tie_dependent(across, rel, 1) == 0 and tie_dependent(across, rel, 2) == 1 and tie_dependent(across, rel, 3) == 0
    assert tie_dependent(across, rel, None) == 1
