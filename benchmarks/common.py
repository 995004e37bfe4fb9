"""What every benchmark shares: the repository root and the header of its results file.

Every results file a benchmark writes opens with when, at which commit, on which machine and by
which command it was measured::

    from benchmarks.common import ROOT, write_results

    write_results(ROOT / "benchmarks/results/bench_x.md", "\\n".join(markdown_lines))

The machine line gives the usable CPU cores, the load average at the end of the run and the
fp32 matrix-multiply rate measured then (numpy, 1024 x 1024, best of 10), so that figures from
two machines, or from one machine under different load, can be told apart.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def child_env() -> dict[str, str]:
    """The environment for a benchmark's own worker processes: this checkout first on the import path.

    A worker runs as ``python benchmarks/<group>/bench_x.py``; without the editable install
    (or with one pointing at another checkout) it would not import this checkout's ``utils``.
    """
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def matmul_gflops(n: int = 1024, repeats: int = 10) -> float:
    """Best fp32 GFLOP/s of an ``n`` x ``n`` numpy matmul on this machine, now."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # the first call pays for thread start-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _gpu() -> str:
    """The CUDA device's name if the benchmark used torch and one is visible, else ``none``."""
    torch = sys.modules.get("torch")  # never imported here: numpy-only benchmarks stay without it
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "none"


def command(argv: list[str] | None = None) -> str:
    """The command line that ran this benchmark, with its script's path from the repository root.

    ``python -m benchmarks.x.y`` and ``python benchmarks/x/y.py`` both give the script's path.
    """
    argv = sys.argv if argv is None else argv
    script = Path(argv[0]).resolve()
    shown = str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else argv[0]
    return "python " + shlex.join([shown, *argv[1:]])


def results_header(argv: list[str] | None = None) -> str:
    """Markdown lines: date (UTC), commit, machine (cores, load, measured GFLOP/s, GPU), command."""
    from utils.device import cpu_count  # the kit's helpers load torch: imported once measuring is over
    from utils.runs.model_run import git_commit

    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = (
        f"{cpu_count()} CPU cores, load average {load:.1f}, "
        f"fp32 matmul {matmul_gflops():.0f} GFLOP/s (numpy, 1024 x 1024), GPU: {_gpu()}"
    )
    return "\n".join(
        [
            f"- Date: {date}",
            f"- Commit: {git_commit(ROOT, ignore=('benchmarks/results',))}",  # results files written earlier by this or another benchmark are not the code measured
            f"- Machine: {machine}",
            f"- Command: `{command(argv)}`",
        ]
    )


def write_results(path: Path, markdown: str, argv: list[str] | None = None) -> None:
    """Write ``markdown`` to ``path`` (atomically) under the results header, then print ``wrote <path>``."""
    from utils.atomic import atomic_write_bytes
    from utils.logs import console

    text = results_header(argv) + "\n\n" + markdown.rstrip("\n") + "\n"
    atomic_write_bytes(Path(path), text.encode())
    console.print(f"wrote {path}")
