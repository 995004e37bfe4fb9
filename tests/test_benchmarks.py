"""benchmarks/: every results file is headed (date, commit, machine, command); no benchmark edits
sys.path or has a function over 60 lines; a benchmark runs as ``python -m benchmarks.<group>.<x>``
from the checkout before the kit is installed."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from benchmarks import common
from benchmarks.common import command, matmul_gflops, write_results
from tests.conftest import ROOT

BENCH_FILES = sorted((ROOT / "benchmarks").rglob("*.py"))
BENCHES = [p for p in BENCH_FILES if p.name.startswith("bench_")]
HEADER = re.compile(
    r"- Date: (?P<date>\d{4}-\d\d-\d\d \d\d:\d\d) UTC\n"
    r"- Commit: (?P<commit>[0-9a-f]{7,}(?:\+dirty)?)\n"
    r"- Machine: (?P<cores>\d+) CPU cores, load average [0-9.]+, fp32 matmul (?P<gflops>\d+) GFLOP/s \(numpy, 1024 x 1024\), GPU: .+\n"
    r"- Command: `(?P<command>[^`]+)`\n\n"
)


def _head() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def test_a_results_file_opens_with_date_commit_machine_and_command(tmp_path):
    out = tmp_path / "results" / "x.md"
    out.parent.mkdir()
    argv = [str(ROOT / "benchmarks/scale/bench_topk.py"), "--sizes", "400", "--out", "a b.md"]
    write_results(out, "| a | b |\n|---|---|\n", argv=argv)
    text = out.read_text()
    m = HEADER.match(text)
    assert m, text
    measured = datetime.strptime(m["date"], "%Y-%m-%d %H:%M").replace(tzinfo=timezone.utc)
    assert abs((datetime.now(timezone.utc) - measured).total_seconds()) < 180
    assert m["commit"].split("+")[0] == _head()
    assert int(m["cores"]) == len(os.sched_getaffinity(0))
    assert m["command"] == "python benchmarks/scale/bench_topk.py --sizes 400 --out 'a b.md'"
    assert text[m.end() :] == "| a | b |\n|---|---|\n"


def test_write_results_says_where_it_wrote(tmp_path, capsys):
    """The one "wrote <path>" line comes from write_results, after the file is in place."""
    out = tmp_path / "x.md"
    write_results(out, "| a |\n")
    assert out.is_file() and capsys.readouterr().out == f"wrote {out}\n"


@pytest.mark.parametrize("path", BENCHES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_benchmark_repeats_the_wrote_line(path):
    """write_results prints it; a benchmark printing it too would say it twice."""
    assert not re.search(r"""print\(f?["']wrote """, path.read_text()), f"{path.name}: write_results already prints 'wrote <path>'"


def test_the_command_names_the_script_from_the_root_however_it_was_started(tmp_path):
    script = ROOT / "benchmarks/methods/bench_pacs.py"
    assert command([str(script), "--help"]) == "python benchmarks/methods/bench_pacs.py --help"
    assert command([os.path.relpath(script), "--help"]) == "python benchmarks/methods/bench_pacs.py --help"
    outside = tmp_path / "mine.py"
    assert command([str(outside)]) == f"python {outside}"


def test_the_matmul_rate_is_the_best_of_the_timed_products(monkeypatch):
    """2 n^3 FLOP over the fastest of the timed products (the clock is scripted: no timing in the test)."""
    clock = iter([0.0, 0.5, 1.0, 1.4, 2.0, 2.6])  # three products: 0.5 s, 0.4 s, 0.6 s
    monkeypatch.setattr(common, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    assert matmul_gflops(n=128, repeats=3) == pytest.approx(2 * 128**3 / 0.4 / 1e9)


@pytest.mark.parametrize("path", BENCHES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_benchmark_writes_its_results_through_the_header(path):
    calls = {n.func.id for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert "write_results" in calls, f"{path.name} writes its results without benchmarks.common.write_results"
    assert "atomic_write_bytes" not in calls, f"{path.name} writes a file without the results header"


def test_no_benchmark_edits_sys_path():
    bad = [str(p.relative_to(ROOT)) for p in BENCH_FILES if "sys.path" in p.read_text()]
    assert not bad, f"import the kit through the editable install or python -m, not sys.path: {bad}"


def test_no_benchmark_function_is_over_60_lines():
    long = []
    for path in BENCH_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, "split into stage functions: " + ", ".join(long)


@pytest.mark.slow
def test_a_benchmark_runs_as_a_module_before_the_kit_is_installed(tmp_path):
    """``python -m benchmarks.scale.bench_topk`` from the root: no install, no PYTHONPATH; its workers find the kit too."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = tmp_path / "topk.md"
    argv = ["--sizes", "300", "--methods", "exact", "--dim", "8", "--query-subset", "0", "--fuse-sizes", "200",
            "--fuse-candidates", "20", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.scale.bench_topk", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    m = HEADER.match(out.read_text())
    assert m, out.read_text()[:500]
    assert m["command"] == "python benchmarks/scale/bench_topk.py " + " ".join(argv)
    rows = [line for line in out.read_text().splitlines() if line.startswith(("| 300", "| 200"))]
    assert len(rows) == 2, out.read_text()
    assert all(float(row.split(" | ")[3]) >= 0 for row in rows), rows  # a wall time, not a worker's "exit 1"


def test_the_benchmarks_read_the_shared_data_the_tests_read():
    """The data folder beside the checkout (../shared/data), wherever the benchmark's file sits in benchmarks/."""
    from benchmarks.faces import face_data
    from benchmarks.methods import bench_methods
    from tests.conftest import SHARED_DATA

    assert face_data.SHARED == SHARED_DATA
    assert bench_methods.build_parser().get_default("pacs") == SHARED_DATA / "pacs_mini"
