"""Every script follows the kit's shape, and every CLI option is used somewhere."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re

import pytest

from tests.helpers.paths import ROOT

SCRIPTS = sorted(p.stem for p in ROOT.glob("*.py") if (p.stem.startswith(("train_", "infer_")) or p.stem in ("ensemble", "submit", "visualize", "preflight", "day")))
MODULES = ["utils.submission.server", "utils.data.rehearsal_data", "utils.runs.report", "utils.weights.__main__"]


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
        via_split |= {"seed", "val_fraction", "query_domain", "data", "runs", "device", "run_name", "deterministic"}
    if "(RunConfig)" in source or ", RunConfig)" in source:  # a RunConfig flag for torchrun: read where a script joins the group
        via_split |= {"dist_timeout_min"} if "init_distributed(" not in source else set()
    if "LoopSettings.from_config(cfg)" in source:  # the shared loop reads its own flags off the config
        from utils.training.loop import LoopSettings

        via_split |= {f.name for f in dataclasses.fields(LoopSettings)}
    if "cfg.run_form()" in source:  # the run-form flags (matrix or top-k form) are read by FormConfig.run_form
        from utils.config import FormConfig

        via_split |= {f.name for f in dataclasses.fields(FormConfig)}
    if "FacePipeline(cfg," in source:  # the face path reads its settings off the config
        from utils.faces.pipeline import FACE_FIELDS, OPTIONAL_FACE_FIELDS

        via_split |= set(FACE_FIELDS) | set(OPTIONAL_FACE_FIELDS)
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


@pytest.mark.parametrize("name", SCRIPTS + MODULES)
def test_a_path_flag_with_a_tilde_after_the_equals_sign_is_the_home_folder(name, tmp_path, monkeypatch):
    """The shell expands ``--runs ~/x`` but not ``--runs=~/x`` (nor a quoted '~/x' or a recipe's value): the path
    reached the script as '~/x' and a model script wrote its run into a folder named '~' in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    parser = importlib.import_module(name).build_parser()
    paths = [a for a in parser._actions if a.option_strings and a.type is not None and getattr(a.type, "__name__", "") in ("Path", "user_path")]
    assert paths, "every script takes a path flag"
    for action in paths:
        positional = ["list"] if name == "utils.weights.__main__" else []  # its command argument
        value = getattr(parser.parse_args([*positional, f"{action.option_strings[0]}=~/x"]), action.dest)
        assert value == tmp_path / "x" or value == [tmp_path / "x"], action.option_strings[0]


def test_ensemble_reads_runs_given_as_tilde_after_the_equals_sign(tmp_path, monkeypatch):
    import ensemble
    from tests.helpers.runs import write_runs

    write_runs(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path / "data")
    assert ensemble.main(["--runs=~/runs", "--bootstrap", "10"]) == 0
    assert (tmp_path / "runs" / "ensemble" / "test_sim.npy").is_file() and not (tmp_path / "data" / "~").exists()


# ---------------------------------------------------------------------------- every default and every documented command passes the checks

PLACEHOLDERS = {"DATA": "data", "$COMPETITION_URL": "http://127.0.0.1:9/", "URL": "http://127.0.0.1:9/", "HOST:PORT": "127.0.0.1:9"}
COMMAND = re.compile(r"^\s*(?:(?:\.venv/bin/)?python\s+|torchrun\s+(?:\S+\s+)*?)(\w+)\.py\b(.*)$")


def documented_commands() -> list[tuple[str, str, str]]:
    """``(where, script, arguments)`` of every `python X.py` / `torchrun ... X.py` line of README.md, docs/*.md
    and the scripts' docstrings (a line ending in a backslash goes on)."""
    sources = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
    texts = [(p.relative_to(ROOT), p.read_text()) for p in sources]
    texts += [(f"{name}.py docstring", importlib.import_module(name).__doc__ or "") for name in SCRIPTS]
    found = []
    for where, text in texts:
        lines = text.splitlines()
        for i, line in enumerate(lines):
            m = COMMAND.match(line)
            if not m:
                continue
            rest, j = m.group(2), i
            while rest.rstrip().endswith("\\") and j + 1 < len(lines):
                j += 1
                rest = rest.rstrip()[:-1] + " " + lines[j]
            found.append((f"{where}:{i + 1}", m.group(1), rest))
    return found


def run_config_checks(name: str, argv: list[str]) -> None:
    """Parse ``argv`` as the script does and run its config checks (nothing is loaded or run)."""
    import inspect

    from utils.config import config_from_args

    mod = importlib.import_module(name)
    args = mod.build_parser().parse_args(argv)
    if not hasattr(mod, "Config"):
        return
    cfg = config_from_args(mod.Config, args)
    check = getattr(mod, "check_config", None)
    if check is None:
        return
    params = list(inspect.signature(check).parameters)
    if params == ["cfg"]:
        check(cfg)
    elif params == ["cfg", "n_models"]:  # ensemble.py: the fusion weights, one per model
        check(cfg, len(cfg.models) or len(cfg.fusion_weights) or 2)


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_default_passes_the_config_checks(name, tmp_path):
    """`python X.py --data DIR` (or no flag where the script has no --data): every other flag at its default."""
    argv = ["--data", str(tmp_path)] if "--data" in _options(name) else []
    run_config_checks(name, argv)


def test_the_documents_show_every_model_script():
    """The command check below is not vacuous: every model script has documented command lines."""
    shown = {script for _, script, _ in DOCUMENTED}
    assert {s for s in SCRIPTS if s.startswith(("train_", "infer_"))} <= shown
    assert len(DOCUMENTED) >= 30


DOCUMENTED = documented_commands()


@pytest.mark.parametrize("where,script,rest", DOCUMENTED, ids=[where for where, _, _ in DOCUMENTED])
def test_documented_commands_pass_the_config_checks(where, script, rest, tmp_path, monkeypatch):
    """Every command line of the README, docs/ and the docstrings parses and passes its script's checks as written,
    with DATA and the like substituted (files named on the line that an earlier step writes are made first)."""
    import shlex

    from utils.errors import KitError

    assert script in SCRIPTS, f"{where}: {script}.py is not a script of the kit"
    for key, value in PLACEHOLDERS.items():
        rest = rest.replace(key, value)
    argv = shlex.split(rest, comments=True)
    if argv == ["--help"]:  # "python X.py --help" prints the flags and exits 0
        with pytest.raises(SystemExit) as info:
            importlib.import_module(script).build_parser().parse_args(argv)
        assert info.value.code == 0
        return
    monkeypatch.chdir(tmp_path)
    for flag in ("--captions", "--test-labels"):  # captions.json of an earlier run; the user's gallery labels
        if script == "infer_caption_match" and flag in argv:
            for f in argv[argv.index(flag) + 1:]:
                if f.startswith("--"):
                    break
                (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / f).write_text("{}")
    try:
        run_config_checks(script, argv)
    except KitError as err:
        pytest.fail(f"{where}: python {script}.py{rest}\n  -> error: {err}")
    except SystemExit as err:
        pytest.fail(f"{where}: python {script}.py{rest}\n  -> argparse exit {err.code}")
