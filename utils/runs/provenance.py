"""What a fused run was made from: its members' file hashes, recorded and checked.

``ensemble.py`` writes a *fused run* (``"fused": true`` in ``meta.json``) whose
``members`` entries each hold the member's folder (relative to the fused run)
and the sha256 of every file its matrices came from: ``val_sim.npy`` and
``test_sim.npy`` in the matrix form, the per-split index, score and embedding
files in the top-k form. Loading a fused run (:func:`utils.runs.similarity_io.load_run`,
:func:`utils.runs.topk_run.load_topk_split`) calls :func:`check_members`, so
``ensemble.py``, ``submit.py`` and preflight refuse a fused run whose member
was re-run, changed, or removed since: its matrices no longer describe the runs
on disk.

Example:
    >>> meta["members"] = [member_record(out_dir, d, load_meta(d)) for d in member_dirs]
    >>> check_members(out_dir, meta)   # raises StaleEnsemble naming the member that changed
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from utils.errors import KitError
from utils.file_hash import file_sha256


class StaleEnsemble(KitError):
    """A fused run whose member changed, or is missing, since it was fused."""


def is_fused(meta: dict[str, Any]) -> bool:
    """Whether ``meta`` is a fused run's (ensemble.py output; older kits wrote ``"model": "ensemble"`` only)."""
    return meta.get("fused") is True or meta.get("model") == "ensemble"


def member_files(meta: dict[str, Any]) -> dict[str, str]:
    """``{file name: sha256}`` of the matrix files a run's meta.json records (either run form)."""
    if meta.get("form") == "topk":
        return {name: sha for entry in meta.get("splits", {}).values() for name, sha in entry.get("files", {}).items()}
    return {name: rec["sha256"] for name, rec in meta.get("files", {}).items() if isinstance(rec, dict) and "sha256" in rec}


def member_record(out_dir: str | Path, run_dir: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    """A ``members`` entry: name, folder relative to the fused run, model, metrics and file hashes."""
    return {"name": Path(run_dir).name, "path": str(run_dir), "dir": os.path.relpath(Path(run_dir).absolute(), Path(out_dir).absolute()),
            "model": meta.get("model", Path(run_dir).name), "metrics": meta.get("metrics", {}), "files": member_files(meta)}


def _member_problem(run_dir: Path, files: dict[str, str]) -> str:
    """'' when every recorded file of the member is on disk with its recorded hash; else what changed."""
    if not (run_dir / "meta.json").is_file():
        return f"{run_dir / 'meta.json'} is missing (the run was removed, or re-run and not finished)"
    for name, sha in sorted(files.items()):
        path = run_dir / name
        try:
            if file_sha256(path) != sha:
                return f"{path} changed (re-run or edited)"
        except FileNotFoundError:
            return f"{path} is missing"
        except OSError as err:
            return f"{path} cannot be read ({err.strerror})"
    return ""


def check_members(run_dir: str | Path, meta: dict[str, Any]) -> None:
    """Refuse a fused run whose members changed since it was fused (no-op for a model's own run).

    Raises:
        StaleEnsemble: a member is missing or a member's file differs from its recorded sha256,
            or the fused run records no hashes (an older kit wrote it).
    """
    if not is_fused(meta):
        return
    run_dir = Path(run_dir)
    members = meta.get("members")
    if not isinstance(members, list) or not members or not all(isinstance(m, dict) and m.get("files") for m in members):
        raise StaleEnsemble(f"{run_dir / 'meta.json'}: records no hashes of its members (an older kit wrote it), so it "
                            f"cannot be checked against them; re-run ensemble.py")
    for m in members:
        member_dir = Path(os.path.normpath(run_dir / m.get("dir", os.path.join("..", str(m.get("name"))))))
        problem = _member_problem(member_dir, m["files"])
        if problem:
            raise StaleEnsemble(f"{run_dir}: member {m.get('name')!r} changed since it was fused: {problem}; "
                                f"re-run ensemble.py")


def parse_json_file(path: Path) -> Any:
    """A run's JSON file (meta.json) parsed.

    Raises:
        KitError: not valid JSON, not UTF-8, or nested past the parser's depth (a file cut short or damaged).
        OSError: the file cannot be read.
    """
    try:
        return json.loads(path.read_bytes())
    except RecursionError:
        raise KitError(f"{path}: not valid JSON (nested too deep to read)") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise KitError(f"{path}: not valid JSON ({err})") from None


def read_json(path: Path) -> dict[str, Any] | None:
    """A meta.json as a dict; None when missing or not a JSON object."""
    try:
        obj = parse_json_file(path)
    except (OSError, KitError):
        return None
    return obj if isinstance(obj, dict) else None
