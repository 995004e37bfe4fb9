"""GPU code paths that run on the CPU: precision per card (injected capabilities), resume across
precisions, cache keys per precision/device/weights, compile once, determinism, DDP timeout, the loop's
small ones (pinned batches, host syncs, the global mean loss, workers per rank, the top-k bound)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from utils.device import amp_dtype, choose_precision, precision_record
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
