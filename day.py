"""The day in one command: preflight, the model runs, the adapter, the ensemble, a look at the
worst queries, the dry run (and, with --submit, the submission), then runs/report.html.

    # the rehearsal data with the default recipe (recipes/rehearsal.toml), up to the dry run:
    python day.py --data DATA --runs runs
    # competition day: the recipe that pins each script's flags, the server and the team
    python day.py --data DATA --runs runs --recipe recipes/competition.toml --url http://HOST:PORT/ --group TEAM
    # only some of the recipe's models; then submit once
    python day.py --data DATA --runs runs --models resnet dlib --url http://HOST:PORT/ --group TEAM --submit

Each stage calls a script's main() (preflight.py, the model scripts, train_face_adapter.py,
ensemble.py --auto, visualize.py --worst, submit.py --dry-run); day.py adds no model logic.
Preflight runs first and a blocker stops the day. A model whose weights are not at hand is
skipped with one line. Run it again and it resumes: a stage whose inputs (its flags, the data's
fingerprint, the runs it reads) are unchanged and whose output is still intact is reused; a
stage whose output is missing or whose inputs changed runs again, and so does what depends on it.
Stamps live in RUNS/day.json, one progress line per stage goes to the terminal and RUNS/day.log,
and a table at the end says what ran, what was reused or skipped, and why.

Exit codes: 0 the day reached its end (the dry run, or the submission); 1 preflight found a
blocker or a stage failed; 2 bad flags or recipe; 130 interrupted (SIGINT/SIGTERM: run it again).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import signal
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from rich.table import Table

from utils.atomic import atomic_write_json
from utils.config import add_config_args, check_run_name, config_from_args
from utils.data.layout import read_user_text
from utils.errors import KitError, Terminated, run_cli
from utils.logs import console, setup_logging
from utils.runs import ledger
from utils.runs.report import write_report
from utils.runs.run_checks import WEIGHT_SUFFIXES
from utils.weights.resolve import FETCH_HINT, resolve_weights

try:  # Python 3.11+; on 3.10 the tomli package reads the same TOML
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

log = logging.getLogger("day")

ROOT = Path(__file__).resolve().parent
DEFAULT_RECIPE = ROOT / "recipes" / "rehearsal.toml"
MODEL_SCRIPTS = ("train_resnet.py", "train_clip_arcface.py", "infer_facenet.py", "infer_cnn_features.py",
                 "infer_clip_colour.py", "infer_caption_match.py")
ADAPTER_SCRIPTS = ("train_face_adapter.py",)
RECIPE_SECTIONS = ("models", "adapters", "ensemble", "visualize", "submit")
SET_BY_DAY = ("data", "runs", "run_name", "out", "run", "dry_run", "url", "models")  # flags day.py passes itself
STATE_NAME, LOG_NAME = "day.json", "day.log"


# ----------------------------------------------------------------------------
# defaults: every field is a --flag (kebab-case)
@dataclass
class Config:
    data: Path = field(default=Path("data"), metadata={"help": "competition data folder", "metavar": "DIR"})
    runs: Path = field(default=Path("runs"), metadata={"help": "runs folder (day.json, day.log and report.html go there too)", "metavar": "DIR"})
    url: str = field(default="", metadata={"help": "server URL (default: $COMPETITION_URL); preflight GETs it, --submit POSTs to it"})
    group: str = field(default="", metadata={"help": "team name (default: the recipe's [submit] group, then $COMPETITION_GROUP)", "metavar": "NAME"})
    models: list[str] = field(default_factory=list, metadata={"help": "recipe models to run (default: all of [models])", "metavar": "NAME"})
    recipe: Path = field(default=DEFAULT_RECIPE, metadata={"help": "TOML file pinning each script's flags", "metavar": "FILE"})
    out: Path = field(default=Path("submissions"), metadata={"help": "submit.py's folder: bodies, replies, ledger.jsonl", "metavar": "DIR"})
    submit: bool = field(default=False, metadata={"help": "after the dry run, submit once (default: stop at the dry run)"})
    verbose: bool = field(default=False, metadata={"help": "debug logging"})
# ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, Config)
    return parser


# --- the recipe ---------------------------------------------------------------
@dataclass
class Step:
    """One script call of the recipe: ``name`` is its run folder under --runs."""

    name: str
    script: str
    flags: dict[str, Any]


@dataclass
class Recipe:
    path: Path
    models: list[Step]
    adapters: list[Step]
    sections: dict[str, dict[str, Any]]  # ensemble, visualize, submit: plain flags


def to_argv(flags: dict[str, Any], where: str) -> list[str]:
    """``{"img_size": 64, "amp": False, "tta": ["flip"]}`` -> ``--img-size 64 --no-amp --tta flip``."""
    argv: list[str] = []
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        elif isinstance(value, (int, float, str)):
            argv += [flag, str(value)]
        else:
            raise KitError(f"{where}: {key} = {value!r}: a flag's value is a string, number, boolean or list")
    return argv


def _steps(path: Path, raw: dict[str, Any], section: str, scripts: tuple[str, ...]) -> list[Step]:
    steps = []
    for name, table in raw.get(section, {}).items():
        where = f"{path}: [{section}.{name}]"
        if not isinstance(table, dict) or table.get("script") not in scripts:
            raise KitError(f"{where}: needs script = one of {list(scripts)}")
        try:
            check_run_name(name)
        except KitError as err:  # NAME is the run folder: the script would refuse it only when its stage starts
            raise KitError(f"{where}: NAME is the run's folder under --runs; {err}") from None
        flags = {k: v for k, v in table.items() if k != "script"}
        if bad := [k for k in flags if k in SET_BY_DAY]:
            raise KitError(f"{where}: {bad} are set by day.py; remove them")
        if section == "adapters" and not isinstance(flags.get("source"), str):
            raise KitError(f"{where}: needs source = the face run it adapts (e.g. \"dlib\")")
        steps.append(Step(name, table["script"], flags))
    return steps


def load_recipe(path: Path, only: list[str]) -> Recipe:
    """Read and check the recipe; ``only`` keeps those models (and the adapters whose source is kept)."""
    try:
        raw = tomllib.loads(read_user_text(path))
    except OSError as err:
        raise KitError(f"{path}: cannot read the recipe ({err.strerror})") from None
    except tomllib.TOMLDecodeError as err:
        raise KitError(f"{path}: not valid TOML ({err})") from None
    if unknown := sorted(set(raw) - set(RECIPE_SECTIONS)):
        raise KitError(f"{path}: unknown section(s) {unknown}; known: {list(RECIPE_SECTIONS)}")
    if not_tables := [k for k, v in raw.items() if not isinstance(v, dict)]:
        raise KitError(f"{path}: {not_tables[0]} = {raw[not_tables[0]]!r} must be a table ([{not_tables[0]}] or "
                       f"[{not_tables[0]}.NAME] headers with key = value lines under them)")
    models, adapters = _steps(path, raw, "models", MODEL_SCRIPTS), _steps(path, raw, "adapters", ADAPTER_SCRIPTS)
    names = [s.name for s in models + adapters]
    if not names:
        raise KitError(f"{path}: no [models.NAME] table, so the day has nothing to run; add one "
                       "(recipes/rehearsal.toml shows how)")
    if len(set(names)) != len(names) or "ensemble" in names:
        raise KitError(f"{path}: run names must be unique and not 'ensemble': {names}")
    script_of = {s.name: s.script for s in models}
    for a in adapters:  # else it fails only after the models trained ('not a face run'); an absent source is skipped
        if script_of.get(a.flags["source"], "infer_facenet.py") != "infer_facenet.py":
            raise KitError(f"{path}: [adapters.{a.name}]: source = {a.flags['source']!r} runs "
                           f"{script_of[a.flags['source']]}; an adapter adapts a face run (script = \"infer_facenet.py\")")
    if missing := [m for m in only if m not in {s.name for s in models}]:
        raise KitError(f"--models {missing}: not in {path}; its models: {[s.name for s in models]}")
    if only:
        models = [s for s in models if s.name in only]
    sections = {k: raw.get(k, {}) for k in ("ensemble", "visualize", "submit")}
    for key, table in sections.items():
        if bad := [k for k in table if k in SET_BY_DAY]:
            raise KitError(f"{path}: [{key}]: {bad} are set by day.py; remove them")
    return Recipe(path, models, adapters, sections)


def check_flags(recipe: Recipe, argv_of: Callable[[Step], list[str]]) -> None:
    """Every script's parser accepts its recipe flags, before any long work starts."""
    for step in recipe.models + recipe.adapters:
        parser = importlib.import_module(Path(step.script).stem).build_parser()
        try:
            parser.parse_args(argv_of(step))
        except SystemExit:  # argparse printed why on stderr
            raise KitError(f"{recipe.path}: [{step.name}]: {step.script} rejects these flags (see above)") from None


# --- runnability: the one place that decides whether a model's weights are at hand -------------
def _offline() -> bool:
    return any(os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "TIMM_OFFLINE"))


# the kind of backbone each script's --weights names (utils.weights.resolve_weights)
WEIGHT_KINDS = {
    "train_resnet.py": "timm", "infer_cnn_features.py": "timm",
    "train_clip_arcface.py": "open_clip", "infer_clip_colour.py": "open_clip", "infer_caption_match.py": "open_clip",
}


def _weights_kind(step: Step) -> tuple[str, str]:
    """(kind, model) of the step's backbone; kind '' where the script loads no pretrained backbone by tag."""
    if step.script == "infer_facenet.py":
        embedder = step.flags.get("embedder", _script_default(step, "embedder"))
        return ("facenet", "") if embedder == "facenet" else ("", "")
    kind = WEIGHT_KINDS.get(step.script, "")
    return (kind, str(step.flags.get("model", _script_default(step, "model")))) if kind else ("", "")


def _script_default(step: Step, dest: str) -> Any:
    return importlib.import_module(Path(step.script).stem).build_parser().get_default(dest)


def weights_missing(step: Step) -> str:
    """'' when the step's backbone weights are at hand, else one line saying why not.

    ``none`` (random init) and an existing file are at hand; a path that is not a file is not;
    a tag is at hand when the weights folder holds it (``python -m utils.weights fetch``) or the
    hub can be reached; dlib's weights ship with face-recognition-models.
    """
    value = str(step.flags.get("weights", "default"))
    if value == "none" or Path(value).is_file():
        return ""
    if "/" in value or "\\" in value or value.lower().endswith(WEIGHT_SUFFIXES):
        return f"weights file {value} not found"
    kind, model = _weights_kind(step)
    if not kind:
        if step.flags.get("embedder", _script_default(step, "embedder") if step.script == "infer_facenet.py" else "") == "dlib":
            return "" if importlib.util.find_spec("face_recognition_models") else "dlib weights: face-recognition-models is not installed"
    elif resolve_weights(kind, model, value).mode == "folder":
        return ""
    if _offline():
        return (f"weights tag {value!r} is not in the weights folder and HF_HUB_OFFLINE/TIMM_OFFLINE is set: "
                f"run {FETCH_HINT} on a box with internet, pin a file (weights = PATH) or 'none'")
    return ""


# --- fingerprints and stamps ----------------------------------------------------------------
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def data_fingerprint(data: Path) -> str:
    """Every file's relative path, size and mtime under DATA (cheap; a changed image changes it)."""
    rows = []
    for p in sorted(data.rglob("*")):
        if p.is_file():
            st = p.stat()
            rows.append(f"{p.relative_to(data)}\t{st.st_size}\t{st.st_mtime_ns}")
    return _sha("\n".join(rows).encode())


def run_fingerprint(run_dir: Path) -> str | None:
    """sha256 of the run's meta.json when every file it lists is present with its sha256; else None."""
    try:
        raw = (run_dir / "meta.json").read_bytes()
        files = json.loads(raw).get("files", {})
        for name, record in files.items():
            if isinstance(record, dict) and "sha256" in record:
                if _sha((run_dir / name).read_bytes()) != record["sha256"]:
                    return None
    except (OSError, ValueError, AttributeError):
        return None
    return _sha(raw)


def file_fingerprint(path: Path) -> str | None:
    try:
        return _sha(path.read_bytes())
    except OSError:
        return None


@dataclass
class Outcome:
    """One row of the final table."""

    stage: str
    status: str  # ran, reused (unchanged), skipped (cannot run), stopped, failed, blocked
    seconds: float
    why: str


@dataclass
class Day:
    """The day's folders, stamps and log; stages report through :meth:`line`."""

    cfg: Config
    data_fp: str
    state: dict[str, Any]
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def state_path(self) -> Path:
        return self.cfg.runs / STATE_NAME

    def line(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        console.print(f"[bold cyan]day[/] {stamp} {text}", markup=True, highlight=False)
        with open(self.cfg.runs / LOG_NAME, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")
            f.flush()

    def record(self, stage: str, status: str, seconds: float, why: str) -> Outcome:
        outcome = Outcome(stage, status, seconds, why)
        self.outcomes.append(outcome)
        self.line(f"{stage:<16} {status:<8} {seconds:7.1f} s  {why}")
        return outcome

    def save_stamp(self, stage: str, key: str, output: str, seconds: float) -> None:
        self.state.setdefault("stages", {})[stage] = {"key": key, "output": output, "seconds": round(seconds, 2),
                                                       "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_json(self.state_path, self.state)


def _call(script: str, argv: list[str]) -> int:
    """A script's main(argv); a KitError or a bug becomes a non-zero code with its message logged."""
    try:
        return int(importlib.import_module(Path(script).stem).main(argv) or 0)
    except KitError as err:
        log.error("%s: error: %s", script, err)
        return 2
    except SystemExit as err:
        return int(err.code or 0) if isinstance(err.code, int) else 2
    except Exception:  # a bug in a script: keep its traceback in the log, let the other stages go on
        log.error("%s crashed:\n%s", script, traceback.format_exc())
        return 1


def run_stage(day: Day, stage: str, inputs: dict[str, Any], action: Callable[[], int],
              output: Callable[[], str | None]) -> tuple[Outcome, str | None]:
    """Skip the stage when its inputs and its output are as stamped; else run it and stamp it."""
    key = _sha(json.dumps(inputs, sort_keys=True, default=str).encode())
    before = day.state.get("stages", {}).get(stage)
    have = output()
    if before and before["key"] == key and have is not None and before["output"] == have:
        return day.record(stage, "reused", 0.0, f"unchanged since {before['finished']} (inputs and output as stamped)"), have
    if not before:
        why = "first run"
    elif have is None:
        why = "redone: its output is missing or incomplete"
    elif before["key"] != key:
        why = "redone: its inputs changed (flags, data or an upstream run)"
    else:
        why = "redone: its output changed since it was stamped"
    day.line(f"{stage:<16} started  ({why})")
    t0 = time.time()
    code = action()
    seconds = time.time() - t0
    have = output()
    if code != 0 or have is None:
        return day.record(stage, "failed", seconds, f"exit code {code}; see the lines above ({why})"), None
    day.save_stamp(stage, key, have, seconds)
    return day.record(stage, "ran", seconds, why), have


# --- the stages ---------------------------------------------------------------
def stage_preflight(day: Day) -> bool:
    cfg = day.cfg
    # runs are not checked here: a stale or missing run is what the day redoes (and submit.py refuses a stale ensemble)
    argv = ["--data", str(cfg.data), "--runs", str(cfg.runs), "--no-check-runs"] + (["--url", cfg.url, "--group", cfg.group] if cfg.url else [])
    t0 = time.time()
    code = _call("preflight.py", argv)
    if code == 0:
        day.record("preflight", "ran", time.time() - t0, "no blockers")
        return True
    day.record("preflight", "blocked", time.time() - t0, f"exit code {code}: fix the blockers listed above")
    return False


def stage_models(day: Day, recipe: Recipe, argv_of: Callable[[Step], list[str]]) -> dict[str, str]:
    """Each runnable model, then each adapter whose source run is done; their fingerprints by run name."""
    done: dict[str, str] = {}
    for step in recipe.models + recipe.adapters:
        source = step.flags.get("source") if step.script in ADAPTER_SCRIPTS else None
        why_not = weights_missing(step) if source is None else ("" if source in done else f"no finished face run {source!r}")
        if why_not:
            day.record(step.name, "skipped", 0.0, why_not)
            continue
        inputs = {"script": step.script, "argv": argv_of(step), "data": day.data_fp, "source": done.get(source or "")}
        _, fp = run_stage(day, step.name, inputs, lambda s=step: _call(s.script, argv_of(s)),
                          lambda s=step: run_fingerprint(day.cfg.runs / s.name))
        if fp is not None:
            done[step.name] = fp
    return done


def last_ledger_body(out: Path, outcome: str) -> str | None:
    """Fingerprint of the newest ledger entry with ``outcome`` whose body is still intact."""
    for entry in reversed(ledger.read(out)):
        if entry.record.get("outcome") == outcome:
            ok = file_fingerprint(Path(entry.body)) == entry.record.get("sha256")
            return f"{entry.number}:{entry.record.get('sha256')}" if ok else None
    return None


def downstream_argv(cfg: Config, recipe: Recipe, models: Sequence[str]) -> dict[str, list[str]]:
    """ensemble.py's, visualize.py's and submit.py's command lines (submit's without --dry-run or --url)."""
    sec, ens_dir = recipe.sections, cfg.runs / "ensemble"
    sub = {k: v for k, v in sec["submit"].items() if k != "group"}
    return {
        "ensemble.py": ["--runs", str(cfg.runs), "--data", str(cfg.data), "--models", *models]
        + to_argv({"auto": True, **sec["ensemble"]}, f"{recipe.path}: [ensemble]"),
        "visualize.py": ["--run", str(ens_dir), "--data", str(cfg.data)]
        + to_argv({"split": ["val"], "worst": True, "queries": 20, **sec["visualize"]}, f"{recipe.path}: [visualize]"),
        "submit.py": ["--run", str(ens_dir), "--data", str(cfg.data), "--out", str(cfg.out), "--group", cfg.group]
        + to_argv(sub, f"{recipe.path}: [submit]"),
    }


def check_downstream_flags(cfg: Config, recipe: Recipe) -> None:
    """The [ensemble], [visualize] and [submit] flags pass their script's parser before the models train."""
    for script, argv in downstream_argv(cfg, recipe, [s.name for s in recipe.models + recipe.adapters]).items():
        try:
            importlib.import_module(Path(script).stem).build_parser().parse_args(argv)
        except SystemExit:  # argparse printed why on stderr
            raise KitError(f"{recipe.path}: [{script.removesuffix('.py')}]: {script} rejects these flags (see above)") from None


def stage_downstream(day: Day, recipe: Recipe, runs_fp: dict[str, str]) -> bool:
    """ensemble --auto -> visualize --worst -> submit --dry-run (-> submit): False when one fails."""
    cfg, ens_dir = day.cfg, day.cfg.runs / "ensemble"
    argv = downstream_argv(cfg, recipe, list(runs_fp))
    ens_argv = argv["ensemble.py"]
    _, ens = run_stage(day, "ensemble", {"argv": ens_argv, "runs": runs_fp}, lambda: _call("ensemble.py", ens_argv),
                       lambda: run_fingerprint(ens_dir))
    if ens is None:
        return False
    vis_argv = argv["visualize.py"]
    _, vis = run_stage(day, "visualize", {"argv": vis_argv, "ensemble": ens}, lambda: _call("visualize.py", vis_argv),
                       lambda: file_fingerprint(ens_dir / "visual" / "val.html"))
    if vis is None:
        return False
    sub_argv = argv["submit.py"]
    _, dry = run_stage(day, "dry-run", {"argv": sub_argv, "ensemble": ens}, lambda: _call("submit.py", [*sub_argv, "--dry-run"]),
                       lambda: last_ledger_body(cfg.out, "dry-run"))
    if dry is None:
        return False
    if not cfg.submit:
        day.record("submit", "stopped", 0.0, "stopped at the dry run (pass --submit to submit once)")
        return True
    _, sent = run_stage(day, "submit", {"argv": sub_argv, "url": cfg.url, "ensemble": ens},
                        lambda: _call("submit.py", [*sub_argv, "--url", cfg.url]), lambda: last_ledger_body(cfg.out, "submitted"))
    return sent is not None


def stage_report(day: Day) -> None:
    """report.html from everything under --runs and the ledger (cheap: written every time)."""
    t0 = time.time()
    try:
        path = write_report(day.cfg.runs, day.cfg.out)
    except KitError as err:
        day.record("report", "failed", time.time() - t0, str(err))
        return
    day.record("report", "written", time.time() - t0, f"{path} (rewritten every time)")


def final_table(day: Day) -> Table:
    table = Table(title=f"the day: {day.cfg.runs} (log: {day.cfg.runs / LOG_NAME})")
    for col in ("stage", "status", "time (s)", "why"):
        table.add_column(col, justify="right" if col == "time (s)" else "left")
    colour = {"ran": "green", "reused": "dim", "skipped": "yellow", "stopped": "yellow", "failed": "red", "blocked": "red"}
    for o in day.outcomes:
        table.add_row(o.stage, f"[{colour.get(o.status, 'white')}]{o.status}[/]", f"{o.seconds:.1f}", o.why)
    return table


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(exit_code=130)  # named SIGTERM by run_cli; the day exits 130 after either signal


def resolve(cfg: Config, recipe: Recipe) -> None:
    """URL and team from the flags, the recipe, the environment; --submit needs both."""
    cfg.url = cfg.url or os.environ.get("COMPETITION_URL", "")
    cfg.group = cfg.group or str(recipe.sections["submit"].get("group", "")) or os.environ.get("COMPETITION_GROUP", "")
    if not cfg.group:
        raise KitError(f"no team name for the dry run: pass --group TEAM, set group in {recipe.path}'s [submit], or set $COMPETITION_GROUP")
    if cfg.submit and not cfg.url:
        raise KitError("--submit needs --url (or $COMPETITION_URL)")
    if not cfg.data.is_dir():
        raise KitError(f"{cfg.data}: data folder not found (pass --data DATA)")


def run_day(day: Day, recipe: Recipe, argv_of: Callable[[Step], list[str]]) -> int:
    if not stage_preflight(day):
        return 1
    runs_fp = stage_models(day, recipe, argv_of)
    if not runs_fp:
        day.record("ensemble", "stopped", 0.0, "no model run finished")
        return 1
    ok = stage_downstream(day, recipe, runs_fp)
    stage_report(day)
    return 0 if ok and all(o.status != "failed" for o in day.outcomes) else 1


def main(argv: Sequence[str] | None = None) -> int:
    cfg = config_from_args(Config, build_parser().parse_args(argv))
    setup_logging(cfg.verbose)
    recipe = load_recipe(cfg.recipe, cfg.models)

    def argv_of(step: Step) -> list[str]:
        return ["--data", str(cfg.data), "--runs", str(cfg.runs), "--run-name", step.name] + to_argv(step.flags, f"{recipe.path}: [{step.name}]")

    check_flags(recipe, argv_of)
    resolve(cfg, recipe)
    check_downstream_flags(cfg, recipe)
    cfg.runs.mkdir(parents=True, exist_ok=True)
    state_path = cfg.runs / STATE_NAME
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    state.update({"data": str(cfg.data), "submissions": str(cfg.out), "recipe": str(recipe.path)})
    day = Day(cfg, data_fingerprint(cfg.data), state)
    day.line(f"day started: data {cfg.data}, runs {cfg.runs}, recipe {recipe.path}")
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        code = run_day(day, recipe, argv_of)
    except KeyboardInterrupt as err:
        day.line(f"interrupted ({'SIGTERM' if isinstance(err, Terminated) else 'SIGINT'}): run the same command again to resume")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        console.print(final_table(day))
    day.line(f"day ended: exit code {code}")
    if cfg.submit and code == 0:
        print_score(cfg.out)
    return code


def print_score(out: Path) -> None:
    """The server's score of the newest submission, as the day's last line."""
    sent = [e for e in ledger.read(out) if e.record.get("outcome") == "submitted"]
    if sent:
        console.print(f"[bold green]score: {sent[-1].record.get('score')}[/] (ledger entry {sent[-1].number}, {sent[-1].record.get('url')})")


if __name__ == "__main__":
    run_cli(main)
