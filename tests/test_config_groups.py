"""The shared config groups (utils/config.py): each flag declared once, each check run by every script that mixes it in."""

from __future__ import annotations

import dataclasses
import importlib
import re
import subprocess
import sys
import typing
from dataclasses import dataclass, field

import pytest

from tests.conftest import ROOT
from utils import config as kit_config
from utils.config import (
    ConfigGroup,
    DataConfig,
    DeviceConfig,
    EmbeddingConfig,
    FineTuneConfig,
    FormConfig,
    LoopConfig,
    TimmModelConfig,
    add_config_args,
    check_groups,
    config_from_args,
    field_metadata,
    override,
)
from utils.device import default_workers, resolve_workers
from utils.errors import KitError

# every script whose Config mixes in the shared groups, and has check_config(cfg)
MODEL_SCRIPTS = sorted(p.stem for p in ROOT.glob("*.py") if p.stem.startswith(("train_", "infer_")))
GROUPS = [c for c in vars(kit_config).values() if isinstance(c, type) and issubclass(c, ConfigGroup) and dataclasses.is_dataclass(c)]

# for each group: flags whose value no run can use, each of which that group's check must refuse
BAD_VALUES = {
    DataConfig: [["--val-fraction", "0"], ["--val-fraction", "1.5"], ["--query-domain", ""]],
    DeviceConfig: [["--device", "gpu"], ["--device", "cuda:x"], ["--dist-timeout-min", "0"], ["--dist-timeout-min", "-5"]],
    FormConfig: [["--topk", "5"], ["--matrix-limit", "0"]],
    LoopConfig: [["--batch-size", "0"], ["--m-per-class", "0"], ["--epochs", "-1"], ["--max-steps", "-1"], ["--eval-every", "-1"],
                 ["--patience", "-1"], ["--warmup-epochs", "-1"], ["--grad-clip", "-1"], ["--lr", "-1"], ["--weight-decay", "-1"]],
    FineTuneConfig: [["--aug-strength", "-1"]],
    EmbeddingConfig: [["--embed-batch-size", "0"], ["--workers", "-2"], ["--tta", "jitter"]],
    TimmModelConfig: [["--model", "no_such_model"], ["--img-size", "0"]],
}
# their --model and --img-size name an open_clip model (0: the model's own side): their own fields, not TimmModelConfig's
OPEN_CLIP_SCRIPTS = {"infer_caption_match", "infer_clip_colour", "train_clip_arcface"}


def _module(name: str):
    return importlib.import_module(name)


def _checked(name: str, argv: list[str]):
    mod = _module(name)
    cfg = config_from_args(mod.Config, mod.build_parser().parse_args(argv))
    mod.check_config(cfg)
    return cfg


def test_every_group_has_bad_values_listed():
    """A new group must come with the values its check refuses (so the table below covers it)."""
    assert set(GROUPS) - {kit_config.RunConfig} == set(BAD_VALUES)


@pytest.mark.parametrize("name", MODEL_SCRIPTS)
def test_every_group_check_runs_in_every_script(name, tmp_path):
    """The same bad value is refused by every script that has the flag: no script's checks can drift."""
    groups = [g for g in BAD_VALUES if issubclass(_module(name).Config, g)]
    assert DataConfig in groups and DeviceConfig in groups
    for group in groups:
        for bad in BAD_VALUES[group]:
            with pytest.raises(KitError, match=bad[0]):
                _checked(name, ["--data", str(tmp_path), *bad])



@pytest.mark.parametrize("name", MODEL_SCRIPTS)
def test_every_float_flag_refuses_nan_and_infinity(name, tmp_path):
    """NaN passed every check written as 'x < low' (--lr nan trained until 'loss is nan at step 1; lower --lr';
    --min-face-frac nan, --alphas nan, --margin-deg nan and others ran on), and --dist-timeout-min inf overflowed
    where it became a timedelta. Now every float flag of every model script, lists included, is refused."""
    parser = _module(name).build_parser()
    floats = [a for a in parser._actions if a.option_strings and a.type is float]
    assert floats
    for action in floats:
        flag, n = action.option_strings[0], action.nargs if isinstance(action.nargs, int) else 1
        for bad in ("nan", "inf", "-inf"):
            argv = [f"{flag}={bad}"] if n == 1 else [flag, *[bad.lstrip("-")] * n]  # '-inf' alone reads as a flag
            with pytest.raises(KitError, match=rf"^{flag} -?(nan|inf): must be a finite number$"):
                _checked(name, ["--data", str(tmp_path), *argv])


def test_a_training_run_with_a_nan_learning_rate_stops_before_any_work(rehearsal_data_session, tmp_path):
    import train_resnet

    runs = tmp_path / "runs"
    with pytest.raises(KitError, match=r"^--lr nan: must be a finite number$"):
        train_resnet.main(["--data", str(rehearsal_data_session), "--runs", str(runs), "--model", "test_resnet",
                           "--weights", "none", "--img-size", "32", "--epochs", "1", "--workers", "0", "--lr", "nan"])
    assert not runs.exists()

@pytest.mark.parametrize("name", MODEL_SCRIPTS)
def test_scripts_declare_only_their_own_fields(name):
    """A field of a group reaches a script only through that group; a script re-sets it with override() alone."""
    cls = _module(name).Config
    own = cls.__dict__.get("__annotations__", {})
    hints = typing.get_type_hints(cls)
    for group in GROUPS:
        for flag in group.__dict__.get("__annotations__", {}):  # the flags this group declares itself
            if flag not in cls.__dataclass_fields__ or (group is TimmModelConfig and name in OPEN_CLIP_SCRIPTS):
                continue
            assert issubclass(cls, group), f"{name}: --{flag} is {group.__name__}'s flag; mix the group in"
            if flag in own:
                assert cls.__dataclass_fields__[flag].metadata.get("override"), f"{name}: re-declares {flag}; use override()"
                assert hints[flag] == typing.get_type_hints(group)[flag], f"{name}: {flag} changes the group's type"


def test_resnet_batches_need_m_per_class_only_for_pair_losses(tmp_path):
    _checked("train_resnet", ["--data", str(tmp_path), "--batch-size", "30"])  # ce: shuffled images
    with pytest.raises(KitError, match="--batch-size 30 must be a multiple of --m-per-class 4"):
        _checked("train_resnet", ["--data", str(tmp_path), "--batch-size", "30", "--loss", "triplet"])
    with pytest.raises(KitError, match="--batch-size 30 must be a multiple of --m-per-class 4"):
        _checked("train_clip_arcface", ["--data", str(tmp_path), "--batch-size", "30"])


def test_clip_trainer_default_command_passes_its_checks(tmp_path):
    """`python train_clip_arcface.py --data DATA --weights none`: every other flag at its default, and the checks pass."""
    cfg = _checked("train_clip_arcface", ["--data", str(tmp_path), "--weights", "none"])
    defaults = _module("train_clip_arcface").Config()
    changed = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(defaults, f.name)}
    assert changed == {"data", "weights"}
    assert cfg.workers == -1 and cfg.batch_size == 32 and cfg.epochs == 20
    assert resolve_workers(cfg.workers) == default_workers() and 1 <= default_workers() <= 8


def test_clip_trainer_default_command_reaches_the_data(tmp_path):
    """The real process gets past its checks and stops only at the (missing) data folder, in one line."""
    missing = tmp_path / "no-data"  # run in tmp_path: the default --runs (runs/) goes there
    proc = subprocess.run([sys.executable, str(ROOT / "train_clip_arcface.py"), "--data", str(missing), "--weights", "none"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and str(missing) in lines[-1] and "--workers" not in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------- the mechanism itself


@dataclass
class _Counted(LoopConfig):
    calls: typing.ClassVar[list[str]] = []

    def check(self) -> None:
        self.calls.append("counted")


@dataclass
class _Script(EmbeddingConfig, _Counted):
    name: str = field(default="x", metadata={"help": "its own flag"})
    epochs: int = override(7, "its own words for --epochs")
    patience: int = override(3)
    tta: list[str] = override(["flip", "blur"])


def test_override_keeps_the_group_flag_and_check():
    import argparse

    parser = argparse.ArgumentParser()
    add_config_args(parser, _Script)
    opts = {a.dest: a for a in parser._actions}
    assert opts["epochs"].default == 7 and opts["epochs"].help == "its own words for --epochs (default: %(default)s)"
    assert opts["patience"].default == 3 and opts["patience"].metavar == "N" and "validations" in opts["patience"].help
    assert opts["tta"].nargs == "*" and _Script().tta == ["flip", "blur"] and _Script().tta is not _Script().tta
    assert [f.name for f in dataclasses.fields(_Script)][:2] == ["epochs", "max_steps"]  # the group's place
    with pytest.raises(KitError, match="--patience -1"):
        check_groups(_Script(patience=-1))  # LoopConfig's check, through the subclass group


def test_check_groups_runs_each_group_check_once():
    _Counted.calls.clear()
    check_groups(_Script())
    assert _Counted.calls == ["counted"]
    with pytest.raises(KitError, match="--embed-batch-size 0"):
        check_groups(_Script(embed_batch_size=0))


def test_override_of_a_flag_no_group_declares_is_a_programming_error():
    @dataclass
    class Lonely(ConfigGroup):
        nothing: int = override(3)

    with pytest.raises(TypeError, match="Lonely.nothing: override"):
        field_metadata(Lonely, "nothing")


def test_the_submission_client_starts_without_torch():
    """submit.py parses its flags through utils.config; that must not import torch (seconds at start-up,
    and torch's own start-up writes files, which fails under a file-size limit before any flag is read)."""
    import subprocess
    import sys

    code = "import sys, submit; sys.exit(1 if 'torch' in sys.modules else 0)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr or "submit.py imported torch"


@pytest.mark.parametrize("name,glob", [("infer_dino", "*dinov2*"), ("train_resnet", "*resnet*"), ("infer_cnn_features", "*resnet*")])
def test_timm_scripts_share_the_model_group(name, glob, tmp_path):
    """The timm scripts take --model and --img-size from TimmModelConfig; the error keeps each script's family hint."""
    assert issubclass(_module(name).Config, TimmModelConfig)
    with pytest.raises(KitError, match=re.escape(f"--model 'no_such_model': not a timm model; list them with timm.list_models('{glob}')")):
        _checked(name, ["--data", str(tmp_path), "--model", "no_such_model"])
    with pytest.raises(KitError, match="^--img-size 0: at least 1$"):
        _checked(name, ["--data", str(tmp_path), "--img-size", "0"])


@pytest.mark.parametrize("name", sorted(OPEN_CLIP_SCRIPTS))
def test_open_clip_scripts_keep_their_own_model_flags(name):
    """The exemption above names real scripts whose --model is not a timm name."""
    cls = _module(name).Config
    assert not issubclass(cls, TimmModelConfig) and "model" in cls.__dataclass_fields__
