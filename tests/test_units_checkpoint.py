"""utils/training/checkpoint.py on real files: save and load, plain and wrapped state dicts, safetensors,
files that are not checkpoints, weights of another model, and the file hash."""

from __future__ import annotations

import hashlib
import logging

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from utils import __version__
from utils.errors import KitError
from utils.training.checkpoint import file_sha, load_checkpoint, save_checkpoint
from utils.weights.state import load_into, load_weights_file


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_save_then_load_gives_the_state_and_the_kit_version_and_leaves_no_temp(tmp_path):
    net = small_net()
    path = save_checkpoint(tmp_path / "last.pt", model=net.state_dict(), epoch=4, config={"lr": 0.1})
    assert path == tmp_path / "last.pt"
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 4 and ckpt["config"] == {"lr": 0.1} and ckpt["kit_version"] == __version__
    assert all(torch.equal(ckpt["model"][k], v) for k, v in net.state_dict().items())
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_load_checkpoint_names_the_file_when_it_is_missing_or_not_a_checkpoint(tmp_path):
    with pytest.raises(KitError, match=rf"{tmp_path / 'gone.pt'}: checkpoint not found"):
        load_checkpoint(tmp_path / "gone.pt")
    for name, content in (("text.pt", b"hello, not a checkpoint\n"), ("empty.pt", b""), ("cut.pt", None)):
        if content is None:  # a real checkpoint cut short, as a full disk leaves it
            save_checkpoint(tmp_path / "whole.pt", model=small_net().state_dict())
            content = (tmp_path / "whole.pt").read_bytes()[:200]
        (tmp_path / name).write_bytes(content)
        with pytest.raises(KitError, match=rf"{tmp_path / name}: not a readable torch checkpoint"):
            load_checkpoint(tmp_path / name)


def test_load_checkpoint_refuses_pickled_objects_beyond_tensors(tmp_path):
    torch.save({"model": small_net()}, tmp_path / "module.pt")  # a whole module: needs unpickling code, refused
    with pytest.raises(KitError, match="not a readable torch checkpoint"):
        load_checkpoint(tmp_path / "module.pt")


@pytest.mark.parametrize("wrap", [None, "model", "state_dict", "model_state_dict"])
def test_load_weights_file_unwraps_the_usual_keys(tmp_path, wrap):
    state = small_net().state_dict()
    torch.save(state if wrap is None else {wrap: state, "epoch": 3}, tmp_path / "w.pth")
    loaded = load_weights_file(tmp_path / "w.pth")
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)


def test_load_weights_file_reads_safetensors_and_refuses_broken_ones(tmp_path):
    state = {k: v.contiguous() for k, v in small_net().state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    loaded = load_weights_file(tmp_path / "w.safetensors")
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(KitError, match="not a readable safetensors file"):
        load_weights_file(tmp_path / "bad.safetensors")


def test_load_weights_file_refuses_missing_files_and_files_without_tensors(tmp_path):
    with pytest.raises(KitError, match=r"weights file not found \(--weights PATH\)"):
        load_weights_file(tmp_path / "none.pt")
    torch.save({"epoch": 3, "config": {"lr": 0.1}}, tmp_path / "no_tensors.pt")
    with pytest.raises(KitError, match="holds no state dict of tensors"):
        load_weights_file(tmp_path / "no_tensors.pt")


def test_load_into_strips_ddp_prefixes_and_loads_exactly(tmp_path):
    src, dst = small_net(), nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    ddp_state = {f"module.{k}": v for k, v in src.state_dict().items()}  # as a DDP-wrapped model saves it
    load_into(dst, ddp_state, tmp_path / "w.pt")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


def test_load_into_names_the_file_for_weights_of_another_shape(tmp_path):
    other = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)).state_dict()
    with pytest.raises(KitError, match=rf"{tmp_path / 'w.pt'}: weights do not fit the model \(.*size mismatch"):
        load_into(small_net(), other, tmp_path / "w.pt")


def test_load_into_non_strict_refuses_another_architecture_and_logs_partial_fits(tmp_path, caplog):
    net = small_net()
    with pytest.raises(KitError, match="only 0 of 4 tensors match the model; these are weights of another architecture"):
        load_into(net, {"backbone.conv.weight": torch.zeros(1)}, tmp_path / "w.pt", strict=False)
    partial = {k: v for k, v in small_net().state_dict().items() if k.startswith("0.")}  # 2 of 4 tensors
    partial["extra.bias"] = torch.zeros(2)
    with caplog.at_level(logging.INFO, logger="utils.weights.state"):
        load_into(net, partial, tmp_path / "w.pt", strict=False)
    assert "2 of 4 tensors loaded, 2 missing, 1 unexpected" in caplog.text


def test_file_sha_is_the_first_16_hex_digits_of_sha256_across_read_chunks(tmp_path):
    data = bytes(range(256)) * (1 << 16) + b"tail"  # 16 MiB + 4 bytes: two read chunks
    (tmp_path / "big.bin").write_bytes(data)
    assert file_sha(tmp_path / "big.bin") == hashlib.sha256(data).hexdigest()[:16]
    (tmp_path / "empty.bin").write_bytes(b"")
    assert file_sha(tmp_path / "empty.bin") == hashlib.sha256(b"").hexdigest()[:16]
