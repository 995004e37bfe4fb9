"""Ctrl-C and SIGTERM print the exact command that goes on: a real train_resnet.py on tiny data gets a real
SIGINT once its first epoch is saved; the printed command, run as printed, resumes and then takes a SIGTERM."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import visualize
from tests.helpers.processes import default_sigint, lines_until
from utils.errors import resume_command

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "test_resnet", "--weights", "none", "--img-size", "32", "--batch-size", "16", "--workers", "0",
        "--tta", "flip", "--eval-every", "0", "--epochs", "100000"]
COMMAND = re.compile(r"to go on from the last saved epoch: (.*)  \(with none saved yet, it starts from the beginning\)$")


def _start(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "400"}
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint, env=env)


def _interrupt(proc: subprocess.Popen, signum: int) -> tuple[int, str]:
    proc.send_signal(signum)
    _, rest = proc.communicate(timeout=300)
    return proc.returncode, rest.strip().splitlines()[-1]


@pytest.mark.slow
def test_ctrl_c_then_sigterm_print_the_command_that_resumes(rehearsal_data_session, tmp_path):
    args = ["train_resnet.py", "--data", str(rehearsal_data_session), "--runs", str(tmp_path / "runs"), *TINY]
    proc = _start([sys.executable, *args])
    try:
        lines_until(proc, "epoch 1:", "epoch 2:")  # epoch 1's last.pt is saved before epoch 2 starts
        code, line = _interrupt(proc, signal.SIGINT)
    finally:
        proc.kill()
    assert code == 130 and line.startswith("interrupted (Ctrl-C); "), line
    cmd = shlex.split(COMMAND.search(line).group(1))
    assert cmd[1:] == [*args, "--resume"]
    assert cmd[0] in ("python", sys.executable)

    resumed = _start(cmd)  # exactly as printed
    try:
        seen = lines_until(resumed, "resumed from", "epoch")
        code, line = _interrupt(resumed, signal.SIGTERM)
    finally:
        resumed.kill()
    assert str(tmp_path / "runs" / "resnet") in "".join(seen).replace("\n", "")
    assert code == 143 and line.startswith("interrupted (SIGTERM); "), line
    assert shlex.split(COMMAND.search(line).group(1)) == cmd  # --resume once, not twice


def test_a_script_without_resume_says_to_run_it_again():
    hint = resume_command(visualize.main, ["visualize.py", "--run", "runs/my run"])
    assert hint.startswith("to go on, run it again (finished steps are cached, so they are cheap): ")
    assert hint.endswith("visualize.py --run 'runs/my run'") and "--resume" not in hint



def test_run_cli_gives_sigterm_back_as_it_found_it(capsys):
    """In-process callers (tests, notebooks) keep their own SIGTERM handling after run_cli returns."""
    from utils.errors import run_cli

    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def main(argv):
        seen.append(signal.getsignal(signal.SIGTERM))
        return 0

    with pytest.raises(SystemExit) as done:
        run_cli(main)
    assert done.value.code == 0
    assert seen[0] is not before and signal.getsignal(signal.SIGTERM) is before
