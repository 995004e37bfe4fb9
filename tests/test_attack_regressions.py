"""Defects found by the third attack (ATTACK.md), each now a regression test of the fix: the test states the
wanted behaviour and failed on the code the attack ran against."""

from __future__ import annotations

import json
import shutil
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import day
import submit
from tests.test_cli_contract import run_config_checks
from tests.test_ledger_faults import local_server
from tests.test_submit import make_run
from utils.checklist import OK, Checklist
from utils.data.layout import load_layout
from utils.errors import KitError
from utils.runs import ledger
from utils.runs.run_checks import check_runs


@pytest.fixture
def run_dir(rehearsal_data_session, tmp_path):
    return make_run(rehearsal_data_session, tmp_path / "runs")


def send(run_dir: Path, url: str, out: Path) -> int:
    return submit.main(["--run", str(run_dir), "--url", url, "--group", "t", "--out", str(out), "--retries", "0"])


# --- submit.py: replies that must not read as a score ---------------------------------------------

NOT_A_SCORE = {
    "duplicate accuracy keys": b'{"accuracy": 12.0, "accuracy": 912.0}',
    "negative accuracy": b'{"accuracy": -5}',
    "accuracy above the maximum of 1000": b'{"accuracy": 1500}',
    "status error beside an accuracy": b'{"accuracy": 900, "status": "error", "message": "rejected: duplicate"}',
    "success false beside an accuracy": b'{"accuracy": 900, "success": false}',
}


@pytest.mark.parametrize("what", list(NOT_A_SCORE))
def test_a_reply_that_is_not_a_plausible_score_is_not_confirmed(what, run_dir, tmp_path):
    out = tmp_path / "s"
    with local_server(reply=NOT_A_SCORE[what]) as (srv, url):
        code = send(run_dir, url, out)
    assert len(srv.bodies) == 1
    assert code == submit.NOT_SUBMITTED
    assert ledger.read(out)[0].outcome == "not-confirmed"


class _Accepted(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        data = b'{"accuracy": 0, "queued": true}'
        self.send_response(202)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@contextmanager
def accepted_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Accepted)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/"
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def test_a_202_accepted_reply_is_not_a_confirmed_score(run_dir, tmp_path):
    out = tmp_path / "s"
    with accepted_server() as url:
        code = send(run_dir, url, out)
    assert code == submit.NOT_SUBMITTED
    assert ledger.read(out)[0].outcome == "not-confirmed"


def test_submitting_the_same_body_again_asks_for_force(run_dir, tmp_path):
    out = tmp_path / "s"
    with local_server() as (srv, url):
        assert send(run_dir, url, out) == 0
        with pytest.raises(KitError, match="already sent"):
            send(run_dir, url, out)
        assert len(srv.bodies) == 1


# --- ensemble.py / preflight.py: a run made from other data -------------------------------------

def other_data_run(data: Path, tmp_path: Path, runs: Path) -> Path:
    """A run made on a copy of ``data`` whose gallery files hold each other's images (same names)."""
    other = tmp_path / "other_data"
    shutil.copytree(data, other)
    gallery = sorted((other / "test" / "gallery").iterdir())
    contents = [p.read_bytes() for p in gallery]
    for path, content in zip(gallery, contents[1:] + contents[:1]):
        path.write_bytes(content)
    run = make_run(other, tmp_path / "scratch")
    meta = json.loads((run / "meta.json").read_text())
    meta["config"] = {"data": str(other)}
    target = runs / "other"
    shutil.copytree(run, target)
    (target / "meta.json").write_text(json.dumps(meta))
    return target


def test_a_run_made_from_other_data_is_not_called_ok(rehearsal_data, tmp_path):
    runs = tmp_path / "runs"
    make_run(rehearsal_data, runs)
    other_data_run(rehearsal_data, tmp_path, runs)
    cl = Checklist()
    check_runs(cl, runs, load_layout(rehearsal_data))
    statuses = {i.name: i.status for i in cl.items if i.group == "runs"}
    assert statuses["model"] == OK
    assert statuses["other"] != OK


# --- day.py: recipe types ---------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["models = 5\n", 'models = "resnet"\n', "ensemble = 5\n"])
def test_a_recipe_section_that_is_not_a_table_is_one_line(text, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    with pytest.raises(KitError, match="r.toml"):
        day.load_recipe(recipe, [])


# --- model scripts: flags at a boundary ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["../escape", "a/b", "."])
def test_a_run_name_that_leaves_the_runs_folder_is_refused(name, tmp_path):
    with pytest.raises(KitError, match="--run-name"):
        run_config_checks("train_resnet", ["--data", str(tmp_path), "--run-name", name])


@pytest.mark.parametrize("name", ["face_cache", "split.json", "day.log"])
def test_a_run_name_of_the_kits_own_runs_entries_is_refused(name, tmp_path):
    """--run-name face_cache wrote a whole run (checkpoints, meta.json, matrices) into the face scripts' shared cache
    folder, which ensemble.py --auto then took for a model run; split.json or day.log met an OS error."""
    with pytest.raises(KitError, match=rf"--run-name '{name}': the kit keeps its own {name} in --runs; choose another"):
        run_config_checks("train_resnet", ["--data", str(tmp_path), "--run-name", name])


def test_batch_size_one_is_refused_before_training(tmp_path):
    with pytest.raises(KitError, match="--batch-size"):
        run_config_checks("train_resnet", ["--data", str(tmp_path), "--batch-size", "1"])


def test_a_worker_count_far_beyond_the_cores_is_refused(tmp_path):
    with pytest.raises(KitError, match="--workers"):
        run_config_checks("train_resnet", ["--data", str(tmp_path), "--workers", "100000"])



# --- python -m utils.weights: a manifest edited by hand ------------------------------------------------

def test_a_hand_edited_manifest_entry_is_one_line(tmp_path):
    from utils.weights.__main__ import main as weights_main

    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1, "entries": {"facenet/vggface2": 5}}))
    with pytest.raises(KitError, match="manifest.json"):
        weights_main(["status", "--dir", str(tmp_path), "--verify"])
