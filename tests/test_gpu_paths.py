"""GPU code paths that run on the CPU: precision per card (injected capabilities), resume across
precisions, cache keys per precision/device/weights, compile once, determinism, DDP timeout, the loop's
small ones (pinned batches, host syncs, the global mean loss, workers per rank, the top-k bound)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from utils.device import amp_dtype, choose_precision, precision_record
from utils.errors import KitError
from utils.runs.model_run import run_precision
from utils.training.loop import LoopSettings, Trainer

ROOT = Path(__file__).resolve().parents[1]
CARDS = {"T4": (7, 5), "V100": (7, 0), "P100": (6, 0), "A100": (8, 0), "A10": (8, 6), "H100": (9, 0)}


# ----------------------------------------------------------------------------- precision per card


@pytest.mark.parametrize("card,want", [("T4", torch.float16), ("V100", torch.float16), ("P100", torch.float16),
                                       ("A100", torch.bfloat16), ("A10", torch.bfloat16), ("H100", torch.bfloat16)])
def test_bf16_only_on_cards_that_have_it_natively(card, want):
    assert choose_precision(CARDS[card]) == want
    assert choose_precision(CARDS[card], enabled=False) is None  # --no-amp: fp32
    assert choose_precision(None) is None  # the CPU


def _fake_card(monkeypatch, capability, name="Tesla T4"):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or capability >= (8, 0))


def test_a_t4_gets_fp16_even_though_torch_can_emulate_bf16_there(monkeypatch):
    _fake_card(monkeypatch, CARDS["T4"])
    assert amp_dtype(torch.device("cuda"), True) == torch.float16
    assert precision_record(torch.device("cuda"), True) == {
        "precision": "fp16", "device": {"type": "cuda", "name": "Tesla T4", "capability": "7.5"}}
    _fake_card(monkeypatch, CARDS["H100"], "NVIDIA H100 80GB HBM3")
    assert precision_record(torch.device("cuda:0"), True)["precision"] == "bf16"
    assert precision_record(torch.device("cuda:0"), False)["precision"] == "fp32"


def test_every_precision_choice_goes_through_utils_device():
    """No script or module asks torch about bf16 itself (the emulation default chose bf16 on a T4)."""
    offenders = [str(p.relative_to(ROOT)) for p in ROOT.glob("**/*.py")
                 if ".venv" not in p.parts and p.name != "test_gpu_paths.py" and p.relative_to(ROOT) != Path("utils/device.py")
                 and "is_bf16_supported" in p.read_text()]
    assert offenders == []


def test_meta_records_the_precision_and_the_card():
    assert run_precision({"device": "cpu", "amp": True}) == {
        "precision": "fp32", "device": {"type": "cpu", "name": "cpu", "capability": None}}


# ----------------------------------------------------------------------------- resume across precisions


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 3)

    def forward(self, x, y):
        return nn.functional.cross_entropy(self.net(x).float(), y)


def _batches(n=2):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g), torch.ones(8, dtype=torch.bool), [""] * 8)
            for _ in range(n)]


def _trainer(run_dir, amp, **settings):
    torch.manual_seed(0)
    model = _Toy()
    return Trainer(LoopSettings(**{"epochs": 2, **settings}), run_dir=run_dir, modules={"model": model}, step_module=model,
                   optimizer=torch.optim.SGD(model.parameters(), lr=0.1), device=torch.device("cpu"), amp=amp,
                   config={"model": "toy"}, classes=["a", "b", "c"], resume_keys=("model",))


def test_a_bf16_or_fp32_checkpoint_resumes_in_an_fp16_run_with_a_fresh_scaler(tmp_path):
    first = _trainer(tmp_path, None, epochs=1)
    first.fit(_batches())
    assert torch.load(tmp_path / "last.pt", weights_only=True)["scaler"] == {}  # disabled scaler: empty state
    again = _trainer(tmp_path, torch.float16, resume=True)  # raised "state dict is empty" before
    assert again.scaler.is_enabled() and again.scaler.get_scale() == 2.0**16
    assert again.state.epoch == 1
    again.fit(_batches())
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["precision"] == "fp16" and ckpt["scaler"]["scale"] > 0


def test_an_fp16_checkpoint_resumes_in_an_fp32_run(tmp_path):
    first = _trainer(tmp_path, torch.float16, epochs=1)
    first.fit(_batches())
    assert torch.load(tmp_path / "last.pt", weights_only=True)["scaler"]
    again = _trainer(tmp_path, None, resume=True)
    assert not again.scaler.is_enabled()
    assert len(again.fit(_batches()).history) == 2


# ----------------------------------------------------------------------------- caches keyed by what changes numbers


def _images(folder, n=5, size=24):
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        out.append(folder / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(out[-1])
    return out


def _cnn(seed=0):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


def _counting(model):
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_an_fp32_run_never_reads_a_bf16_cache_entry(tmp_path):
    import numpy as np

    from utils.data.augment import eval_transform
    from utils.embedding.embed import embed_images

    paths, cpu = _images(tmp_path / "imgs"), torch.device("cpu")
    model = _cnn()
    calls = _counting(model)
    kw = dict(device=cpu, batch_size=8, workers=0, cache_dir=tmp_path / "cache", cache_tag="cnn|default")
    bf16 = embed_images(model, paths, eval_transform(24), amp=torch.bfloat16, **kw)
    assert len(calls) == 1 and len(list((tmp_path / "cache").glob("emb_*.npy"))) == 1
    fp32 = embed_images(model, paths, eval_transform(24), amp=None, **kw)
    assert len(calls) == 2, "the fp32 run answered from the bf16 entry"
    assert not np.allclose(bf16, fp32, atol=1e-4) and len(list((tmp_path / "cache").glob("emb_*.npy"))) == 2
    again = embed_images(model, paths, eval_transform(24), amp=None, **kw)
    assert len(calls) == 2 and np.array_equal(again, fp32)  # the same precision still hits its own entry


def test_cache_keys_differ_by_device_class_and_weights_even_under_one_tag():
    from utils.cache import numbers_tag, weights_fingerprint

    a, b = _cnn(0), _cnn(1)  # random init, the same tag in a script ("weights=none")
    assert numbers_tag(a, None, torch.device("cpu")) != numbers_tag(a, None, torch.device("cuda"))
    assert numbers_tag(a, torch.bfloat16, torch.device("cuda")) != numbers_tag(a, torch.float16, torch.device("cuda"))
    assert weights_fingerprint(a) != weights_fingerprint(b) and weights_fingerprint(a) == weights_fingerprint(_cnn(0))
    before = weights_fingerprint(a)
    with torch.no_grad():
        a[0].weight.add_(1.0)  # an optimiser step: the memoised fingerprint must not be served
    assert weights_fingerprint(a) != before
    assert numbers_tag(a.forward, None, torch.device("cpu")) == numbers_tag(a, None, torch.device("cpu"))  # bound method: its module


# ----------------------------------------------------------------------------- compile once


def test_compile_and_batchnorm_folding_happen_once_for_the_four_image_sets(tmp_path, monkeypatch):
    import torch.fx.experimental.optimization as fx_opt

    from utils.data.augment import eval_transform
    from utils.embedding.embed import embed_images

    compiles, folds = [], []
    real_fuse = fx_opt.fuse
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiles.append(kw) or fn)
    monkeypatch.setattr(fx_opt, "fuse", lambda m, *a, **k: folds.append(1) or real_fuse(m, *a, **k))
    model, cpu = _cnn(), torch.device("cpu")
    sets = {s: _images(tmp_path / s, n=3) for s in ("val_query", "val_gallery", "test_query", "test_gallery")}
    for name, paths in sets.items():
        embed_images(model, paths, eval_transform(24), device=cpu, batch_size=2, workers=0, channels_last=True,
                     compile_model=True, cache_dir=tmp_path / "cache", desc=name)
    assert len(compiles) == 1 and len(folds) == 1
    with torch.no_grad():
        model[0].weight.mul_(0.5)  # new weights (a training step, a checkpoint loaded): prepared again
    embed_images(model, sets["val_query"], eval_transform(24), device=cpu, batch_size=2, workers=0, channels_last=True,
                 compile_model=True)
    assert len(compiles) == 2 and len(folds) == 2


def test_adding_compile_does_not_retrain_a_finished_run(tmp_path, monkeypatch):
    def trainer(config):
        torch.manual_seed(0)
        model = _Toy()
        return Trainer(LoopSettings(epochs=1), run_dir=tmp_path, modules={"model": model}, step_module=model,
                       optimizer=torch.optim.SGD(model.parameters(), lr=0.1), device=torch.device("cpu"), amp=None,
                       config=config, classes=["a", "b", "c"], data_key="files")

    trainer({"model": "toy", "compile": False}).fit(_batches())
    again = trainer({"model": "toy", "compile": True, "dist_timeout_min": 5})
    assert again.trained and again.state.epoch == 1  # reused, not retrained


# ----------------------------------------------------------------------------- determinism


@pytest.fixture
def restore_determinism():
    yield
    from utils.seed import set_determinism

    set_determinism(False, torch.device("cpu"))


def test_cpu_determinism_is_unchanged_and_cuda_defaults_to_fast_kernels(restore_determinism):
    from utils.seed import seed_everything, set_determinism

    seed_everything(0)  # the CPU default: deterministic kernels (warn-only), as always
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.backends.cudnn.benchmark
    assert set_determinism(False, torch.device("cuda:0")) == "fast"
    assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()


def test_deterministic_is_strict_so_an_op_without_a_deterministic_kernel_is_an_error(restore_determinism, monkeypatch):
    from utils.seed import CUBLAS_WORKSPACE, seed_everything

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seed_everything(0, deterministic=True, device=torch.device("cuda"))
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.backends.cudnn.benchmark and __import__("os").environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE


def test_the_cli_carries_deterministic_and_the_timeout_on_every_model_script():
    import train_resnet

    cfg = train_resnet.build_parser().parse_args(["--deterministic", "--dist-timeout-min", "90"])
    assert cfg.deterministic is True and cfg.dist_timeout_min == 90.0
    defaults = train_resnet.build_parser().parse_args([])
    assert defaults.deterministic is False and defaults.dist_timeout_min == 60.0


# ----------------------------------------------------------------------------- the DDP timeout


def test_the_timeout_reaches_init_process_group(monkeypatch):
    import datetime

    import torch.distributed as dist

    from utils.distributed import init_distributed

    seen = {}
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    init_distributed("cpu")
    assert seen == {"backend": "gloo", "timeout": datetime.timedelta(minutes=60)}  # NCCL's own default is 10
    init_distributed("cpu", 0.5)
    assert seen["timeout"] == datetime.timedelta(seconds=30)
    with pytest.raises(KitError, match="--dist-timeout-min 0"):
        init_distributed("cpu", 0)


def _slow_rank_job(folder, timeout_min, wait_s):
    """2 gloo ranks: rank 0 busy until ``go``; ``go`` is written ``wait_s`` after rank 1 reached the barrier."""
    import os
    import subprocess
    import sys
    import time

    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "tests" / "helpers" / "slow_rank.py"), str(folder), str(timeout_min)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    while not (folder / "rank1_waiting").exists() and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(wait_s)  # a lower bound on rank 0's step: longer than the short timeout, far below the long one
    (folder / "go").touch()
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def test_a_rank_0_step_longer_than_a_short_timeout_survives_the_raised_one(tmp_path):
    short_min = 2 / 60  # 2 s
    rc, out = _slow_rank_job(tmp_path / "short", short_min, wait_s=6)
    assert rc != 0 and not (tmp_path / "short" / "rank1_done").exists(), out[-2000:]  # the job dies at the barrier
    rc, out = _slow_rank_job(tmp_path / "raised", 5.0, wait_s=6)
    assert rc == 0, out[-2000:]
    assert (tmp_path / "raised" / "rank0_done").exists() and (tmp_path / "raised" / "rank1_done").exists()


# ----------------------------------------------------------------------------- small ones


def test_dataloader_workers_are_shared_among_the_ranks_of_a_node(monkeypatch):
    import utils.device as device

    monkeypatch.setattr(device, "cpu_count", lambda: 32)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert device.resolve_workers(-1) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert device.resolve_workers(-1) == 4  # 16 cores for decoding, 4 per rank (was 8 each: 32 processes)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert device.resolve_workers(-1) == 2 and device.resolve_workers(3) == 3


def test_topk_beyond_the_gpu_faiss_limit_is_one_line(monkeypatch):
    import sys
    import types

    import numpy as np

    import utils.runs.search as search

    built = []
    fake = types.SimpleNamespace(get_num_gpus=lambda: 1, index_cpu_to_all_gpus=lambda i: i,
                                 IndexFlatIP=lambda d: built.append(d))
    monkeypatch.setitem(sys.modules, "faiss", fake)
    monkeypatch.setattr(search, "has_faiss", True)
    g = np.eye(3000, 8, dtype=np.float32)
    with pytest.raises(KitError, match=r"--topk 2049: FAISS on a GPU returns at most 2048.*--search-backend exact"):
        search.search_topk(g[:2], g, k=2049, backend="faiss")
    assert built == []  # refused before any index is built


def test_the_loss_mask_selects_on_the_device_and_the_loss_is_read_once_per_interval(tmp_path, monkeypatch):
    import utils.training.loop as loop

    trainer = _trainer(tmp_path, None, epochs=1)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    ok = torch.tensor([True, False] * 4)
    monkeypatch.setattr(torch.Tensor, "__getitem__", lambda *a: (_ for _ in ()).throw(AssertionError("boolean indexing on the host")))
    xs, ys = trainer._to_device(x, y, ok)
    monkeypatch.undo()
    assert torch.equal(xs, x[ok]) and torch.equal(ys, y[ok])
    full, _ = trainer._to_device(x, y, torch.ones(8, dtype=torch.bool))
    assert full.data_ptr() == x.data_ptr()  # nothing readable dropped: the batch itself, no copy
    reads = []
    real = loop.Trainer._check_losses
    monkeypatch.setattr(loop.Trainer, "_check_losses", staticmethod(lambda p: reads.append(len(p)) or real(p)))
    monkeypatch.setattr(loop, "LOG_EVERY", 3)
    batches = _batches(7)
    trainer.fit(batches)
    assert reads == [3, 3, 1]  # one host read per 3 steps, and the rest at the epoch's end


def two_gloo_ranks(helper: str, tmp_path) -> list[dict]:
    """Run ``tests/helpers/<helper>`` on 2 gloo ranks under torchrun; the history of the last.pt it writes."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests" / "helpers" / helper), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return torch.load(tmp_path / "last.pt", weights_only=True)["history"]


def test_the_logged_loss_under_ddp_is_the_mean_over_every_rank(tmp_path):
    history = two_gloo_ranks("ddp_loss_mean.py", tmp_path)
    assert [h["loss"] for h in history] == [pytest.approx(1.5)]  # rank 0 alone: 1.0


def test_a_shared_validation_runs_on_every_rank_with_rank_0s_batchnorm_statistics(tmp_path):
    history = two_gloo_ranks("ddp_shared_eval.py", tmp_path)
    assert [h["val_score"] for h in history] == [1.0, 1.0]  # every rank validated, all with the same buffers


class _PutLoss(_Toy):
    """A loss whose forward uses ``put_``, which has no deterministic kernel (on the CPU too)."""

    def forward(self, x, y):
        buf = torch.zeros(4)
        buf.put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]))
        return super().forward(x, y) + buf.sum() * 0


def test_deterministic_training_that_meets_a_nondeterministic_op_is_one_line_naming_it(tmp_path, restore_determinism):
    from utils.seed import seed_everything

    model = _PutLoss()
    trainer = Trainer(LoopSettings(epochs=1), run_dir=tmp_path, modules={"model": model}, step_module=model,
                      optimizer=torch.optim.SGD(model.parameters(), lr=0.1), device=torch.device("cpu"), amp=None,
                      config={}, classes=["a", "b", "c"])
    seed_everything(0)  # the default: the op runs (warn-only on the CPU)
    trainer.fit(_batches(1))
    seed_everything(0, deterministic=True)
    trainer = Trainer(LoopSettings(epochs=2, retrain=True), run_dir=tmp_path, modules={"model": model}, step_module=model,
                      optimizer=torch.optim.SGD(model.parameters(), lr=0.1), device=torch.device("cpu"), amp=None,
                      config={}, classes=["a", "b", "c"])
    with pytest.raises(KitError, match=r"^--deterministic: put_ has no deterministic kernel on cpu; drop --deterministic"):
        trainer.fit(_batches(1))
