"""Check everything before competition day's first command: data, runs, machine, server.

    # the data folder (every file counted; layout, the validation split, unreadable, near-empty and
    # duplicate images) and the machine (GPU; runs/ and submissions/ writable, room for the matrices):
    python preflight.py --data DATA
    # also every run under runs/ (complete, hashes match, on this data's lists; weight files load):
    python preflight.py --data DATA --runs runs
    # also the server (one GET, never a POST) and the team name:
    python preflight.py --data DATA --runs runs --url http://HOST:PORT/ --group TEAM

Prints a checklist (ok / warning / BLOCKER per line). Exit codes: 0 nothing
blocks (warnings may be listed), 1 a blocker, 2 bad flags.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from utils.checklist import BLOCK, WARN, Checklist
from utils.config import add_config_args, config_from_args
from utils.data.data_checks import check_data, matrix_shapes
from utils.errors import KitError, run_cli
from utils.logs import console, setup_logging
from utils.machine_checks import check_accelerator, check_output_folders
from utils.runs.run_checks import check_runs
from utils.submission.server_check import check_server
from utils.weights.report import check_weights

log = logging.getLogger("preflight")


@dataclass
class Config:
    data: Path = field(default=Path("data"), metadata={"help": "competition data folder", "metavar": "DIR"})
    runs: Path = field(default=Path("runs"), metadata={"help": "runs folder to check (a missing one is only a warning)", "metavar": "DIR"})
    submissions: Path = field(default=Path("submissions"), metadata={"help": "folder submit.py writes (its --out)", "metavar": "DIR"})
    url: str = field(default="", metadata={"help": "server URL to GET (default: $COMPETITION_URL; none: not checked)"})
    group: str = field(default="", metadata={"help": "team name (default: $COMPETITION_GROUP)", "metavar": "NAME"})
    timeout_s: float = field(default=5.0, metadata={"help": "seconds the server may take to answer the GET"})
    check_runs: bool = field(default=True, metadata={"help": "check every run folder under --runs (day.py turns it off: it redoes stale runs itself)"})
    verbose: bool = field(default=False, metadata={"help": "debug logging"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, Config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    cfg = config_from_args(Config, build_parser().parse_args(argv))
    setup_logging(cfg.verbose)
    if not 0 < cfg.timeout_s < math.inf:  # NaN too: the socket refused it with a ValueError traceback
        raise KitError(f"--timeout-s {cfg.timeout_s}: must be > 0")
    cl = Checklist()
    layout = check_data(cl, cfg.data, cfg.runs)
    if cfg.check_runs:
        check_runs(cl, cfg.runs, layout)
    check_weights(cl)
    check_accelerator(cl)
    check_output_folders(cl, cfg.runs, cfg.submissions, matrix_shapes(layout, cfg.runs))
    check_server(cl, cfg.url or os.environ.get("COMPETITION_URL", ""), cfg.group or os.environ.get("COMPETITION_GROUP", ""), cfg.timeout_s)
    console.print(cl.table(f"preflight: {cfg.data}"))
    blockers, warnings = cl.count(BLOCK), cl.count(WARN)
    if blockers:
        console.print(f"[bold red]{blockers} blocker(s)[/], {warnings} warning(s): fix the blockers before the day's runs")
    else:
        console.print(f"[bold green]ready[/]: no blockers, {warnings} warning(s)")
    return cl.exit_code()


if __name__ == "__main__":
    run_cli(main)
