"""Run a script as ``__main__`` under torchrun; ranks other than 0 record every write under a folder.

    torchrun --nproc_per_node=2 tests/helpers/rank_writes.py WATCHED_DIR LOG.json SCRIPT.py [ARGS...]

Rank > 0 installs an audit hook (:func:`sys.addaudithook`) that records each file opened for
writing, renamed, removed or made under WATCHED_DIR, and writes the list to LOG.json (outside
WATCHED_DIR) when the process exits; rank 0 runs the script unwatched. With RANK_READS_UNDER=DIR
in the environment it also records each file under DIR it opens for reading, in LOG.reads.json (which
images rank 1 embedded, say).
"""

import atexit
import json
import os
import runpy
import sys
from pathlib import Path

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _watch(root: Path, log: Path, reads_root: Path | None) -> None:
    seen: list[str] = []
    reads: list[str] = []

    def under(path, folder: Path | None = root) -> bool:
        try:
            return folder is not None and Path(os.fsdecode(path)).resolve().is_relative_to(folder)
        except (TypeError, ValueError, OSError):
            return False

    def hook(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1] or "", args[2] or 0
            writes = any(c in mode for c in "wax+") or flags & WRITE_FLAGS
            if writes and under(args[0]):
                seen.append(f"open {args[0]} {mode or flags}")
            elif not writes and under(args[0], reads_root):
                reads.append(os.fsdecode(args[0]))
        elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree") and under(args[0]):
            seen.append(f"{event} {args[0]}")

    sys.addaudithook(hook)
    atexit.register(lambda: log.write_text(json.dumps(seen)))
    if reads_root is not None:
        atexit.register(lambda: log.with_suffix(".reads.json").write_text(json.dumps(reads)))


if __name__ == "__main__":
    watched, log, script, *args = sys.argv[1:]
    if os.environ.get("RANK", "0") != "0":
        reads_under = os.environ.get("RANK_READS_UNDER")
        _watch(Path(watched).resolve(), Path(log), Path(reads_under).resolve() if reads_under else None)
    sys.path.insert(0, str(Path(script).resolve().parent))
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")
