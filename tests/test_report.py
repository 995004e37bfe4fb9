"""utils/runs/report.py: report.html of a real day (runs, ensemble, worst queries, ledger), checked
figure by figure against the runs' meta.json files; and in a headless Chromium where one is installed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest

import day
from tests.conftest import ROOT
from tests.helpers.serving import serving
from utils.runs import ledger, report
from utils.runs.similarity_io import SimMatrix, load_run, save_run
from utils.submission.server import CompetitionServer

RECIPE = """
[models.tiny]
script = "train_resnet.py"
model = "test_resnet"
weights = "none"
img_size = 32
batch_size = 16
lr = 3e-3
workers = 0
epochs = 1

[ensemble]
bootstrap = 20

[visualize]
queries = 3
thumb_px = 32
"""
FACES = {"val_query": {"images": 12, "faces_found": 10, "fallback": 2, "by_stage": {"mtcnn": 8, "hog": 2}}}


class Cells(HTMLParser):
    """Every figure cell (data-run, data-key, text), every <img> src, every href."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[list[str]] = []
        self.srcs: list[str] = []
        self.hrefs: list[str] = []
        self._open: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "td" and "data-key" in a:
            self._open = [a["data-run"], a["data-key"], ""]
        if tag == "img":
            self.srcs.append(a.get("src", ""))
        if "href" in a:
            self.hrefs.append(a["href"])

    def handle_data(self, data):
        if self._open is not None:
            self._open[2] += data

    def handle_endtag(self, tag):
        if tag == "td" and self._open is not None:
            self.cells.append(self._open)
            self._open = None


def lookup(obj, key: str):
    for part in key.split("."):
        obj = obj[int(part)] if isinstance(obj, list) else obj.get(part) if isinstance(obj, dict) else None
    return obj


@pytest.fixture(scope="module")
def day_dir(rehearsal_data_session, tmp_path_factory):
    """A real day (one tiny model) submitted to the local server, plus a face run written like infer_facenet's."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("reportday")
    rec = tmp / "day.toml"
    rec.write_text(RECIPE)
    with serving(CompetitionServer(rehearsal_data_session)) as server:
        argv = ["--data", str(rehearsal_data_session), "--runs", str(tmp / "runs"), "--out", str(tmp / "subs"),
                "--recipe", str(rec), "--url", server.url, "--group", "reporters", "--submit"]
        assert day.main(argv) == 0
    torch.set_num_threads(threads)
    tiny = load_run(tmp / "runs" / "tiny")
    meta = {**tiny.meta, "model": "facenet", "faces": FACES, "timings_s": {"detect": 1.5, "embed": 2.25}}
    meta.pop("files", None)
    save_run(tmp / "runs" / "facey", {s: SimMatrix(m.sim, m.query_names, m.gallery_names) for s, m in tiny.splits.items()}, meta)
    return tmp


def test_report_figures_match_the_meta_files(day_dir):
    runs = day_dir / "runs"
    page = report.write_report(runs)  # the submissions folder comes from runs/day.json
    parsed = Cells()
    parsed.feed(page.read_text())
    metas = {d.name: json.loads((d / "meta.json").read_text()) for d in runs.iterdir() if (d / "meta.json").is_file()}
    assert set(metas) == {"tiny", "facey", "ensemble"}
    entries = {f"ledger:{e.number}": e.record for e in ledger.read(day_dir / "subs")}
    checked = set()
    for run, key, text in parsed.cells:
        if run in entries:
            value = entries[run][key]
        elif key == "timings_s":
            t = metas[run]["timings_s"]
            value = t.get("total", sum(t.values()))
        else:
            value = lookup(metas[run], key)
        assert text == report.fmt(value), (run, key, text, value)
        checked.add((run, key))
    for run in metas:  # every run's validation score, and test where the data has a ground truth
        assert (run, "metrics.val.score") in checked and (run, "metrics.test.score") in checked
        assert lookup(metas[run], "metrics.test.score") is not None
    assert ("ensemble", "choice.weights.0") in checked
    n_options = len(metas["ensemble"]["choice"]["options"])
    assert n_options >= 2 and all(("ensemble", f"choice.options.{i}.val_mean") in checked for i in range(n_options))
    scores = [r["score"] for r in entries.values() if r["outcome"] == "submitted"]
    assert len(scores) == 1 and isinstance(scores[0], float) and ("ledger:2", "score") in checked
    text = page.read_text()
    assert "facey" in text and "val_query: 10/12 (hog 2, mtcnn 8)" in text and "members tiny" in text
    assert "dry-run" in text and "submitted" in text


def test_report_is_self_contained_with_the_worst_query_panels(day_dir):
    runs = day_dir / "runs"
    page = report.write_report(runs)
    parsed = Cells()
    parsed.feed(page.read_text())
    panels = sorted((runs / "ensemble" / "visual" / "val").glob("*.png"))
    assert len(panels) == 3
    assert all(src.startswith("data:image/png;base64,") for src in parsed.srcs) and len(parsed.srcs) >= 3
    assert parsed.hrefs == []  # nothing to follow: the file is all there is
    # the panels are inlined in visualize.py's order (worst first), byte for byte
    import base64
    import re

    order = re.findall(r'<a href="val/([^"]+)"', (runs / "ensemble" / "visual" / "val.html").read_text())
    inlined = [base64.b64decode(s.split(",", 1)[1]) for s in parsed.srcs[-3:]]
    assert inlined == [(runs / "ensemble" / "visual" / "val" / name).read_bytes() for name in order]


def test_report_module_alone_and_its_errors(day_dir, tmp_path):
    runs = day_dir / "runs"
    (runs / "report.html").unlink()
    out = subprocess.run([sys.executable, "-m", "utils.runs.report", "--runs", str(runs), "--submissions", str(day_dir / "subs")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and (runs / "report.html").is_file(), out.stderr
    bad = subprocess.run([sys.executable, "-m", "utils.runs.report", "--runs", str(tmp_path / "none")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == f"error: {tmp_path / 'none'}: runs folder not found (pass --runs DIR)"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "No run folder with a meta.json yet" in report.write_report(empty, tmp_path / "subs").read_text()


@pytest.mark.parametrize("meta,ensemble", [
    ({"model": 5, "metrics": {"val": "x"}, "config": [1]}, {"choice": "x"}),
    ({"metrics": {"val": {"score": 1}}, "timings_s": {"total": "slow"}, "faces": [1], "members": [3, {"name": "a"}]},
     {"choice": {"models": ["a"]}}),
    ({"timings_s": "slow", "metrics": [], "config": {"model": "m"}}, {"choice": {"models": ["a"], "weights": [1], "options": [5]}}),
])
def test_a_meta_json_of_another_shape_is_shown_not_a_traceback(tmp_path, meta, ensemble):
    """A meta.json from another kit or edited by hand ('metrics': {'val': 'x'}, an ensemble 'choice' without
    weights) ended the report, and with it the whole day, in an AttributeError, KeyError or TypeError traceback."""
    runs = tmp_path / "runs"
    for name, body in (("odd", meta), ("ensemble", ensemble)):
        (runs / name).mkdir(parents=True)
        (runs / name / "meta.json").write_text(json.dumps(body))
    page = report.write_report(runs, tmp_path / "subs").read_text()
    assert "<td>odd</td>" in page
    assert "records no models and weights" in page or "<h3>Weights</h3>" in page


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="no chromium on this machine (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(day_dir, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    page = report.write_report(day_dir / "runs")
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,2000",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    img = np.asarray(Image.open(shot).convert("L"))
    dark = (img < 128).mean()
    assert img.shape[0] >= 1000 and 0.005 < dark < 0.6  # text and panels drawn, not a blank or black page
    colours = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    assert (np.abs(colours[:, 0].astype(int) - colours[:, 1]) > 60).any()  # the panels' coloured frames are there
