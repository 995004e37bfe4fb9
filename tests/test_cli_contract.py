"""Every script follows the kit's shape, and every CLI option is used somewhere."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re

import pytest

from tests.helpers.paths import ROOT

SCRIPTS = sorted(p.stem for p in ROOT.glob("*.py") if (p.stem.startswith(("train_", "infer_")) or p.stem in ("ensemble", "submit", "visualize", "preflight")))
MODULES = ["utils.submission.server", "utils.data.rehearsal_data"]


def test_the_scripts_are_all_here():
    assert {"train_resnet", "ensemble", "submit"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS + MODULES)
def test_script_shape_and_every_option_is_used(name):
    mod = importlib.import_module(name)
    source = (ROOT / (name.replace(".", "/") + ".py")).read_text()
    assert mod.__doc__ and "python " in mod.__doc__, "docstring must show the commands"
    assert callable(mod.build_parser) and callable(mod.main)
    assert 'if __name__ == "__main__":\n    run_cli(main)' in source
    parser = mod.build_parser()
    dests = [a.dest for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    via_split = {"seed", "val_fraction", "query_domain"} if "cfg.split_params()" in source else set()
    if "begin_inference_run(cfg" in source:  # the shared opening reads the run, data, split and device flags
        via_split |= {"seed", "val_fraction", "query_domain", "data", "runs", "device", "run_name"}
    if "LoopSettings.from_config(cfg)" in source:  # the shared loop reads its own flags off the config
        from utils.training.loop import LoopSettings

        via_split |= {f.name for f in dataclasses.fields(LoopSettings)}
    if "cfg.run_form()" in source:  # the run-form flags (matrix or top-k form) are read by FormConfig.run_form
        from utils.config import FormConfig

        via_split |= {f.name for f in dataclasses.fields(FormConfig)}
    if "FacePipeline(cfg," in source:  # the face path reads its settings off the config
        from utils.faces.pipeline import FACE_FIELDS

        via_split |= set(FACE_FIELDS)
    unused = [d for d in dests if d not in via_split and not re.search(rf"\b(cfg|args|config)\.{d}\b", source)]
    assert not unused, f"{name}: options never read: {unused}"
    for action in parser._actions:  # every option with a value says its default in --help
        if action.option_strings and not isinstance(action, argparse._HelpAction) and action.default is not None:
            assert "(default:" in (action.help or ""), f"{name}: {action.option_strings[0]} does not show its default"


def _options(name: str) -> dict[str, argparse.Action]:
    parser = importlib.import_module(name).build_parser()
    return {s: a for a in parser._actions for s in a.option_strings}


@pytest.mark.parametrize("name", SCRIPTS)
def test_one_flag_name_one_meaning(name):
    """--weights is the backbone's weights, --tta one grammar, batch sizes say what they batch."""
    from utils.embedding.views import TTA_GROUPS

    opts = _options(name)
    if "--weights" in opts:
        assert opts["--weights"].metavar == "TAG|none|PATH", f"{name}: --weights must be a tag, none or a file"
        assert opts["--weights"].nargs is None
    if "--tta" in opts:
        assert opts["--tta"].nargs == "*" and set(opts["--tta"].default) <= set(TTA_GROUPS)
        assert "identity" in opts["--tta"].help
    if "--batch-size" in opts:
        assert name.startswith("train_"), f"{name}: --batch-size means the training batch; name what it batches"
    if "--seed" in opts and name not in ("ensemble", "submit"):
        assert "split" in opts["--seed"].help


@pytest.mark.parametrize("name", SCRIPTS)
def test_unknown_options_are_rejected(name, capsys):
    with pytest.raises(SystemExit) as info:
        importlib.import_module(name).build_parser().parse_args(["--definitely-not-an-option"])
    assert info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err
