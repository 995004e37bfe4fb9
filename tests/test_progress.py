"""Progress off a terminal: log lines at an interval (a fake clock, no sleeps), one setting for every bar."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from utils.errors import KitError
from utils.logs import progress_interval_s, progress_mode
from utils.progress import LineProgress, ProgressBar

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_every_interval_with_rate_and_time_left(caplog):
    clock = FakeClock()
    bar = LineProgress("embed gallery", total=100, interval_s=30, clock=clock)
    with caplog.at_level(logging.INFO, logger="utils.progress"):
        for _ in range(10):
            clock.now += 5  # 10 items in 50 s: one line, at 30 s
            bar.advance(1)
    assert len(caplog.records) == 1
    line = caplog.records[0].getMessage()
    assert line.startswith("embed gallery: 6/100 (6 %)")
    assert "0.2/s" in line and "left 7:50" in line and "elapsed 0:30" in line
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="utils.progress"):
        bar.finish()
    assert caplog.records[0].getMessage().startswith("embed gallery: 10/100 (10 %)")


def test_short_loop_stays_quiet(caplog):
    clock = FakeClock()
    bar = LineProgress("tiny", total=3, interval_s=30, clock=clock)
    with caplog.at_level(logging.INFO, logger="utils.progress"):
        for _ in range(3):
            clock.now += 1
            bar.advance(1, info="loss 0.5")
        bar.finish()
    assert caplog.records == []


def test_mode_and_interval_settings(monkeypatch):
    monkeypatch.setenv("KIT_PROGRESS", "lines")
    assert progress_mode() == "lines"
    monkeypatch.setenv("KIT_PROGRESS", "sometimes")
    with pytest.raises(KitError, match="KIT_PROGRESS='sometimes'"):
        progress_mode()
    monkeypatch.setenv("KIT_PROGRESS_INTERVAL_S", "soon")
    with pytest.raises(KitError, match="KIT_PROGRESS_INTERVAL_S"):
        progress_interval_s()
    monkeypatch.setenv("KIT_PROGRESS_INTERVAL_S", "0")
    assert progress_interval_s() == 0


def test_progress_bar_prints_lines_when_not_a_terminal(monkeypatch, caplog):
    monkeypatch.setenv("KIT_PROGRESS", "lines")
    monkeypatch.setenv("KIT_PROGRESS_INTERVAL_S", "0")
    with caplog.at_level(logging.INFO, logger="utils.progress"):
        with ProgressBar("scan", total=4) as bar:
            for _ in range(4):
                bar.advance()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("scan: 1/4") and lines[-1].startswith("scan: 4/4 (100 %)")


def test_library_tqdm_follows_the_setting(tmp_path):
    """A real child process, output to a file (not a terminal): KIT_PROGRESS=off silences tqdm, lines slows it."""
    code = (
        "from utils.logs import setup_logging; setup_logging()\n"
        "from tqdm import tqdm\n"
        "for _ in tqdm(range(2000), desc='libbar'): pass\n"
    )
    def run(mode: str) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
        env.update(KIT_PROGRESS=mode, KIT_PROGRESS_INTERVAL_S="30")
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        return out.stderr
    assert "libbar" not in run("off")
    assert "libbar" in run("lines")
