"""scripts/gpu_smoke.sh where torch sees no GPU: one "no GPU" line, exit 0, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_without_a_gpu_the_smoke_script_says_so_and_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "GPU_SMOKE_DIR": str(tmp_path / "smoke"), "PYTHON": sys.executable}
    env.pop("GPU_SMOKE_DEVICE", None)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_smoke.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [
        "no GPU: torch sees no CUDA device here; gpu_smoke.sh checks nothing on this machine (exit 0)"]
    assert not (tmp_path / "smoke").exists()
