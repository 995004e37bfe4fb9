"""Put every default weight file into one local folder before the day, and say which are there.

    python -m utils.weights fetch                          # all defaults into weights/ (or $KIT_WEIGHTS_DIR)
    python -m utils.weights fetch --dir /data/weights --only facenet/vggface2 open_clip/ViT-B-32/openai
    python -m utils.weights fetch --redo                   # download again even what is present
    python -m utils.weights list [--verify]                # a table of the defaults: present or not

Entry names are those ``list`` prints. ``fetch`` is resumable: run it again
after an interruption. Exit codes: 0 done (``list``: every default present),
1 ``list`` with defaults missing, 2 a user error or failed download (one line).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

from utils.errors import KitError, run_cli
from utils.logs import console, setup_logging
from utils.paths import user_path
from utils.weights.catalog import default_specs
from utils.weights.download import fetch_spec
from utils.weights.report import default_status, status_table
from utils.weights.store import ENV_DIR, weights_dir

log = logging.getLogger("utils.weights")
COMMANDS = ("fetch", "list", "status")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m utils.weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS, help="fetch: download the defaults; list/status: show which are present")
    parser.add_argument("--dir", type=user_path, default=None, metavar="DIR",
                        help=f"the weights folder (default: ${ENV_DIR}, else weights/ in the repository)")
    parser.add_argument("--only", nargs="+", default=[], metavar="NAME", help="fetch only these entries (names as list prints them) (default: every default entry)")
    parser.add_argument("--redo", action="store_true", help="download again files that are present (default: False)")
    parser.add_argument("--verify", action="store_true", help="list: also check each file's sha256 against the manifest (default: False)")
    parser.add_argument("--verbose", action="store_true", help="debug logging (default: False)")
    return parser


def fetch(root: Path, only: Sequence[str], redo: bool) -> int:
    specs = default_specs()
    unknown = sorted(set(only) - {s.name for s in specs})
    if unknown:
        raise KitError(f"--only {unknown[0]}: not a default weight entry; choose from {[s.name for s in specs]}")
    for spec in specs:
        if only and spec.name not in only:
            continue
        console.print(f"fetching {spec.name} ({spec.used_by})")
        entry = fetch_spec(spec, root, redo=redo)
        mb = sum(f["size"] for f in entry["files"]) / 1e6
        console.print(f"  {len(entry['files'])} file(s), {mb:,.1f} MB -> {root / spec.name}")
    console.print(f"manifest: {root / 'manifest.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    root = args.dir or weights_dir()
    if args.command == "fetch":
        return fetch(root, args.only, args.redo)
    elif args.command in ("list", "status"):
        rows = default_status(root, verify=args.verify)
        console.print(status_table(rows, root))
        missing = sum(bool(problem) for _, problem, _ in rows)
        console.print(f"{len(rows) - missing} of {len(rows)} default weights present")
        return 1 if missing else 0
    else:
        raise KitError(f"command {args.command!r}: choose from {list(COMMANDS)}")


if __name__ == "__main__":
    run_cli(main)
