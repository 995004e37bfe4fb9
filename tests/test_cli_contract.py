"""Every script follows the kit's shape, and every CLI option is used somewhere."""

from __future__ import annotations

import argparse
import importlib
import re

import pytest

from tests.conftest import ROOT

SCRIPTS = sorted(p.stem for p in ROOT.glob("*.py") if (p.stem.startswith(("train_", "infer_")) or p.stem in ("ensemble", "submit")))
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
    unused = [d for d in dests if d not in via_split and not re.search(rf"\b(cfg|args|config)\.{d}\b", source)]
    assert not unused, f"{name}: options never read: {unused}"
    helptext = parser.format_help()
    assert "default" in helptext


@pytest.mark.parametrize("name", SCRIPTS)
def test_unknown_options_are_rejected(name, capsys):
    with pytest.raises(SystemExit) as info:
        importlib.import_module(name).build_parser().parse_args(["--definitely-not-an-option"])
    assert info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err
