"""Turn a run's test matrix into top-10 lists and submit them; keep a ledger of every attempt.

    # check everything and write the body, no network:
    python submit.py --run runs/ensemble --group TEAM --dry-run
    # submit (URL and group may also come from COMPETITION_URL / COMPETITION_GROUP):
    python submit.py --run runs/ensemble --url http://HOST:PORT/ --group TEAM
    # earlier rounds' list form, plus an HTML page of the top-10s to look at:
    python submit.py --run runs/facenet --format list --data DATA --preview 30
    # every attempt so far, numbered; send one again (a number from --history, or a file):
    python submit.py --history
    python submit.py --resend 3 --url http://HOST:PORT/
    # a body the ledger records as sent (or maybe sent) goes again only with --force:
    python submit.py --resend 3 --url http://HOST:PORT/ --force

Order of work: check the flags -> load and check the matrix -> top-10 per query
-> validate (every query present, 10 distinct gallery names each; with --data,
the names must be exactly the files of DATA/test/query and DATA/test/gallery)
-> write the exact body to submissions/<timestamp>.json -> write an `attempt`
line to submissions/ledger.jsonl (fsynced: nothing is sent unless it is on disk)
-> POST it (redirects are never followed; --timeout-s bounds each attempt to the
last byte; retried only when it never reached the server or got a 5xx, each wait
at most --max-backoff-s, everything within --deadline-s) -> print the score, save
the reply beside the body, and write the attempt's outcome line. An attempt
without an outcome (killed, Ctrl-C, disk full) shows in --history as
"unknown: check the leaderboard". URLs are shown and recorded without
credentials or query values.

Exit codes: 0 submitted (a numeric score came back; or dry run), 2 bad input or
an output that cannot be written, 3 not submitted or NOT CONFIRMED (the body is
on disk; the reply had no numeric `accuracy`, or after a timeout the server may
hold it: check the leaderboard, then send it again with --resend FILE|N --force).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from utils.config import add_config_args, config_from_args
from utils.errors import run_cli
from utils.logs import setup_logging
from utils.submission.client import check_send_options
from utils.submission.lists import FORMATS
from utils.submission.stages import (
    NOT_SUBMITTED,
    body_from_run,
    body_to_resend,
    check_not_sent,
    check_resend,
    record_dry_run,
    resolve_target,
    send,
    show_history,
)

__all__ = ["NOT_SUBMITTED", "Config", "build_parser", "main"]

# Ctrl-C during a POST: the server may hold the body, so "run it again" would be wrong advice.
INTERRUPT_HINT = "check the leaderboard and `python submit.py --history` before sending again (--resend N --force)"


@dataclass
class Config:
    run: Path = field(default=Path("runs/ensemble"), metadata={"help": "run folder whose test_sim.npy is submitted", "metavar": "DIR"})
    url: str = field(default="", metadata={"help": "server URL (default: $COMPETITION_URL)"})
    group: str = field(default="", metadata={"help": "team name (default: $COMPETITION_GROUP)", "metavar": "NAME"})
    format: str = field(default="dict", metadata={"help": "body form: dict (current) or list (earlier rounds)", "choices": FORMATS})
    out: Path = field(default=Path("submissions"), metadata={"help": "where bodies, replies and ledger.jsonl are written", "metavar": "DIR"})
    data: str = field(default="", metadata={"help": "data folder: check names against test/query and test/gallery", "metavar": "DIR"})
    preview: int = field(default=0, metadata={"help": "write an HTML page of the first N queries' top-10 (needs --data)", "metavar": "N"})
    resend: str = field(default="", metadata={"help": "POST an earlier body as it is, checked first: a file, or an entry number from --history (skips --run)", "metavar": "FILE|N"})
    history: bool = field(default=False, metadata={"help": "print the ledger of --out (every attempt, numbered) and stop"})
    dry_run: bool = field(default=False, metadata={"help": "validate and write the body, do not POST"})
    timeout_s: float = field(default=30.0, metadata={"help": "seconds an attempt may take in all, connect to last byte of the answer"})
    retries: int = field(default=3, metadata={"help": "extra attempts when the server was not reached or answered 5xx"})
    backoff_s: float = field(default=1.0, metadata={"help": "first wait between attempts; doubles each time"})
    max_backoff_s: float = field(default=30.0, metadata={"help": "longest single wait between attempts"})
    deadline_s: float = field(default=300.0, metadata={"help": "seconds the whole submission may take, retries included"})
    force: bool = field(default=False, metadata={"help": "send a body the ledger records as (maybe) counted already: a --resend, or the same run to the same server again"})
    verbose: bool = field(default=False, metadata={"help": "debug logging"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, Config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    cfg = config_from_args(Config, build_parser().parse_args(argv))
    setup_logging(cfg.verbose)
    if cfg.history:
        return show_history(cfg.out)
    url, group = resolve_target(cfg.url, cfg.group, sending=not cfg.dry_run)
    check_send_options(cfg.timeout_s, cfg.retries, cfg.backoff_s, cfg.max_backoff_s, cfg.deadline_s)
    if cfg.resend:
        body, body_path = body_to_resend(cfg.resend, cfg.out, cfg.data)
        check_resend(body, body_path, group, cfg.out, force=cfg.force or cfg.dry_run)
    else:
        body, body_path = body_from_run(cfg.run, cfg.data, group, cfg.format, cfg.out, cfg.preview)
        check_not_sent(body_path, cfg.out, force=cfg.force or cfg.dry_run, url=url)  # the same run, sent twice
    if cfg.dry_run:
        return record_dry_run(body_path, url, body["groupname"], cfg.out)
    return send(body, body_path, url, cfg.out, cfg.timeout_s, cfg.retries, cfg.backoff_s, cfg.max_backoff_s, cfg.deadline_s)


if __name__ == "__main__":
    run_cli(main)
