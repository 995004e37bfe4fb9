"""One writer per run folder: a lock file that names its holder.

A script that writes ``runs/<name>/`` (a model script, the training loop,
``ensemble.py``) first takes ``runs/<name>/.run.lock``: a JSON line with the
holder's pid, host, process start time and command. A second writer finds it
and stops with one line naming the holder. A lock whose process is gone
(killed, crashed; on this host the pid is not running, or now belongs to a
process that started later) is taken over. The lock is released when the run
is written (:func:`release_run_lock`) and, failing that, when the process
exits; a process killed outright leaves it behind for the next writer to take
over.

Taking a lock is re-entrant within one process: the scripts take it where they
begin (``invalidate_run``) and the training loop takes it again at no cost.

Example:
    >>> with run_lock("runs/ensemble"):
    ...     save_run("runs/ensemble", splits, meta)
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from utils.errors import KitError

log = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"
_HELD: set[Path] = set()  # lock files this process holds


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' where /proc cannot tell)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name may hold spaces


def _alive(holder: dict) -> bool:
    """Whether the holder (on this host) still runs: its pid exists and started when the lock says."""
    try:
        pid = int(holder["pid"])
        os.kill(pid, 0)
    except (KeyError, TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass  # another user's process: it exists
    started = holder.get("started", "")
    return not started or not _start_time(pid) or _start_time(pid) == started


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('command', '?')}, since {holder.get('since', '?')})"


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid()),
            "command": " ".join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]])[:300],
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _read(lock: Path) -> dict | None:
    """The holder recorded in ``lock``; None when there is no lock file."""
    try:
        holder = json.loads(lock.read_text() or "{}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _create(lock: Path) -> bool:
    """Create ``lock`` holding this process's record, complete or not at all; False if it exists."""
    tmp = lock.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_me()) + "\n")
    try:
        os.link(tmp, lock)  # atomic: fails when a lock exists, never shows a half-written one
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _take_over(lock: Path, holder: dict) -> None:
    """Move a dead holder's lock aside (only that one: a lock that changed meanwhile is put back)."""
    aside = lock.with_name(f"{LOCK_NAME}.stale.{os.getpid()}.tmp")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return  # another writer took it over first; the next round sees theirs
    moved = _read(aside)
    if moved != holder and moved:
        os.rename(aside, lock)  # a live writer's new lock: put it back
        return
    log.warning("took over %s, left by %s, which is no longer running", lock, _describe(holder))
    aside.unlink(missing_ok=True)


def acquire_run_lock(run_dir: str | Path) -> bool:
    """Take the lock of ``run_dir`` for this process (creating the folder).

    Returns:
        True when newly taken, False when this process already held it.

    Raises:
        KitError: another live process holds it (the message names it).
    """
    run_dir = Path(run_dir)
    lock = (run_dir / LOCK_NAME).absolute()
    if lock in _HELD:
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(10):
        if _create(lock):
            _HELD.add(lock)
            return True
        holder = _read(lock)
        if holder is None:
            continue  # released meanwhile
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            _HELD.add(lock)  # this process's own lock from an earlier call
            return True
        if holder.get("host") == socket.gethostname() and not _alive(holder):
            _take_over(lock, holder)
            continue
        if not holder:
            raise KitError(f"{lock}: unreadable lock file; if no other script writes {run_dir}, delete it")
        raise KitError(f"{run_dir}: in use by {_describe(holder)}; wait for it to finish, or write another folder "
                       f"(if that process is gone, delete {lock})")
    raise KitError(f"{lock}: could not take the lock; other writers keep taking it; try again")


def lock_holder(run_dir: str | Path) -> str:
    """Which other process is writing ``run_dir`` now ('' when no other live process holds its lock)."""
    holder = _read(Path(run_dir) / LOCK_NAME)
    here = holder and holder.get("host") == socket.gethostname()
    if not holder or (here and (holder.get("pid") == os.getpid() or not _alive(holder))):
        return ""
    return _describe(holder)


def release_run_lock(run_dir: str | Path) -> None:
    """Remove this process's lock on ``run_dir`` (nothing if it holds none)."""
    lock = (Path(run_dir) / LOCK_NAME).absolute()
    if lock not in _HELD:
        return
    _HELD.discard(lock)
    holder = _read(lock)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold the lock of ``run_dir`` for the block (a lock this process already held stays held)."""
    newly = acquire_run_lock(run_dir)
    try:
        yield
    finally:
        if newly:
            release_run_lock(run_dir)


@atexit.register
def _release_all() -> None:
    for lock in list(_HELD):
        release_run_lock(lock.parent)
