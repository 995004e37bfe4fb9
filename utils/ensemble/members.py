"""Which runs an ensemble fuses, where it may write, and what it must not lose.

- Members: the runs named with ``--models``, or every run folder under the runs
  folder. Fused runs (ensemble outputs, ``"fused": true`` in meta.json) are
  never members. Runs of the two forms (full matrices and top-k) are not fused
  together: a mix is refused in one line naming a run of each form.
- Output: ``--out`` may not be a member, nor any model's run folder; a re-run
  clears the folder's earlier artefacts (``simplex.png``, ``visual/``, the
  other form's files, ...).
- Shrinking: when a run that the current ensemble in ``--out`` used is now
  missing or incomplete, the ensemble is not replaced unless ``--allow-missing``
  says so; the last line of every ensemble names the runs it left out.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from utils.errors import KitError
from utils.runs.provenance import is_fused, read_json
from utils.runs.run_lock import lock_holder
from utils.runs.similarity_io import MARKER, run_folders

log = logging.getLogger(__name__)

# what ensemble.py, visualize.py and the two run forms write into an ensemble's folder
ARTEFACTS = ("simplex.png", "weights.json", "report.md", "val_sim.npy", "test_sim.npy", "visual")
ARTEFACT_GLOBS = ("*_topk_idx.npy", "*_topk_scores.npy", "*_emb.npy")
MODEL_RUN_FILES = ("best.pt", "last.pt")


@dataclass
class Members:
    """The run folders of one form to fuse, and the folders left out with why."""

    form: str  # "matrix" or "topk"
    dirs: list[Path]
    left_out: list[tuple[Path, str]] = field(default_factory=list)


def _form(meta: dict) -> str:
    return "topk" if meta.get("form") == "topk" else "matrix"


def _same(a: Path, b: Path) -> bool:
    return a.absolute().resolve() == b.absolute().resolve()


def select_members(runs_dir: Path, models: Sequence[str], out_dir: Path) -> Members:
    """The members' folders and their form (see the module doc); folders without meta.json are left out.

    Raises:
        KitError: no runs folder; a named run missing, fused, or the output; runs of both forms.
    """
    if not runs_dir.is_dir():
        raise KitError(f"{runs_dir}: runs folder not found; run a model script first or pass --runs DIR")
    if models:
        dirs = [runs_dir / m for m in models]
        for d in dirs:
            if not d.is_dir():
                raise KitError(f"--models {d.name}: {d} not found; available: {sorted(p.name for p in runs_dir.iterdir() if p.is_dir())}")
    else:
        dirs = run_folders(runs_dir, exclude=(out_dir, runs_dir / "ensemble"))
    by_form: dict[str, list[Path]] = {"matrix": [], "topk": []}
    left_out = []
    for d in dirs:
        meta = read_json(d / MARKER)
        if _same(d, out_dir):
            raise KitError(f"--out {out_dir}: is the member run {d.name}; the ensemble would overwrite it; choose another --out")
        if meta is not None and is_fused(meta):
            if models:
                raise KitError(f"--models {d.name}: {d} is a fused run (ensemble.py output); fused runs are never fused again")
            log.info("not a member: %s is a fused run (ensemble.py output)", d)
        elif meta is None and not models:
            holder = lock_holder(d)
            left_out.append((d, f"still being written by {holder}" if holder else
                             f"{d / MARKER} not found; the run is incomplete (killed, failed or still running)"))
        else:
            by_form[_form(meta or {})].append(d)
    if by_form["matrix"] and by_form["topk"]:
        m, t = by_form["matrix"][0], by_form["topk"][0]
        raise KitError(f"{t}: is in the top-k form and {m} in the matrix form; runs of the two forms are not fused together: "
                       f"re-run the models with the same --matrix-limit, or choose runs of one form with --models")
    form = "topk" if by_form["topk"] else "matrix"
    return Members(form, by_form[form], left_out)


def check_out(out_dir: Path, runs_dir: Path) -> None:
    """Refuse an output folder that holds a model's run (its matrices or checkpoints would be replaced) or the runs.

    Raises:
        KitError: ``out_dir`` holds a model run's meta.json or checkpoints, or is (or holds) the runs folder.
    """
    if runs_dir.absolute().resolve().is_relative_to(out_dir.absolute().resolve()):
        raise KitError(f"--out {out_dir}: holds the runs folder {runs_dir}; choose a folder of its own (e.g. {runs_dir / 'ensemble'})")
    meta = read_json(out_dir / MARKER)
    if (meta is not None and not is_fused(meta)) or any((out_dir / f).exists() for f in MODEL_RUN_FILES):
        raise KitError(f"--out {out_dir}: holds a model's run, which the ensemble would overwrite; choose another --out "
                       f"(e.g. {out_dir.parent / 'ensemble'})")


def check_not_shrinking(out_dir: Path, member_names: Sequence[str], left_out: list[tuple[Path, str]], runs_dir: Path) -> None:
    """Refuse to replace the ensemble in ``out_dir`` by one without a run it used that is now missing or incomplete.

    Raises:
        KitError: such a run exists (pass ``--allow-missing`` to proceed).
    """
    previous = read_json(out_dir / MARKER)
    if previous is None or not is_fused(previous):
        return
    why = {d.name: reason for d, reason in left_out}
    for m in previous.get("members") or []:
        name = m.get("name") if isinstance(m, dict) else Path(str(m)).name
        if name in member_names:
            continue
        reason = why.get(name) or ("not found" if not (runs_dir / str(name)).is_dir() else "not among the runs to fuse")
        raise KitError(f"{runs_dir / str(name)}: used by the current ensemble in {out_dir} but now left out ({reason}); "
                       f"re-run it, or pass --allow-missing to replace the ensemble without it")


def clear_artefacts(out_dir: Path) -> None:
    """Remove what an earlier ensemble (or visualize.py) left in ``out_dir``; other files stay."""
    if not out_dir.is_dir():
        return
    paths = [out_dir / n for n in ARTEFACTS] + [p for g in ARTEFACT_GLOBS for p in out_dir.glob(g)]
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        log.info("removed %s of the earlier ensemble", p)


def left_out_line(left_out: list[tuple[Path, str]]) -> str:
    """The ensemble's last line: the runs it left out (or that none were)."""
    if not left_out:
        return "left out: none"
    return "left out: " + ", ".join(f"{d.name} ({why.split(';')[0]})" for d, why in left_out)


def recorded_data(metas: Sequence[dict]) -> Path | None:
    """The data folder the members were made from (``config.data`` in their meta.json), for when ``--data`` is not given.

    One line says which folder is used, or why none is (the runs disagree, none records one, or it is gone).
    """
    folders = sorted({str((m.get("config") or {}).get("data")) for m in metas if (m.get("config") or {}).get("data")})
    if len(folders) != 1:
        log.info("--data not given and the runs record %s: test scores are not printed (pass --data DIR)",
                 f"{len(folders)} data folders ({', '.join(folders)})" if folders else "no data folder")
        return None
    data = Path(folders[0])
    if not data.is_dir():
        log.info("--data not given and %s (recorded in the runs' meta.json) is not a folder here: test scores are not printed", data)
        return None
    log.info("--data not given: using %s, the data folder recorded in the runs' meta.json", data)
    return data
