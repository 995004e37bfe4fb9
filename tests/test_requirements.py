"""requirements.txt (and requirements-nodeps.txt) list every package the kit imports, pinned."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions

from tests.helpers.paths import ROOT

SKIP_PARTS = {".venv", "tests", "benchmarks", "rehearsal", "runs", "data"}
# modules whose wheel does not declare them (no top_level.txt / RECORD mapping)
UNDECLARED = {"dlib": {"dlib-bin"}}


def imported_top_modules() -> set[str]:
    mods = set()
    for f in ROOT.rglob("*.py"):
        if SKIP_PARTS & set(f.relative_to(ROOT).parts):
            continue
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, ast.Import):
                mods |= {a.name.split(".")[0] for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                mods.add(n.module.split(".")[0])
    local = {p.stem for p in ROOT.glob("*.py")} | {"utils", "benchmarks", "tests"}
    return {m for m in mods if m not in sys.stdlib_module_names and m not in local}


def pinned() -> dict[str, str]:
    out = {}
    for name in ("requirements.txt", "requirements-nodeps.txt"):
        for line in (ROOT / name).read_text().splitlines():
            m = re.match(r"^([A-Za-z0-9_.\-]+)==([^;\s]+)", line.strip())
            if m:
                out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def test_every_imported_package_is_pinned():
    dists = packages_distributions()
    pins = pinned()
    missing = []
    for mod in sorted(imported_top_modules()):
        if mod == "tomli":  # the Python 3.10 fallback of tomllib: pinned with a marker, absent on 3.11
            assert re.search(r"^tomli==\S+; python_version < \"3.11\"", (ROOT / "requirements.txt").read_text(), re.M)
            continue
        names = {d.lower().replace("_", "-") for d in dists.get(mod, [])} or UNDECLARED.get(mod, set())
        assert names, f"{mod}: imported by the kit but installed by no distribution"
        if not names & set(pins):
            missing.append(f"{mod} ({', '.join(sorted(names))})")
    assert not missing, f"imported but not pinned in requirements*.txt: {missing}"
