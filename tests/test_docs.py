"""The docs say only what the kit has: README.md and docs/**/*.md.

Every `python SCRIPT.py ...` line names an existing script and only flags its --help lists;
every `python -m MODULE` imports; every relative link (and its #anchor) and every repository
file the docs cite exists; the README stays a front door of at most 200 lines; the code
layout page names every module.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from tests.helpers.paths import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
README_MAX_LINES = 200

# `python X.py ...` or `python -m pkg.mod ...`, with any prefix path to the interpreter
# (.venv/bin/python); the command ends at a closing backtick, a comment, a pipe or a shell separator.
COMMAND = re.compile(r"(?:^|[\s`(/])python3? +(?P<target>-m +[\w.]+|[\w./-]+\.py)(?P<rest>[^`#|;&\n]*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.M)
# a file of the repository named in the text: under a top-level folder of the kit, or a root file
CITED = re.compile(
    r"(?<![\w./-])((?:utils|benchmarks|tests|scripts|docs)/[\w./-]*\w\.(?:py|md|sh|txt|toml|csv|json)"
    r"|requirements(?:-dev)?\.txt|pyproject\.toml|[a-z_]+\.py)(?![\w/-])"
)


def _text(path: Path) -> str:
    return path.read_text().replace("\\\n", " ")  # shell line continuations join their command


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def commands() -> list[tuple[str, str, str]]:
    """(doc, target, the rest of the line) for every python command in the docs."""
    found = []
    for doc in DOCS:
        for m in COMMAND.finditer(_text(doc)):
            found.append((_rel(doc), re.sub(r" +", " ", m.group("target")), m.group("rest")))
    return found


def _options(parser: argparse.ArgumentParser):
    """Every option string of ``parser`` and of its sub-commands' parsers."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                yield from _options(sub)
        elif not isinstance(a, argparse._HelpAction):
            yield from a.option_strings


@cache
def options_of(target: str) -> frozenset[str]:
    """The option strings --help lists for a script path or ``-m module``.

    Scripts at the root and the kit's modules expose ``build_parser()`` and are read
    in-process; anything else (benchmarks) answers ``--help`` in a subprocess.
    """
    module = target[3:] if target.startswith("-m ") else target[:-3].replace("/", ".")
    if "/" not in target or target.startswith("-m utils."):
        mod = importlib.import_module(module)
        if not hasattr(mod, "build_parser"):  # a package run as python -m PACKAGE
            mod = importlib.import_module(module + ".__main__")
        return frozenset(_options(mod.build_parser()))
    argv = [sys.executable, *target.split(), "--help"] if target.startswith("-m ") else [sys.executable, target, "--help"]
    # the checkout under test first: the venv's editable install may point at another checkout
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{target} --help failed: {proc.stderr[-500:]}"
    return frozenset(FLAG.findall(proc.stdout))


def test_the_docs_are_found():
    names = {_rel(d) for d in DOCS}
    assert {"README.md", "docs/design.md", "docs/competition-day.md", "docs/benchmarks.md"} <= names
    assert len(commands()) > 50


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    text = "\n".join(lines)
    for needed in ("bash scripts/rehearsal.sh", "bash scripts/test.sh", "source .venv/bin/activate", "preflight.py"):
        assert needed in text, f"README.md does not say {needed!r}"
    if "$COMPETITION_URL" in text:
        assert text.index("COMPETITION_URL=") < text.index("$COMPETITION_URL"), "README.md uses $COMPETITION_URL before it sets it"


def test_every_command_names_a_script_or_module_that_exists():
    bad = []
    for doc, target, _ in commands():
        if target.startswith("-m "):
            if importlib.util.find_spec(target[3:]) is None:
                bad.append(f"{doc}: python {target}: no such module")
        elif not (ROOT / target).is_file():
            bad.append(f"{doc}: python {target}: no such file")
    assert not bad, "\n".join(bad)


def _targets() -> list:
    """Root scripts and modules (read in-process, fast); benchmarks answer --help in a subprocess (slow)."""
    targets = sorted({t for _, t, _ in commands() if t.startswith("-m ") or (ROOT / t).is_file()})
    return [pytest.param(t, marks=pytest.mark.slow) if "/" in t and not t.startswith("-m ") else t for t in targets]


@pytest.mark.parametrize("target", _targets())
def test_every_flag_in_the_docs_is_one_its_script_lists(target):
    """A doc that shows `python X.py --flag` where X has no --flag sends the user into an error."""
    opts = options_of(target)
    bad = sorted(
        {f"{doc}: python {target} {flag}" for doc, t, rest in commands() if t == target for flag in FLAG.findall(rest) if flag not in opts and flag != "--help"}
    )
    assert not bad, "flags the script does not have:\n" + "\n".join(bad)


def _script_of_page(page: Path) -> str | None:
    """docs/scripts/<name>.md documents <name>.py at the root, or a module (server, rehearsal_data)."""
    modules = {"server": "-m utils.submission.server", "rehearsal_data": "-m utils.data.rehearsal_data"}
    if page.stem in modules:
        return modules[page.stem]
    return f"{page.stem}.py" if (ROOT / f"{page.stem}.py").is_file() else None


def test_every_flag_table_row_on_a_script_page_is_a_flag_of_that_script():
    bad = []
    for page in sorted((ROOT / "docs" / "scripts").glob("*.md")):
        target = _script_of_page(page)
        if target is None:
            continue
        opts = options_of(target)
        text = page.read_text()
        flags_section = text[text.index("## Flags") :].split("\n## ")[0] if "## Flags" in text else ""
        for flag in re.findall(r"^\| `(--(?:\[no-\])?[a-z][a-z0-9-]*)`", flags_section, re.M):
            if flag.replace("[no-]", "") not in opts:
                bad.append(f"{_rel(page)}: {flag}")
    assert not bad, "flag tables name flags the script does not have:\n" + "\n".join(bad)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_and_anchor_exists():
    bad = []
    for doc in DOCS:
        for m in LINK.finditer(doc.read_text()):
            target = m.group("target")
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked offline
            path_part, _, anchor = target.partition("#")
            dest = (doc.parent / path_part).resolve() if path_part else doc
            if not dest.exists():
                bad.append(f"{_rel(doc)}: ({target}): {path_part} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in {_slug(h) for h in HEADING.findall(dest.read_text())}:
                bad.append(f"{_rel(doc)}: ({target}): no heading #{anchor} in {_rel(dest)}")
    assert not bad, "\n".join(bad)


def test_every_repository_file_the_docs_cite_exists():
    """A path is taken from the repository root, or from the page's folder (docs/ links to scripts/x.md)."""
    bad = sorted(
        {f"{_rel(doc)}: {path}" for doc in DOCS for path in CITED.findall(doc.read_text()) if not ((ROOT / path).exists() or (doc.parent / path).exists())}
    )
    assert not bad, "the docs cite files that are not in the repository:\n" + "\n".join(bad)


def test_the_layout_page_names_every_module():
    """docs/architecture.md's "Layout of the code" matches the tree: every group and module is named."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    section = page[page.index("## Layout of the code") :]
    section = section[: section.index("\n## ", 3)]
    missing = []
    for path in sorted((ROOT / "utils").rglob("*.py")):
        if path.name == "__init__.py" or "__pycache__" in path.parts:
            continue
        group = path.parent.relative_to(ROOT / "utils")
        if str(group) != "." and f"{group}/" not in section:
            missing.append(f"utils/{group}/")
        if not re.search(rf"\b{path.stem}\b", section):
            missing.append(_rel(path))
    assert not missing, f"docs/architecture.md layout does not name: {sorted(set(missing))}"
