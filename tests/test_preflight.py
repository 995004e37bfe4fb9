"""preflight.py on real folders: the generated dataset passes; broken data, untrustworthy runs,
unloadable weights and a server that does not answer are blockers (exit 1)."""

from __future__ import annotations

import json
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import preflight
from tests.helpers.serving import serving
from utils.checklist import BLOCK, OK, SKIP, WARN, Checklist
from utils.data.data_checks import check_data
from utils.data.layout import load_layout
from utils.errors import KitError
from utils.runs.data_fingerprint import layout_fingerprint
from utils.runs.run_checks import check_runs, weight_files
from utils.runs.similarity_io import SimMatrix, invalidate_run, save_run
from utils.submission.server import CompetitionServer
from utils.submission.server_check import check_server


def _items(cl: Checklist) -> dict[tuple[str, str], tuple[str, str]]:
    return {(c.group, c.name): (c.status, c.detail) for c in cl.items}


def _run(data: Path, run_dir: Path, config: dict | None = None, query_names: list[str] | None = None) -> Path:
    layout = load_layout(data)
    q, g = query_names or [p.name for p in layout.query], [p.name for p in layout.gallery]
    sim = np.random.default_rng(0).normal(size=(len(q), len(g))).astype(np.float32)
    m = SimMatrix(sim, q, g)
    fp = layout_fingerprint(layout)  # the images it was made from, as run_meta records them
    return save_run(run_dir, {"val": m, "test": m}, {"model": run_dir.name, "config": config or {},
                                                     "data_fingerprint": {"val": fp, "test": fp}})


@contextmanager
def local_server(data: Path):
    """The kit's competition server in a thread on a free port; yields it."""
    with serving(CompetitionServer(data)) as server:
        yield server


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def test_generated_data_with_a_complete_run_is_ready(rehearsal_data_session, tmp_path, capsys):
    runs = tmp_path / "runs"
    weights = tmp_path / "backbone.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, weights)
    _run(rehearsal_data_session, runs / "resnet", {"weights": str(weights), "model": "resnet18"})
    assert preflight.main(["--data", str(rehearsal_data_session), "--runs", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "ready" in out and BLOCK not in out
    cl = Checklist()
    check_runs(cl, runs, check_data(cl, rehearsal_data_session))
    items = _items(cl)
    assert items[("data", "identities")] == (OK, "16 identities, 128 training images")
    assert items[("data", "domains")] == (OK, "training images per domain: real 64, synthetic 64")
    assert items[("data", "gallery")][1].startswith("16 images")
    assert items[("images", "duplicates")][0] == OK and items[("images", "query readable")] == (OK, "all 16 decode")
    assert items[("runs", "resnet")][0] == OK and "= the data's lists" in items[("runs", "resnet")][1]
    assert items[("weights", "resnet weights")] == (OK, f"{weights}: loads")


def test_broken_data_is_a_blocker(rehearsal_data, capsys):
    gallery, query = rehearsal_data / "test" / "gallery", rehearsal_data / "test" / "query"
    victim = sorted(gallery.iterdir())[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated
    shutil.copy(sorted(query.iterdir())[0], query / "zz_copy.png")  # same bytes as another query
    Image.new("RGB", (48, 48), (128, 128, 128)).save(gallery / "zz_blank.png")  # near-empty
    ident = sorted((rehearsal_data / "train").iterdir())[0]
    (ident / "zz_empty.jpg").write_bytes(b"")  # a broken training image: only a warning
    assert preflight.main(["--data", str(rehearsal_data), "--runs", str(rehearsal_data / "no_runs")]) == 1
    assert "1 blocker(s)" in capsys.readouterr().out
    cl = Checklist()
    check_data(cl, rehearsal_data)
    items = _items(cl)
    status, detail = items[("images", "gallery readable")]
    assert status == BLOCK and f"test/gallery/{victim.name}" in detail and "truncated or corrupt" in detail
    assert items[("images", "training readable")][0] == WARN and "zz_empty.jpg (empty file" in items[("images", "training readable")][1]
    assert items[("images", "gallery near-empty")] == (WARN, "1 with pixel std < 2 (blank?), e.g. ['test/gallery/zz_blank.png']")
    status, detail = items[("images", "duplicates")]
    assert status == WARN and "within query 1" in detail and "test/query/zz_copy.png" in detail


def test_a_layout_that_cannot_be_read_is_a_blocker(rehearsal_data):
    for p in sorted((rehearsal_data / "test" / "gallery").iterdir())[9:]:
        p.unlink()
    cl = Checklist()
    assert check_data(cl, rehearsal_data) is None
    status, detail = _items(cl)[("data", "layout")]
    assert status == BLOCK and "9 images; a top-10 needs at least 10" in detail
    assert preflight.main(["--data", str(rehearsal_data)]) == 1


def test_runs_that_cannot_be_trusted(rehearsal_data_session, tmp_path):
    data, runs = rehearsal_data_session, tmp_path / "runs"
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    _run(data, runs / "good", {"weights": "hub", "pretrained": "none"})
    _run(data, runs / "killed")
    invalidate_run(runs / "killed")
    _run(data, runs / "tampered")
    (runs / "tampered" / "test_sim.npy").write_bytes((runs / "killed" / "test_sim.npy").read_bytes()[:-4] + b"\0\0\0\0")
    _run(data, runs / "stale", query_names=[p.name for p in load_layout(data).query][1:] + ["old.jpg"])
    _run(data, runs / "lost_weights", {"weights": str(tmp_path / "moved" / "clip.bin")})
    _run(data, runs / "bad_weights", {"weights": str(tmp_path / "garbage.safetensors")})
    (runs / "face_cache").mkdir()  # not a run
    cl = Checklist()
    check_runs(cl, runs, load_layout(data))
    items = _items(cl)
    assert ("runs", "face_cache") not in items and ("weights", "good weights") not in items
    assert items[("runs", "good")][0] == OK
    assert items[("runs", "killed")][0] == WARN and "incomplete, ensemble.py leaves it out" in items[("runs", "killed")][1]
    assert items[("runs", "tampered")][0] == BLOCK and "written by another run" in items[("runs", "tampered")][1]
    status, detail = items[("runs", "stale")]
    assert status == BLOCK and "test query names differ" in detail and "not on disk: ['old.jpg']" in detail
    assert items[("weights", "lost_weights weights")] == (BLOCK, f"{tmp_path / 'moved' / 'clip.bin'}: not found (paths are relative to the current folder)")
    assert items[("weights", "bad_weights weights")][0] == BLOCK and "not a readable safetensors file" in items[("weights", "bad_weights weights")][1]
    assert preflight.main(["--data", str(data), "--runs", str(runs)]) == 1


def test_weight_files_are_told_from_tags():
    config = {"weights": "hub", "pretrained": "openai", "shape_predictor": "/m/sp.dat", "weights_b": "w.safetensors", "model": "a/b.pt"}
    assert weight_files(config) == [("shape_predictor", "/m/sp.dat"), ("weights_b", "w.safetensors")]


def test_server_that_answers_and_one_that_does_not(rehearsal_data_session, capsys):
    with local_server(rehearsal_data_session) as server:
        cl = Checklist()
        check_server(cl, server.url, "team", timeout_s=60)
        assert _items(cl)[("server", "answers")][0] == OK and "HTTP 200" in _items(cl)[("server", "answers")][1]
        assert preflight.main(["--data", str(rehearsal_data_session), "--url", server.url, "--group", "team"]) == 0
        assert server.received == []  # a GET only: nothing was submitted
    closed = _closed_port_url()
    assert preflight.main(["--data", str(rehearsal_data_session), "--url", closed, "--group", "team"]) == 1
    cl = Checklist()
    check_server(cl, closed, "", timeout_s=5)
    items = _items(cl)
    assert items[("server", "answers")][0] == BLOCK and "does not answer" in items[("server", "answers")][1]
    assert items[("server", "group")][0] == BLOCK
    cl = Checklist()
    check_server(cl, "", "", timeout_s=5)
    assert _items(cl)[("server", "answers")][0] == SKIP
    check_server(cl, "127.0.0.1:8000", "t", timeout_s=5)
    assert _items(cl)[("server", "url")][0] == BLOCK


def test_bad_timeout_flag_is_one_line():
    with pytest.raises(KitError, match="--timeout-s 0.0: must be > 0"):
        preflight.main(["--timeout-s", "0"])
    for bad in ("nan", "inf"):  # NaN reached the socket: a ValueError traceback once --url was set
        with pytest.raises(KitError, match=f"--timeout-s {bad}: must be > 0"):
            preflight.main([f"--timeout-s={bad}", "--url", "http://127.0.0.1:9/", "--group", "t"])


def _keep_identities(data: Path, keep: int, single: int = 0) -> None:
    """Leave ``keep`` training identities, the first ``single`` of them with one image."""
    idents = sorted(p for p in (data / "train").iterdir() if p.is_dir())
    for d in idents[keep:]:
        shutil.rmtree(d)
    for d in idents[:single]:
        for p in sorted(d.iterdir())[1:]:
            p.unlink()


@pytest.mark.parametrize("case", ["one identity", "one identity with two images", "split.json val_fraction 0.95"])
def test_preflight_blocks_data_the_scripts_refuse(rehearsal_data, tmp_path, case):
    """The split the model scripts make is made by preflight too: data no script accepts is not 'ready'."""
    from utils.data.split import SplitParams
    from utils.data.task import prepare_task

    runs = tmp_path / "runs"
    params = SplitParams()
    if case == "one identity":
        _keep_identities(rehearsal_data, 1)
    elif case == "one identity with two images":
        _keep_identities(rehearsal_data, 3, single=2)
    elif case == "split.json val_fraction 0.95":
        _keep_identities(rehearsal_data, 3)
        params = SplitParams(val_fraction=0.95)
        runs.mkdir()
        (runs / "split.json").write_text(json.dumps({"params": {"seed": 0, "val_fraction": 0.95, "query_domain": "real"}}))
    else:
        raise ValueError(case)
    with pytest.raises(KitError) as refused:  # what train_resnet.py & co. do first
        prepare_task(rehearsal_data, tmp_path / "script_runs", params)
    cl = Checklist()
    check_data(cl, rehearsal_data, runs)
    status, detail = _items(cl)[("data", "validation split")]
    assert status == BLOCK and str(refused.value) in detail
    assert preflight.main(["--data", str(rehearsal_data), "--runs", str(runs)]) == 1


def test_preflight_reports_the_split_the_scripts_will_make(rehearsal_data_session):
    cl = Checklist()
    check_data(cl, rehearsal_data_session)
    status, detail = _items(cl)[("data", "validation split")]
    assert status == OK and detail.startswith("3 held-out identities") and "default" in detail


def test_query_files_the_kit_will_not_read_are_counted_and_block(rehearsal_data, capsys):
    """Ten files in test/query, four of them not named like an image the kit reads: preflight blocks, naming them,
    and every script stops on the first one (load_layout), where today's kit listed 6 queries and went on."""
    query = rehearsal_data / "test" / "query"
    first = sorted(query.iterdir())[0]
    n_images = len(list(query.iterdir()))
    odd = ["q6", "q7.jfif", "q8.jpeg ", "q9.avif"]
    for name in odd:
        shutil.copy(first, query / name)
    (query / ".DS_Store").write_bytes(b"\0")
    cl = Checklist()
    check_data(cl, rehearsal_data)
    status, detail = _items(cl)[("data", "query files")]
    assert status == BLOCK and detail.startswith(f"{n_images + 5} entries, {n_images} images the kit reads; 4 it will not:")
    assert "'test/query/q6' (no extension ('q6'))" in detail and "'test/query/q7.jfif' (extension '.jfif'" in detail
    assert "'test/query/q8.jpeg ' (extension '.jpeg ' has a space in it)" in detail
    assert _items(cl)[("data", "gallery files")] == (OK, f"{len(list((rehearsal_data / 'test' / 'gallery').iterdir()))} entries, "
                                                    f"{len(list((rehearsal_data / 'test' / 'gallery').iterdir()))} images the kit reads: every file is an image")
    with pytest.raises(KitError, match=r"test/query/q6: no extension \('q6'\); convert or rename it"):
        load_layout(rehearsal_data)  # what every model script, ensemble and submit read first
    assert preflight.main(["--data", str(rehearsal_data)]) == 1
    for name in odd:
        (query / name).unlink()
    cl = Checklist()
    check_data(cl, rehearsal_data)
    status, detail = _items(cl)[("data", "query files")]
    assert status == WARN and "1 hidden, system or sub-folder entries ignored: '.DS_Store'" in detail
    ident = sorted((rehearsal_data / "train").iterdir())[0]
    shutil.copy(first, ident / "x.heic")
    cl = Checklist()
    check_data(cl, rehearsal_data)
    status, detail = _items(cl)[("data", "training files")]
    assert status == WARN and f"'train/{ident.name}/x.heic' (extension '.heic' is not one the kit reads)" in detail
    assert cl.exit_code() == 0
    shutil.copy(first, rehearsal_data / "train" / "no_identity.jpg")
    cl = Checklist()
    check_data(cl, rehearsal_data)
    status, detail = _items(cl)[("data", "training files")]
    assert status == WARN and detail.startswith("2 not used for training") and "'train/no_identity.jpg' (outside an identity folder)" in detail
