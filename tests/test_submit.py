"""submit.py against the real local competition server, run as its own process."""

from __future__ import annotations

import json

import pytest
import requests

import submit
from tests.helpers.runs import make_run
from tests.helpers.serving import competition_server
from utils.errors import KitError
from utils.submission.client import NotSubmitted, post
from utils.submission.lists import make_body, top_lists, validate_lists


@pytest.fixture
def run_dir(rehearsal_data_session, tmp_path):
    return make_run(rehearsal_data_session, tmp_path / "runs")


def test_submission_scores_and_is_saved_first(rehearsal_data_session, run_dir, tmp_path, capsys):
    with competition_server(rehearsal_data_session) as url:
        code = submit.main(["--run", str(run_dir), "--url", url, "--group", "team", "--out", str(tmp_path / "subs"),
                            "--data", str(rehearsal_data_session), "--preview", "3"])
    assert code == 0
    assert "score: 1000.0" in capsys.readouterr().out
    bodies = sorted((tmp_path / "subs").glob("*Z.json"))
    assert len(bodies) == 1
    body = json.loads(bodies[0].read_text())
    assert body["groupname"] == "team" and len(body["images"]) == 16
    assert all(len(set(v)) == 10 for v in body["images"].values())
    assert json.loads(bodies[0].with_suffix(".response.json").read_text())["accuracy"] == 1000.0
    page = bodies[0].with_suffix(".html").read_text()
    assert page.count("<tr>") == 3 and 'class="hit"' in page


def test_list_form_gets_the_same_score(rehearsal_data_session, tmp_path):
    run = make_run(rehearsal_data_session, tmp_path / "runs", perfect=False)
    from utils.runs.similarity_io import load_run

    lists = top_lists(load_run(run).splits["test"])
    with competition_server(rehearsal_data_session) as url:
        a = post(url, make_body(lists, "t", "dict"))
        b = post(url, make_body(lists, "t", "list"))
    assert a == b and 0 <= a["accuracy"] < 1000


def test_malformed_body_gets_400_and_is_not_retried(rehearsal_data_session, monkeypatch):
    import utils.submission.client as client

    waits = []
    with competition_server(rehearsal_data_session) as url:
        body = {"groupname": "t", "images": {"only-one.jpg": ["a"] * 10}}
        reply = requests.post(url, json=body, timeout=5)
        assert reply.status_code == 400 and "queries missing" in reply.json()["error"]
        with monkeypatch.context() as m, pytest.raises(NotSubmitted, match="HTTP 400"):
            m.setattr(client.time, "sleep", waits.append)  # only while posting: a backoff would be recorded here
            post(url, body, retries=3, backoff_s=2.0)
        assert waits == []  # no backoff, no second attempt: 4xx is final
        assert requests.post(url, data=b"{not json", timeout=5).status_code == 400


def test_500_twice_then_success(rehearsal_data_session, run_dir, tmp_path, caplog):
    with competition_server(rehearsal_data_session, "--fail-first", "2") as url:
        code = submit.main(["--run", str(run_dir), "--url", url, "--group", "t", "--out", str(tmp_path / "s"),
                            "--retries", "3", "--backoff-s", "0.05"])
    assert code == 0
    assert caplog.text.count("retrying") == 2 and "HTTP 500" in caplog.text


def test_server_down_keeps_body_and_says_not_submitted(run_dir, tmp_path, caplog):
    code = submit.main(["--run", str(run_dir), "--url", "http://127.0.0.1:9/", "--group", "t",
                        "--out", str(tmp_path / "s"), "--retries", "1", "--backoff-s", "0.01", "--timeout-s", "2"])
    assert code == submit.NOT_SUBMITTED
    saved = list((tmp_path / "s").glob("*.json"))
    assert len(saved) == 1 and "NOT SUBMITTED" in caplog.text and str(saved[0]) in caplog.text
    assert json.loads(saved[0].read_text())["groupname"] == "t"


def test_resend_posts_the_saved_body(rehearsal_data_session, run_dir, tmp_path, capsys):
    submit.main(["--run", str(run_dir), "--group", "t", "--out", str(tmp_path / "s"), "--dry-run"])
    saved = next((tmp_path / "s").glob("*.json"))
    with competition_server(rehearsal_data_session) as url:
        assert submit.main(["--resend", str(saved), "--url", url, "--out", str(tmp_path / "s")]) == 0
    assert "score: 1000.0" in capsys.readouterr().out


def test_dry_run_writes_body_without_url(run_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("COMPETITION_URL", raising=False)
    monkeypatch.setenv("COMPETITION_GROUP", "envteam")
    assert submit.main(["--run", str(run_dir), "--out", str(tmp_path / "s"), "--dry-run"]) == 0
    assert json.loads(next((tmp_path / "s").glob("*.json")).read_text())["groupname"] == "envteam"
    with pytest.raises(KitError, match="no server URL"):
        submit.main(["--run", str(run_dir), "--out", str(tmp_path / "s"), "--group", "t"])


def test_names_not_matching_the_data_folder_are_refused(rehearsal_data, tmp_path):
    run = make_run(rehearsal_data, tmp_path / "runs")
    next((rehearsal_data / "test" / "gallery").iterdir()).unlink()
    with pytest.raises(KitError, match="gallery names differ from the folder"):
        submit.main(["--run", str(run), "--group", "t", "--data", str(rehearsal_data), "--dry-run", "--out", str(tmp_path)])


def test_validate_lists_rules():
    q, g = ["q1", "q2"], [f"g{i}" for i in range(12)]
    good = {"q1": g[:10], "q2": g[2:12]}
    validate_lists(good, q, g)
    with pytest.raises(KitError, match="have no list"):
        validate_lists({"q1": g[:10]}, q, g)
    with pytest.raises(KitError, match="q2: needs 10 distinct"):
        validate_lists({"q1": g[:10], "q2": g[:9] + [g[0]]}, q, g)
    with pytest.raises(KitError, match=r"q2: \['zz'\] not in the gallery"):
        validate_lists({"q1": g[:10], "q2": g[:9] + ["zz"]}, q, g)
