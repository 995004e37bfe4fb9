"""utils/submission/stages.py stage by stage, on the generated dataset, real run folders of both forms,
a real ledger and a real local server: the target, the body, a resend's checks, the dry run, the send
and the history, each with its one-line refusals."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.runs import make_run
from tests.helpers.serving import local_server
from utils.data.layout import load_layout
from utils.errors import KitError
from utils.runs import ledger
from utils.runs.topk_run import make_topk_split, save_topk_run
from utils.submission import stages


@pytest.fixture
def run_dir(rehearsal_data_session, tmp_path):
    return make_run(rehearsal_data_session, tmp_path / "runs")


def dry_body(run: Path, data: Path, out: Path, form: str = "dict") -> tuple[dict, Path]:
    return stages.body_from_run(run, str(data), "team", form, out, preview=0)


# ----------------------------------------------------------------------------- files it cannot write
def test_writing_turns_an_os_error_into_one_line_with_the_fix(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(KitError, match=rf"{tmp_path / 'a_file' / 'body.json'}: cannot write the body \(a part of the path is a file"):
        with stages.writing(tmp_path / "elsewhere", "the body"):
            open(tmp_path / "a_file" / "body.json", "w")  # real ENOTDIR, the OSError names the file
    err = stages.write_error(tmp_path / "s", OSError(errno.ENOSPC, "No space left on device"), "the ledger")
    assert str(err) == f"{tmp_path / 's'}: cannot write the ledger (no space left on the device: free some space or pass another --out)"
    assert stages.describe(OSError(errno.ELOOP, "Too many levels of symbolic links")) == "Too many levels of symbolic links"


# ----------------------------------------------------------------------------- target
def test_resolve_target_takes_flags_first_then_the_environment(monkeypatch):
    monkeypatch.setenv("COMPETITION_URL", "http://10.0.0.1:8000/")
    monkeypatch.setenv("COMPETITION_GROUP", "env-team")
    assert stages.resolve_target("", "", sending=True) == ("http://10.0.0.1:8000/", "env-team")
    assert stages.resolve_target("http://127.0.0.1:9/", "flag-team", sending=True) == ("http://127.0.0.1:9/", "flag-team")
    monkeypatch.setenv("COMPETITION_URL", "10.0.0.1:8000")
    with pytest.raises(KitError, match="COMPETITION_URL '10.0.0.1:8000': needs http:// or https://"):
        stages.resolve_target("", "", sending=False)  # checked even for a dry run
    monkeypatch.delenv("COMPETITION_URL")
    assert stages.resolve_target("", "t", sending=False) == ("", "t")
    with pytest.raises(KitError, match="no server URL: pass --url URL or set COMPETITION_URL"):
        stages.resolve_target("", "t", sending=True)


# ----------------------------------------------------------------------------- body
def test_a_body_from_a_run_is_the_validated_top_10_written_to_out(rehearsal_data_session, run_dir, tmp_path):
    truth = load_layout(rehearsal_data_session).ground_truth
    body, path = dry_body(run_dir, rehearsal_data_session, tmp_path / "s")
    assert path.parent == tmp_path / "s" and json.loads(path.read_text()) == body
    assert body["groupname"] == "team" and set(body["images"]) == set(truth)
    assert all(len(set(g)) == 10 and g[0] in truth[q] for q, g in body["images"].items())  # the perfect run's first answers
    listed, _ = dry_body(run_dir, rehearsal_data_session, tmp_path / "s", form="list")
    assert {e["filename"]: e["gallery_images"] for e in listed["images"]} == body["images"]


def test_a_topk_run_gives_the_same_body_as_the_matrix_it_came_from(rehearsal_data_session, tmp_path):
    layout = load_layout(rehearsal_data_session)
    q, g = [p.name for p in layout.query], [p.name for p in layout.gallery]
    rng = np.random.default_rng(1)
    q_emb, g_emb = rng.standard_normal((len(q), 16)).astype(np.float32), rng.standard_normal((len(g), 16)).astype(np.float32)
    split = make_topk_split(q_emb, g_emb, q, g, k=20)
    topk = save_topk_run(tmp_path / "runs" / "big", {"val": split, "test": split}, {"model": "big"})
    body, _ = dry_body(topk, rehearsal_data_session, tmp_path / "s")
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    sim = unit(q_emb) @ unit(g_emb).T
    assert body["images"] == {name: [g[j] for j in np.argsort(-sim[i], kind="stable")[:10]] for i, name in enumerate(q)}



def test_a_negative_preview_count_is_refused_before_anything_is_written(rehearsal_data_session, run_dir, tmp_path):
    """--preview -5 wrote a page of all but the last 5 queries, titled 'First 11 queries' (list[:-5]), silently."""
    with pytest.raises(KitError, match=r"--preview -5: the number of queries on the page, 0 or more \(0 = no page\)"):
        stages.body_from_run(run_dir, str(rehearsal_data_session), "team", "dict", tmp_path / "s", preview=-5)
    assert not (tmp_path / "s").exists()

def test_a_run_on_other_data_or_a_preview_without_data_is_refused(rehearsal_data, run_dir, tmp_path):
    with pytest.raises(KitError, match="--preview needs --data DIR"):
        stages.body_from_run(run_dir, "", "team", "dict", tmp_path / "s", preview=3)
    gone = sorted((rehearsal_data / "test" / "gallery").iterdir())[0]
    gone.rename(rehearsal_data / "test" / "gallery" / "renamed.png")
    with pytest.raises(KitError, match=rf"{rehearsal_data / 'test' / 'gallery'}: the run's gallery names differ .*"
                                       rf"not in run: \['renamed.png'\], not on disk: \['{gone.name}'\]"):
        dry_body(run_dir, rehearsal_data, tmp_path / "s")
    assert not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------- resend
def test_a_resend_reads_a_file_or_a_ledger_entry_and_checks_it(rehearsal_data_session, run_dir, tmp_path):
    out = tmp_path / "s"
    body, path = dry_body(run_dir, rehearsal_data_session, out)
    assert stages.record_dry_run(path, "", "team", out) == 0
    assert stages.resend_path("1", out) == path and stages.resend_path(str(path), out) == path
    assert stages.body_to_resend("1", out, str(rehearsal_data_session)) == (body, path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(KitError, match=rf"{tmp_path / 'bad.json'}: cannot read a saved body \(JSONDecodeError"):
        stages.body_to_resend(str(tmp_path / "bad.json"), out, "")
    first = next(iter(body["images"]))
    (tmp_path / "edited.json").write_text(json.dumps({**body, "images": {**body["images"], first: ["elsewhere.png"] * 10}}))
    with pytest.raises(KitError, match="not a valid submission body, nothing sent"):
        stages.body_to_resend(str(tmp_path / "edited.json"), out, "")


def test_check_resend_refuses_another_group_and_a_body_that_may_have_counted(rehearsal_data_session, run_dir, tmp_path):
    out = tmp_path / "s"
    body, path = dry_body(run_dir, rehearsal_data_session, out)
    stages.check_resend(body, path, "", out, force=False)  # never sent: fine
    with pytest.raises(KitError, match="--group \\(or COMPETITION_GROUP\\) 'other' differs from the body's groupname 'team'"):
        stages.check_resend(body, path, "other", out, force=True)
    ledger.append(out, body=path, url="http://127.0.0.1:1/", group="team", outcome="submitted", answer={"accuracy": 900.0}, score=900.0)
    with pytest.raises(KitError, match=r"already sent \(ledger entry 1: submitted, score 900.0, to http://127.0.0.1:1/\); .* add --force"):
        stages.check_resend(body, path, "team", out, force=False)
    stages.check_resend(body, path, "team", out, force=True)


# ----------------------------------------------------------------------------- send and history
def test_send_records_the_attempt_and_the_score(rehearsal_data_session, run_dir, tmp_path, capsys):
    out = tmp_path / "s"
    body, path = dry_body(run_dir, rehearsal_data_session, out)
    with local_server(reply=b'{"accuracy": 987.5}') as (srv, url):
        assert stages.send(body, path, url, out, timeout_s=30, retries=0, backoff_s=0.01) == 0
    assert [json.loads(b) for b in srv.bodies] == [body]
    assert "score: 987.5" in capsys.readouterr().out
    (entry,) = ledger.read(out)
    assert (entry.outcome, entry.record["score"], entry.body) == ("submitted", 987.5, str(path))
    assert json.loads(path.with_suffix(".response.json").read_text()) == {"accuracy": 987.5}


def test_send_without_a_score_is_not_submitted_and_says_how_to_resend(rehearsal_data_session, run_dir, tmp_path, caplog):
    out = tmp_path / "s"
    body, path = dry_body(run_dir, rehearsal_data_session, out)
    with local_server(reply=b'{"status": "ok"}') as (_, url):
        assert stages.send(body, path, url, out, timeout_s=30, retries=0, backoff_s=0.01) == stages.NOT_SUBMITTED
    (entry,) = ledger.read(out)
    assert entry.outcome == "not-confirmed" and entry.record["answer"] == {"status": "ok"}  # it may hold the body
    assert "NOT CONFIRMED: " in caplog.text and f"the body is saved at {path} (send it again with --resend {path} --force)" in caplog.text
    assert not path.with_suffix(".response.json").exists()


def test_entries_are_numbered_1_to_n_whatever_lines_lie_between(tmp_path):
    """Outcome lines and a torn line take no number: --history, --resend N and the attempt's own number agree."""
    out, body = tmp_path / "s", tmp_path / "body.json"
    body.write_text("{}")
    numbers = []
    for _ in range(2):
        attempt_id, number = ledger.write_attempt(out, body=body, url="http://127.0.0.1:1/", group="team")
        ledger.write_outcome(out, attempt_id, "rejected", answer="400")
        numbers.append(number)
    with open(out / ledger.LEDGER_NAME, "ab") as f:
        f.write(b'{"torn')  # a kill mid-write
    last_id, number = ledger.write_attempt(out, body=body, url="http://127.0.0.1:1/", group="team")
    assert numbers + [number] == [1, 2, 3] == [e.number for e in ledger.read(out)]
    assert ledger.find(out, 3).record["id"] == last_id and len((out / ledger.LEDGER_NAME).read_bytes().splitlines()) == 6


def test_history_lists_attempts_and_flags_unknown_outcomes(rehearsal_data_session, run_dir, tmp_path, capsys):
    out = tmp_path / "s"
    assert stages.show_history(out) == 0
    assert f"no submissions recorded in {out / ledger.LEDGER_NAME}" in capsys.readouterr().out
    _, path = dry_body(run_dir, rehearsal_data_session, out)
    stages.record_dry_run(path, "", "team", out)
    ledger.write_attempt(out, body=path, url="http://127.0.0.1:1/", group="team")  # killed before its outcome
    capsys.readouterr()
    assert stages.show_history(out) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "2 attempt(s)" in shown and "dry-run" in shown
    assert f"entry 2 ({path.name}): no outcome recorded" in shown and "--resend 2 --force" in shown
