"""One self-contained HTML page of a runs folder: every run's scores, time, faces and origin; the
ensemble's weights, the options it compared and why it chose; the worst validation queries; the
submission ledger. Images are inlined (base64), so the file reads offline on its own.

    python -m utils.runs.report --runs runs                       # -> runs/report.html
    python -m utils.runs.report --runs runs --submissions subs    # the ledger of another folder

The worst queries are the panels ``visualize.py --worst`` drew into ``runs/ensemble/visual/``
(day.py draws them); the ledger is ``<submissions>/ledger.jsonl`` (default: the folder day.py
recorded in ``runs/day.json``, else ``submissions``). Every figure cell carries
``data-run``/``data-key`` attributes naming the meta.json value it shows.

Example:
    >>> write_report(Path("runs"))  # doctest: +SKIP
    PosixPath('runs/report.html')
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Sequence

from utils.atomic import atomic_write_bytes
from utils.errors import KitError, run_cli
from utils.paths import user_path
from utils.runs import ledger

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
MADE_FROM_KEYS = ("model", "weights", "embedder", "source", "img_size", "epochs", "loss", "detector")
STYLE = ("body{font:14px sans-serif;margin:20px;color:#111}table{border-collapse:collapse;margin:8px 0 18px}"
         "td,th{border:1px solid #bbb;padding:3px 7px;text-align:left}td.n{text-align:right}tr.chosen{background:#dfd}"
         "img{max-width:100%}.q{margin-bottom:12px}h2{margin-top:26px}.dim{color:#666}")


def _e(value: Any) -> str:
    return html.escape(str(value))


def fmt(value: Any) -> str:
    """A figure as the page shows it: floats with 2 decimals, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def cell(value: Any, run: str = "", key: str = "") -> str:
    """A table cell; with ``run``/``key`` it names the meta.json figure it shows (tests check them)."""
    attrs = f' data-run="{_e(run)}" data-key="{_e(key)}"' if key else ""
    cls = ' class="n"' if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
    return f"<td{cls}{attrs}>{_e(fmt(value))}</td>"


def table(headers: Sequence[str], rows: list[str]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def read_meta(run_dir: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((run_dir / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _dict(value: Any) -> dict[str, Any]:
    """``value`` when it is a JSON object, else {}: a meta.json from another kit or edited by hand is shown, not a traceback."""
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def total_seconds(meta: dict[str, Any]) -> float | None:
    """The run's time: ``timings_s.total``, else the sum of its timings."""
    t = _dict(meta.get("timings_s"))
    if _number(t.get("total")):
        return float(t["total"])
    values = [v for v in t.values() if _number(v)]
    return float(sum(values)) if values else None


def faces_text(meta: dict[str, Any]) -> str:
    """'query: 30/32 (mtcnn 28, hog 2); ...' from a face run's ``faces``; '' for other runs."""
    parts = []
    for name, f in _dict(meta.get("faces")).items():
        if isinstance(f, dict):
            stages = ", ".join(f"{k} {v}" for k, v in _dict(f.get("by_stage")).items())
            parts.append(f"{name}: {f.get('faces_found')}/{f.get('images')}" + (f" ({stages})" if stages else ""))
    return "; ".join(parts)


def made_from(meta: dict[str, Any]) -> str:
    config = _dict(meta.get("config"))
    if meta.get("members") and isinstance(meta["members"], list):
        items = ["members " + " + ".join(str(_dict(m).get("name")) for m in meta["members"])]
    else:
        items = [f"{k} {config[k]}" for k in MADE_FROM_KEYS if k in config]
    items.append(f"commit {meta.get('commit', '?')}")
    if meta.get("full_train"):
        items.append("full-train")
    return ", ".join(items)


def runs_section(runs_dir: Path) -> str:
    rows = []
    folders = sorted((p for p in runs_dir.iterdir() if p.is_dir()), key=lambda p: (p.name == "ensemble", p.name))
    for d in folders:
        meta = read_meta(d)
        if meta is None:
            continue
        metrics = _dict(meta.get("metrics"))
        val, test = _dict(metrics.get("val")), _dict(metrics.get("test"))
        rows.append(
            f"<tr><td>{_e(d.name)}</td><td>{_e(meta.get('model', '?'))}</td>"
            + cell(val.get("score"), d.name, "metrics.val.score") + cell(val.get("top1"), d.name, "metrics.val.top1")
            + cell(val.get("map_all"), d.name, "metrics.val.map_all") + cell(test.get("score"), d.name, "metrics.test.score")
            + cell(total_seconds(meta), d.name, "timings_s") + f"<td>{_e(faces_text(meta))}</td>"
            + f"<td>{_e(made_from(meta))}</td><td>{_e(meta.get('created', ''))}</td></tr>")
    if not rows:
        return "<p>No run folder with a meta.json yet.</p>"
    headers = ("run", "model", "val score", "val top-1", "val mAP", "test score", "time (s)", "faces found (per stage)", "made from", "created")
    return table(headers, rows)


def image_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def ensemble_section(runs_dir: Path) -> str:
    ens = runs_dir / "ensemble"
    meta = read_meta(ens)
    if meta is None or "choice" not in meta:
        return "<p>No ensemble yet (runs/ensemble/meta.json): run ensemble.py --auto.</p>"
    choice, config = _dict(meta["choice"]), _dict(meta.get("config"))
    if not all(isinstance(choice.get(k), list) for k in ("models", "weights")):
        return "<p>runs/ensemble/meta.json records no models and weights (another kit, or edited): run ensemble.py --auto.</p>"
    weights = [f"<tr><td>{_e(m)}</td>{cell(w, 'ensemble', f'choice.weights.{i}')}</tr>" for i, (m, w) in enumerate(zip(choice["models"], choice["weights"]))]
    options = []
    options_seen = choice.get("options") if isinstance(choice.get("options"), list) else []
    for i, o in enumerate(x for x in options_seen if isinstance(x, dict)):
        key = f"choice.options.{i}"
        options.append(f'<tr class="{"chosen" if o.get("chosen") else ""}"><td>{_e(o.get("label"))}</td><td>{_e(o.get("kind"))}</td>'
                       f"<td>{_e(o.get('weights'))}</td>" + cell(o.get("val_mean"), "ensemble", key + ".val_mean")
                       + cell(o.get("val_std"), "ensemble", key + ".val_std") + cell(o.get("val_score"), "ensemble", key + ".val_score")
                       + cell(o.get("test_score"), "ensemble", key + ".test_score") + f"<td>{'chosen' if o.get('chosen') else ''}</td></tr>")
    why = (f"Chosen: <b>{_e(choice.get('fusion'))}</b> fusion, re-ranking <b>{_e(choice.get('rerank_label'))}</b>, "
           f"validation bootstrap mean {_e(fmt(choice.get('val_bootstrap_mean')))} ± {_e(fmt(choice.get('val_bootstrap_std')))}. ")
    if choice.get("auto"):
        why += (f"With --auto, every fusion was searched and the one with the best validation bootstrap mean kept; a re-ranking "
                f"is kept only when it beats the fusion in at least {_e(config.get('min_win'))} of the "
                f"{_e(config.get('bootstrap'))} resamples of {'identities' if config.get('bootstrap_by') == 'identity' else 'queries'}. "
                "Test scores are shown, never used to choose.")
    else:
        why += "Without --auto, the fusion and re-ranking came from the flags; only the weights were searched."
    simplex = ens / "simplex.png"
    return (f"<p>{why}</p><h3>Weights</h3>{table(('run', 'weight'), weights)}<h3>Options compared</h3>"
            + table(("option", "kind", "weights", "val mean", "val std", "val", "test", ""), options)
            + (image_tag(simplex, "validation score over the weights") if simplex.is_file() else ""))


def worst_section(runs_dir: Path) -> str:
    """The panels visualize.py drew, in its page's order (worst first with --worst), inlined."""
    page = runs_dir / "ensemble" / "visual" / "val.html"
    if not page.is_file():
        return "<p>No panels yet: python visualize.py --run runs/ensemble --split val --worst.</p>"
    text = page.read_text()
    items = re.findall(r'<div class="q"><p><b>(.*?)</b> - (.*?)</p><a href="([^"]+)">', text)
    out = []
    for query, note, src in items:
        png = page.parent / html.unescape(src)
        if png.is_file():
            out.append(f'<div class="q"><p><b>{query}</b> - {note}</p>{image_tag(png, html.unescape(query))}</div>')
    intro = re.search(r"</h1><p>(.*?)</p>", text)
    return (f"<p>{intro.group(1) if intro else ''}</p>" if intro else "") + "".join(out)


def ledger_section(submissions: Path) -> str:
    entries = ledger.read(submissions)
    if not entries:
        return f"<p>No attempts in {_e(submissions / ledger.LEDGER_NAME)} yet.</p>"
    rows = []
    for e in entries:
        r = e.record
        rows.append(f"<tr>{cell(e.number)}<td>{_e(r.get('time', ''))}</td><td>{_e(r.get('outcome', ''))}</td>"
                    + cell(r.get("score"), f"ledger:{e.number}", "score")
                    + f"<td>{_e(r.get('group', ''))}</td><td>{_e(r.get('url', ''))}</td><td>{_e(Path(e.body).name)}</td></tr>")
    return table(("#", "time (UTC)", "outcome", "score", "group", "url", "body"), rows)


def default_submissions(runs_dir: Path) -> Path:
    """The submissions folder day.py recorded in runs/day.json, else ``submissions``."""
    try:
        return Path(json.loads((runs_dir / "day.json").read_text())["submissions"])
    except (OSError, ValueError, KeyError, TypeError):
        return Path("submissions")


def write_report(runs_dir: str | Path, submissions: str | Path | None = None) -> Path:
    """Write ``runs_dir/report.html`` (atomically) and return its path."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise KitError(f"{runs_dir}: runs folder not found (pass --runs DIR)")
    subs = Path(submissions) if submissions else default_submissions(runs_dir)
    title = f"Runs report: {runs_dir}"
    body = (f"<!doctype html><html><head><meta charset=utf-8><title>{_e(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{_e(title)}</h1><p class=dim>written {_e(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}</p>"
            f"<h2 id=runs>Runs</h2>{runs_section(runs_dir)}<h2 id=ensemble>Ensemble</h2>{ensemble_section(runs_dir)}"
            f"<h2 id=worst>Worst validation queries (ensemble)</h2>{worst_section(runs_dir)}"
            f"<h2 id=ledger>Submissions ({_e(subs / ledger.LEDGER_NAME)})</h2>{ledger_section(subs)}</body></html>")
    return atomic_write_bytes(runs_dir / REPORT_NAME, body.encode())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=user_path, default=Path("runs"), metavar="DIR", help="runs folder (default: runs)")
    parser.add_argument("--submissions", type=user_path, default=None, metavar="DIR",
                        help="folder of ledger.jsonl (default: the one in RUNS/day.json, else submissions)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(f"wrote {write_report(args.runs, args.submissions)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
