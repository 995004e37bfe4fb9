"""submit.py's client against real local servers whose replies are not a score, URLs with
credentials and of every malformed kind, --resend mistakes, and retry waits that must stay bounded."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import preflight
import submit
from tests.helpers.paths import ROOT
from tests.helpers.runs import make_run
from tests.helpers.serving import local_server
from utils.checklist import BLOCK, Checklist
from utils.errors import KitError
from utils.runs import ledger
from utils.submission import client
from utils.submission.server_check import check_server


@pytest.fixture
def run_dir(rehearsal_data_session, tmp_path):
    return make_run(rehearsal_data_session, tmp_path / "runs")


def send(run_dir: Path, url: str, out: Path, *extra: str) -> int:
    return submit.main(["--run", str(run_dir), "--url", url, "--group", "t", "--out", str(out), "--retries", "0", *extra])


def strict_lines(out: Path) -> list[dict]:
    """Every ledger line, parsed as strict JSON (a bare NaN fails)."""
    def no_constants(name: str):
        raise AssertionError(f"ledger holds a bare {name}")
    text = (out / ledger.LEDGER_NAME).read_text()
    return [json.loads(line, parse_constant=no_constants) for line in text.splitlines() if line]


NOT_SCORES = {
    "no accuracy": b'{"status": "ok"}',
    "accuracy null": b'{"accuracy": null}',
    "an error with accuracy 0": b'{"error": "body rejected: 4 queries missing", "accuracy": 0}',
    "accuracy not a number": b'{"accuracy": "n/a"}',
    "accuracy true": b'{"accuracy": true}',
    "accuracy NaN": b'{"accuracy": NaN}',
    "accuracy Infinity": b'{"accuracy": Infinity}',
    "a list": b'[1000.0]',
    "accuracy an object": b'{"accuracy": {"value": 900}}',
    "accuracy past float": b'{"accuracy": 1' + b"0" * 400 + b'}',
}


@pytest.mark.parametrize("what", list(NOT_SCORES))
def test_a_reply_without_a_numeric_accuracy_is_not_confirmed(what, run_dir, tmp_path, capsys, caplog):
    out = tmp_path / "s"
    with local_server(reply=NOT_SCORES[what]) as (srv, url):
        code = send(run_dir, url, out)
    assert code == submit.NOT_SUBMITTED and len(srv.bodies) == 1
    shown = capsys.readouterr().out
    assert "submitted" not in shown and "score:" not in shown
    assert "NOT CONFIRMED" in caplog.text and "reply: " in caplog.text and "--force" in caplog.text
    [attempt, outcome] = strict_lines(out)
    assert attempt["kind"] == "attempt" and outcome["outcome"] == "not-confirmed" and outcome["score"] is None
    assert ledger.read(out)[0].outcome == "not-confirmed"


def test_a_numeric_string_is_a_score_stored_as_a_number(run_dir, tmp_path, capsys):
    out = tmp_path / "s"
    with local_server(reply=b'{"accuracy": " 912.5", "top1": NaN}') as (srv, url):
        assert send(run_dir, url, out) == 0
    assert "score: 912.5" in capsys.readouterr().out
    outcome = strict_lines(out)[-1]
    assert outcome["score"] == 912.5 and isinstance(outcome["score"], float)
    assert outcome["answer"] == {"accuracy": " 912.5", "top1": None}  # NaN kept as null, not a bare NaN
    [response] = out.glob("*.response.json")
    assert json.loads(response.read_text(), parse_constant=lambda c: pytest.fail(c))["top1"] is None


SECRETS = ("hunter2", "abc123", "s3cr3t")


def secret_url(port: int) -> str:
    return f"http://alice:hunter2@127.0.0.1:{port}/submit?token=abc123&key=s3cr3t"


def test_credentials_in_the_url_are_never_recorded_or_shown(run_dir, tmp_path, capsys, caplog):
    out = tmp_path / "s"
    with local_server() as (srv, url):
        port = srv.server_address[1]
        assert send(run_dir, secret_url(port), out, "--verbose") == 0
    closed = secret_url(port)  # the server is gone: refused, retried, reported
    assert send(run_dir, closed, out, "--retries", "1", "--backoff-s", "0", "--force") == submit.NOT_SUBMITTED  # the same body again: --force
    assert submit.main(["--history", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    everything = printed.out + printed.err + caplog.text + (out / ledger.LEDGER_NAME).read_text()
    assert not [s for s in SECRETS if s in everything]
    assert f"http://***@127.0.0.1:{port}/submit?token=***&key=***" in (out / ledger.LEDGER_NAME).read_text()
    assert "cannot reach http://***@127.0.0.1" in caplog.text


def test_resend_with_another_group_is_an_error(run_dir, tmp_path):
    out = tmp_path / "s"
    assert submit.main(["--run", str(run_dir), "--group", "t", "--out", str(out), "--dry-run"]) == 0
    with local_server() as (srv, url):
        with pytest.raises(KitError, match="--group .* 'other' differs from the body's groupname 't'"):
            submit.main(["--resend", "1", "--url", url, "--group", "other", "--out", str(out)])
        assert srv.bodies == []
        assert submit.main(["--resend", "1", "--url", url, "--group", "t", "--out", str(out)]) == 0  # the same: fine


@pytest.mark.parametrize("reply, first", [(b'{"accuracy": 1000.0}', "submitted, score 1000.0"),
                                          (b'{"status": "queued"}', "not-confirmed")])
def test_resend_of_a_body_already_sent_asks_for_force(reply, first, run_dir, tmp_path):
    out = tmp_path / "s"
    with local_server(reply=reply) as (srv, url):
        send(run_dir, url, out)
        with pytest.raises(KitError, match=rf"already sent \(ledger entry 1: {first}, to http://127.0.0.1.*--force"):
            submit.main(["--resend", "1", "--url", url, "--out", str(out)])
        body = ledger.read(out)[0].body
        with pytest.raises(KitError, match="already sent"):
            submit.main(["--resend", body, "--url", url, "--out", str(out)])  # by file, too
        assert len(srv.bodies) == 1
        submit.main(["--resend", "1", "--url", url, "--out", str(out), "--force"])
        assert len(srv.bodies) == 2


def test_resend_after_an_unknown_outcome_asks_for_force(run_dir, tmp_path):
    out = tmp_path / "s"
    assert submit.main(["--run", str(run_dir), "--group", "t", "--out", str(out), "--dry-run"]) == 0
    body = Path(ledger.read(out)[0].body)
    ledger.write_attempt(out, body=body, url="http://127.0.0.1:1/", group="t")  # as a killed submit.py leaves it
    with local_server() as (srv, url):
        with pytest.raises(KitError, match=r"ledger entry 2: unknown"):
            submit.main(["--resend", "1", "--url", url, "--out", str(out)])
        assert srv.bodies == []


def test_backoff_waits_are_capped():
    waits = [client.backoff_wait_s(n, 1.0, 30.0) for n in range(1, 12)]
    assert waits == [1, 2, 4, 8, 16, 30, 30, 30, 30, 30, 30]
    assert client.backoff_wait_s(10**11, 1.0, 30.0) == 30.0  # no overflow for a huge --retries


def test_a_huge_retry_count_stops_at_the_deadline_with_capped_waits(run_dir, tmp_path, caplog, monkeypatch):
    waits = []
    real_sleep = time.sleep
    monkeypatch.setattr(client.time, "sleep", lambda s: (waits.append(s), real_sleep(s)))
    code = send(run_dir, "http://127.0.0.1:9/", tmp_path / "s", "--retries", "100000000000", "--backoff-s", "0.05",
                "--max-backoff-s", "0.2", "--deadline-s", "4", "--timeout-s", "1")
    assert code == submit.NOT_SUBMITTED
    # the three first waits fit in the deadline however slow each refused attempt is here (0.35 s of 4)
    assert waits and max(waits) <= 0.2 and waits[:3] == [0.05, 0.1, 0.2]
    assert "--deadline-s 4 reached" in caplog.text
    assert ledger.read(tmp_path / "s")[0].outcome == "not-submitted"


def test_the_deadline_also_bounds_an_attempt_in_progress(run_dir, tmp_path, caplog):
    with local_server(hold=True) as (srv, url):
        t0 = time.monotonic()
        code = send(run_dir, url, tmp_path / "s", "--timeout-s", "60", "--deadline-s", "1")
        took_s = time.monotonic() - t0
    assert code == submit.NOT_SUBMITTED and "within --deadline-s 1" in caplog.text
    assert took_s < 30  # far below the 60 s the server holds the reply


@pytest.mark.parametrize("flags, message", [
    (["--max-backoff-s", "-1"], "--max-backoff-s -1.0: must be 0 or more"),
    (["--max-backoff-s", "inf"], "--max-backoff-s inf: must be"),
    (["--deadline-s", "0"], "--deadline-s 0.0: must be a number of seconds above 0"),
    (["--deadline-s", "nan"], "--deadline-s nan: must be"),
])
def test_wait_flag_mistakes_are_one_line(flags, message, run_dir, tmp_path):
    with pytest.raises(KitError, match=message):
        send(run_dir, "http://127.0.0.1:9/", tmp_path / "s", *flags)
    assert not (tmp_path / "s").exists()


BAD_URLS = ["http://[::1/", "http://[::1]:99999/", "http://host:-1/", "http://:80/", "http:///submit",
            "http://exa mple/", "http://host\n/", "http://h:80:90/", "http://a..b/", "http://" + "a" * 300 + "/",
            "http://[zz]/", "http://127.0.0.1:0/", "http://\u2603.com/", "ftp://host/", "127.0.0.1:8000",
            "http://alice:hunter2@[::1/?token=abc123"]


@pytest.mark.parametrize("url", BAD_URLS)
def test_every_malformed_url_is_one_line_in_submit_and_preflight(url, run_dir, tmp_path):
    with pytest.raises(KitError, match=r"^(--url|COMPETITION_URL) ") as err:
        send(run_dir, url, tmp_path / "s")
    assert "\n" not in str(err.value) and not [s for s in SECRETS if s in str(err.value)]
    cl = Checklist()
    check_server(cl, url, "t", timeout_s=1)
    [(status, message)] = [(i.status, i.detail) for i in cl.items if (i.group, i.name) == ("server", "url")]
    assert status == BLOCK and "\n" not in message and not [s for s in SECRETS if s in message]


def test_a_bad_ipv6_url_is_one_line_from_the_command_line(rehearsal_data_session, tmp_path):
    proc = subprocess.run([sys.executable, "submit.py", "--url", "http://[::1/", "--group", "t", "--run", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --url 'http://[::1/': cannot be read (Invalid IPv6 URL); expected http://HOST:PORT/PATH, e.g. http://127.0.0.1:8000/"]
    assert preflight.main(["--data", str(rehearsal_data_session), "--runs", str(tmp_path / "runs"),
                           "--url", "http://[::1/", "--group", "t"]) == 1  # a blocker, not a traceback



def test_a_reply_nested_past_the_json_parser_is_not_json_not_a_traceback(run_dir, tmp_path, caplog):
    """A 200 whose body is 100,000 nested arrays: json.loads raised RecursionError, submit.py died with a traceback
    and exit 1, and the ledger kept an attempt with no outcome. Now it is a reply that is not JSON: exit 3, recorded."""
    out = tmp_path / "s"
    with local_server(reply=b"[" * 100_000 + b"]" * 100_000) as (srv, url):
        code = send(run_dir, url, out)
    assert code == submit.NOT_SUBMITTED and len(srv.bodies) == 1
    assert "answered HTTP 200 but not JSON: '[[[[" in caplog.text
    [attempt, outcome] = strict_lines(out)
    assert attempt["kind"] == "attempt" and outcome["outcome"] == "not-confirmed" and outcome["score"] is None
