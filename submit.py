"""Turn a run's test matrix into top-10 lists and submit them.

    # check everything and write the body, no network:
    python submit.py --run runs/ensemble --group TEAM --dry-run
    # submit (URL and group may also come from COMPETITION_URL / COMPETITION_GROUP):
    python submit.py --run runs/ensemble --url http://HOST:PORT/ --group TEAM
    # earlier rounds' list form, plus an HTML page of the top-10s to look at:
    python submit.py --run runs/facenet --format list --data DATA --preview 30

Order of work: load and check the matrix -> top-10 per query -> validate
(every query present, 10 distinct gallery names each; with --data, the names
must be exactly the files of DATA/test/query and DATA/test/gallery) -> write
the exact body to submissions/<timestamp>.json -> POST it with a timeout and
retries (connection errors and 5xx; never 4xx) -> print the score and save the
reply beside the body.

Exit codes: 0 submitted (or dry run), 2 bad input, 3 not submitted (the body is
on disk; send it again later with --resend FILE).
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from rich.table import Table

from utils.atomic import atomic_write_bytes, atomic_write_json
from utils.config import add_config_args, config_from_args
from utils.data.layout import load_layout
from utils.errors import KitError, run_cli
from utils.logs import console, setup_logging
from utils.runs.similarity_io import load_run
from utils.runs.topk_run import is_topk_run, load_topk_split, topk_lists
from utils.submission.lists import FORMATS, NotSubmitted, make_body, post, save_body, top_lists, validate_lists

log = logging.getLogger("submit")
NOT_SUBMITTED = 3


@dataclass
class Config:
    run: Path = field(default=Path("runs/ensemble"), metadata={"help": "run folder whose test_sim.npy is submitted", "metavar": "DIR"})
    url: str = field(default="", metadata={"help": "server URL (default: $COMPETITION_URL)"})
    group: str = field(default="", metadata={"help": "team name (default: $COMPETITION_GROUP)", "metavar": "NAME"})
    format: str = field(default="dict", metadata={"help": "body form: dict (current) or list (earlier rounds)", "choices": FORMATS})
    out: Path = field(default=Path("submissions"), metadata={"help": "where bodies and replies are written", "metavar": "DIR"})
    data: str = field(default="", metadata={"help": "data folder: check names against test/query and test/gallery", "metavar": "DIR"})
    preview: int = field(default=0, metadata={"help": "write an HTML page of the first N queries' top-10 (needs --data)", "metavar": "N"})
    resend: str = field(default="", metadata={"help": "POST an earlier saved body as it is (skips --run)", "metavar": "FILE"})
    dry_run: bool = field(default=False, metadata={"help": "validate and write the body, do not POST"})
    timeout_s: float = field(default=30.0, metadata={"help": "seconds to wait for each answer"})
    retries: int = field(default=3, metadata={"help": "extra attempts after connection errors or 5xx"})
    backoff_s: float = field(default=1.0, metadata={"help": "first wait between attempts; doubles each time"})
    verbose: bool = field(default=False, metadata={"help": "debug logging"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, Config)
    return parser


def check_against_data(data: Path, query_names: list[str], gallery_names: list[str]) -> None:
    """The run's names must be exactly the files in DATA/test/{query,gallery}."""
    layout = load_layout(data)
    for what, names, paths in (("query", query_names, layout.query), ("gallery", gallery_names, layout.gallery)):
        on_disk = {p.name for p in paths}
        if set(names) != on_disk:
            missing, extra = sorted(on_disk - set(names))[:3], sorted(set(names) - on_disk)[:3]
            raise KitError(
                f"{data / 'test' / what}: the run's {what} names differ from the folder "
                f"(not in run: {missing}, not on disk: {extra}); re-run the model on this data"
            )


def write_preview(path: Path, lists: dict[str, list[str]], data: Path, n: int) -> Path:
    """An HTML page: each query photo followed by its top-10 gallery images."""
    q_dir, g_dir = (data / "test" / "query").resolve(), (data / "test" / "gallery").resolve()
    truth = load_layout(data).ground_truth or {}
    rows = []
    for q, names in list(lists.items())[:n]:
        right = set(truth.get(q, []))
        cells = "".join(
            f'<td class="{"hit" if g in right else ""}"><img src="{html.escape((g_dir / g).as_uri())}"><br>{i + 1}. {html.escape(g)}</td>'
            for i, g in enumerate(names)
        )
        rows.append(f'<tr><th><img src="{html.escape((q_dir / q).as_uri())}"><br>{html.escape(q)}</th>{cells}</tr>')
    page = (
        "<!doctype html><meta charset=utf-8><title>top-10 preview</title><style>"
        "img{height:96px}td,th{font:11px sans-serif;padding:3px;text-align:center}"
        "th{background:#eef}.hit{background:#9e9}</style>"
        f"<p>First {len(rows)} queries; green = correct (when the data has a ground truth).</p>"
        f"<table>{''.join(rows)}</table>"
    )
    return atomic_write_bytes(path, page.encode())


def main(argv: Sequence[str] | None = None) -> int:
    cfg = config_from_args(Config, build_parser().parse_args(argv))
    setup_logging(cfg.verbose)
    url = cfg.url or os.environ.get("COMPETITION_URL", "")
    group = cfg.group or os.environ.get("COMPETITION_GROUP", "")

    if cfg.resend:
        body_path = Path(cfg.resend)
        try:
            body = json.loads(body_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise KitError(f"{body_path}: cannot read a saved body ({err})") from None
    else:
        topk_form = is_topk_run(cfg.run)  # the top-k run form (large galleries): lists from its stored candidates
        test = load_topk_split(cfg.run, "test", with_embeddings=False) if topk_form else load_run(cfg.run, splits=("test",)).splits["test"]
        if cfg.data:
            check_against_data(Path(cfg.data), test.query_names, test.gallery_names)
        lists = topk_lists(test) if topk_form else top_lists(test)
        validate_lists(lists, test.query_names, test.gallery_names)
        body = make_body(lists, group, cfg.format)
        body_path = save_body(body, cfg.out)
        log.info("wrote %s (%d queries, %s form)", body_path, len(lists), cfg.format)
        if cfg.preview:
            if not cfg.data:
                raise KitError("--preview needs --data DIR to find the images")
            page = write_preview(body_path.with_suffix(".html"), lists, Path(cfg.data), cfg.preview)
            log.info("top-10 preview: %s", page)

    if cfg.dry_run:
        console.print(f"dry run: body at {body_path}, nothing sent")
        return 0
    if not url:
        raise KitError("no server URL: pass --url URL or set COMPETITION_URL (or use --dry-run)")
    try:
        reply = post(url, body, cfg.timeout_s, cfg.retries, cfg.backoff_s)
    except NotSubmitted as err:
        log.error("NOT SUBMITTED: %s; the body is saved at %s (send it with --resend %s)", err, body_path, body_path)
        return NOT_SUBMITTED
    atomic_write_json(body_path.with_suffix(".response.json"), reply)
    table = Table(title="submitted")
    table.add_column("key")
    table.add_column("value", justify="right")
    table.add_row("body", str(body_path))
    table.add_row("server", url)
    for key, val in reply.items():
        table.add_row(str(key), f"{val:.4f}" if isinstance(val, float) else str(val))
    console.print(table)
    if "accuracy" in reply:
        console.print(f"[bold green]score: {reply['accuracy']}[/]")
    return 0


if __name__ == "__main__":
    run_cli(main)
