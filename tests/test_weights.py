"""utils.weights: fetch into a folder from a real HTTP server on 127.0.0.1 (manifest, sha256, a cut or
interrupted download, a full disk), then resolve tags from that folder offline; state-dict loading,
the fingerprint of a weight file, the preflight line and the defaults list."""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from tests.helpers.serving import serving
from utils.checklist import OK, WARN, Checklist
from utils.errors import KitError
from utils.weights import fingerprint, load_into, load_weights_file, resolve_hf_source, resolve_weights
from utils.weights.__main__ import main as weights_main
from utils.weights.catalog import DEFAULT_RECIPES, WeightSpec, facenet_spec, timm_spec
from utils.weights.download import fetch_spec
from utils.weights.report import check_weights, default_status
from utils.weights.store import MANIFEST, find_entry, read_manifest, write_entry

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = bytes(range(256)) * 256  # 64 KiB


class Hub(BaseHTTPRequestHandler):
    """A tiny stand-in for the hub: ``/api/models/<repo>`` lists files, ``/<repo>/resolve/main/<f>`` serves them.

    ``server.files`` maps a URL path to bytes; ``server.mode`` is ``ok``, ``cut`` (announces every
    byte, sends half, hangs up), ``hold`` (sends half, waits for ``release``, hangs up) or
    ``no-range`` (ignores Range). Each request's Range header is recorded in ``server.ranges``.
    """

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?")[0]
        if path.startswith("/api/models/"):
            return self.send(200, json.dumps(self.server.listing(path.removeprefix("/api/models/"))).encode())
        if path not in self.server.files:
            return self.send(404, b"not found")
        data = self.server.files[path]
        rng = self.headers.get("Range")
        self.server.ranges.append(rng)
        start = int(rng.removeprefix("bytes=").rstrip("-")) if rng and self.server.mode != "no-range" else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if self.server.mode in ("cut", "hold") and not start:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.server.sent_half.set()
            if self.server.mode == "hold":
                self.server.release.wait(30)
            self.close_connection = True
            return
        self.wfile.write(body)

    def send(self, code: int, data: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:
        pass


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Hub)
        self.files: dict[str, bytes] = {}
        self.sha_override: dict[str, str] = {}
        self.mode = "ok"
        self.ranges: list[str | None] = []
        self.sent_half, self.release = threading.Event(), threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def listing(self, repo: str) -> dict:
        prefix = f"/{repo}/resolve/main/"
        siblings = []
        for path, data in self.files.items():
            if path.startswith(prefix):
                name = path.removeprefix(prefix)
                sha = self.sha_override.get(name, hashlib.sha256(data).hexdigest())
                siblings.append({"rfilename": name, "size": len(data), "lfs": {"sha256": sha, "size": len(data)}})
        return {"id": repo, "siblings": siblings}


@pytest.fixture
def hub(monkeypatch):
    server = HubServer()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    with serving(server):
        yield server
    server.release.set()


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "weights"
    monkeypatch.setenv("KIT_WEIGHTS_DIR", str(root))
    return root


def direct(hub: HubServer, name: str = "w.pt", data: bytes = PAYLOAD) -> WeightSpec:
    hub.files[f"/direct/{name}"] = data
    return WeightSpec("facenet/vggface2", "facenet", url=f"{hub.url}/direct/{name}")


def test_fetch_records_size_and_sha256_in_the_manifest(hub, folder):
    entry = fetch_spec(direct(hub), folder)
    target = folder / "facenet" / "vggface2" / "w.pt"
    assert target.read_bytes() == PAYLOAD
    manifest = json.loads((folder / MANIFEST).read_text())
    record = manifest["entries"]["facenet/vggface2"]
    assert record == entry and record["path"] == "facenet/vggface2/w.pt"
    assert record["files"] == [{"path": "facenet/vggface2/w.pt", "url": f"{hub.url}/direct/w.pt",
                                "size": len(PAYLOAD), "sha256": hashlib.sha256(PAYLOAD).hexdigest()}]
    assert sorted(p.name for p in target.parent.iterdir()) == ["w.pt"]  # no .part, no temp file
    assert sorted(p.name for p in folder.iterdir()) == ["facenet", MANIFEST]


def test_a_cut_download_leaves_only_the_part_file_and_the_next_run_resumes_it(hub, folder):
    hub.mode = "cut"
    with pytest.raises(KitError, match="cut off at 32768 of 65536 bytes") as err:
        fetch_spec(direct(hub), folder)
    assert "\n" not in str(err.value) and "run the same command again to resume" in str(err.value)
    target = folder / "facenet" / "vggface2" / "w.pt"
    assert not target.exists() and not (folder / MANIFEST).exists()
    assert (target.parent / "w.pt.part").read_bytes() == PAYLOAD[:32768]

    hub.mode = "ok"
    fetch_spec(direct(hub), folder)
    assert hub.ranges == [None, "bytes=32768-"]  # asked only for the rest
    assert target.read_bytes() == PAYLOAD and not (target.parent / "w.pt.part").exists()
    assert read_manifest(folder)["facenet/vggface2"]["files"][0]["sha256"] == hashlib.sha256(PAYLOAD).hexdigest()


def test_a_server_that_ignores_ranges_gets_the_whole_file_again(hub, folder):
    part = folder / "facenet" / "vggface2" / "w.pt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"stale bytes of some other file")
    hub.mode = "no-range"
    fetch_spec(direct(hub), folder)
    assert (folder / "facenet" / "vggface2" / "w.pt").read_bytes() == PAYLOAD


def test_a_sha256_mismatch_is_one_line_and_leaves_nothing_under_the_final_name(hub, folder):
    hub.files["/org/tiny/resolve/main/model.safetensors"] = PAYLOAD
    hub.sha_override["model.safetensors"] = "0" * 64
    spec = WeightSpec("timm/tiny", "timm", repo="org/tiny", prefer=("model.safetensors",))
    with pytest.raises(KitError, match="sha256 mismatch") as err:
        fetch_spec(spec, folder)
    assert "\n" not in str(err.value)
    assert not (folder / "timm" / "tiny").exists() or not any((folder / "timm" / "tiny").iterdir())
    assert not (folder / MANIFEST).exists()


def test_a_present_file_is_kept_and_redo_downloads_it_again(hub, folder):
    spec = direct(hub)
    fetch_spec(spec, folder)
    fetch_spec(spec, folder)
    assert hub.ranges == [None]  # the second run downloaded nothing
    fetch_spec(spec, folder, redo=True)
    assert hub.ranges == [None, None]


def _fetch_cli(args: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "utils.weights", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _serve_default_resnet(hub: HubServer) -> str:
    name = timm_spec("resnet50").name
    hub.files[f"/{timm_spec('resnet50').repo}/resolve/main/model.safetensors"] = PAYLOAD
    return name


@pytest.mark.slow
def test_ctrl_c_during_fetch_keeps_no_file_under_its_final_name_and_a_rerun_completes(hub, folder, capsys):
    name = _serve_default_resnet(hub)
    hub.mode = "hold"
    env = {**os.environ, "KIT_WEIGHTS_DIR": str(folder)}
    proc = _fetch_cli(["fetch", "--only", name], env)
    assert hub.sent_half.wait(60)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    hub.release.set()
    assert proc.returncode == 130 and "Traceback" not in err
    target = folder / name / "model.safetensors"
    assert not target.exists() and not (folder / MANIFEST).exists()
    hub.mode = "ok"
    proc = _fetch_cli(["fetch", "--only", name], env)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert target.read_bytes() == PAYLOAD and read_manifest(folder)[name]["files"][0]["size"] == len(PAYLOAD)
    assert weights_main(["list"]) == 1  # the other defaults are missing
    assert "1 of 5 default weights present" in capsys.readouterr().out


def _file_limit(n_bytes: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))


@pytest.mark.slow
def test_a_file_size_limit_during_fetch_is_one_line_naming_the_part_file(hub, folder):
    name = _serve_default_resnet(hub)
    env = {**os.environ, "KIT_WEIGHTS_DIR": str(folder)}
    proc = _fetch_cli(["fetch", "--only", name], env, preexec_fn=_file_limit(10_000))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: {folder / name / 'model.safetensors.part'}: cannot write the download")
    assert not (folder / name / "model.safetensors").exists()


def test_fetch_of_an_unknown_entry_is_one_line(folder):
    with pytest.raises(KitError, match="--only no/such: not a default weight entry; choose from") as err:
        weights_main(["fetch", "--only", "no/such"])
    assert "\n" not in str(err.value) and not folder.exists()


def test_a_fetched_timm_tag_resolves_from_the_folder_offline(hub, folder, monkeypatch):
    import timm
    from safetensors.torch import save

    from utils.embedding.backbone import create_backbone

    torch.manual_seed(0)
    ref = timm.create_model("test_resnet", pretrained=False)  # with its classifier, as on the hub
    spec = timm_spec("test_resnet")
    hub.files[f"/{spec.repo}/resolve/main/model.safetensors"] = save(ref.state_dict())
    hub.files[f"/{spec.repo}/resolve/main/pytorch_model.bin"] = b"the .bin copy is not taken"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KitError, match="pass --weights PATH"):  # not fetched yet: would need the hub
        create_backbone("test_resnet", "default")
    fetch_spec(spec, folder)
    assert [f["path"] for f in read_manifest(folder)[spec.name]["files"]] == [f"{spec.name}/model.safetensors"]
    resolved = resolve_weights("timm", "test_resnet", "default")
    assert resolved.mode == "folder" and resolved.path == folder / spec.name / "model.safetensors"
    model = create_backbone("test_resnet", "default")
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k


def test_a_fetched_facenet_release_resolves_from_the_folder_before_the_torch_cache(hub, folder, monkeypatch):
    from utils.faces.embedder import facenet_release_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KitError, match="not cached and HF_HUB_OFFLINE is set"):
        facenet_release_file("vggface2")
    fetch_spec(direct(hub, "20180402-114759-vggface2.pt"), folder)
    assert facenet_release_file("vggface2") == folder / "facenet" / "vggface2" / "20180402-114759-vggface2.pt"


def test_a_damaged_folder_copy_is_not_used(hub, folder):
    fetch_spec(direct(hub), folder)
    assert find_entry("facenet/vggface2") is not None
    (folder / "facenet" / "vggface2" / "w.pt").write_bytes(b"short")
    assert find_entry("facenet/vggface2") is None
    assert resolve_weights("facenet", "facenet", "vggface2").mode == "hub"


def test_resolve_weights_grammar(tmp_path, folder):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"x")
    assert resolve_weights("timm", "resnet50", "none").mode == "none"
    assert resolve_weights("timm", "resnet50", str(f)) .path == f
    assert resolve_weights("open_clip", "ViT-B-32", "openai").mode == "hub"  # the folder lacks it
    with pytest.raises(KitError, match="weights file not found"):
        resolve_weights("timm", "resnet50", "typo")  # timm takes 'default', 'none' or a file
    write_entry(folder, "open_clip/ViT-B-32/openai", {"path": "open_clip/ViT-B-32/openai/m.bin",
                "files": [{"path": "open_clip/ViT-B-32/openai/m.bin", "size": 1, "sha256": "", "url": ""}]})
    (folder / "open_clip" / "ViT-B-32" / "openai").mkdir(parents=True)
    (folder / "open_clip" / "ViT-B-32" / "openai" / "m.bin").write_bytes(b"x")
    assert resolve_weights("open_clip", "ViT-B-32", "openai").path == folder / "open_clip/ViT-B-32/openai/m.bin"


def test_a_hub_name_resolves_to_its_fetched_folder(hub, folder):
    for name in ("config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5", "README.md"):
        hub.files[f"/Org/cap/resolve/main/{name}"] = name.encode()
    assert resolve_hf_source("Org/cap") == "Org/cap"
    fetch_spec(WeightSpec("hf/Org/cap", "hf", repo="Org/cap"), folder)
    assert resolve_hf_source("Org/cap") == str(folder / "hf" / "Org" / "cap")
    assert sorted(p.name for p in (folder / "hf" / "Org" / "cap").iterdir()) == ["config.json", "model.safetensors"]


def test_a_damaged_manifest_is_one_line(folder):
    folder.mkdir()
    (folder / MANIFEST).write_text("{not json")
    with pytest.raises(KitError, match="not a readable weights manifest"):
        read_manifest(folder)


def test_preflight_line_names_the_defaults_that_would_need_the_hub(hub, folder):
    cl = Checklist()
    check_weights(cl, folder)
    (item,) = cl.items
    assert item.status == WARN and item.detail.startswith(f"0 of {len(DEFAULT_RECIPES)} in {folder}")
    assert "facenet/vggface2 (infer_facenet.py)" in item.detail
    rows = default_status(folder)
    for spec, _, _ in rows:  # every default present (fake bytes: only presence is checked here)
        files = [{"path": f"{spec.name}/f", "size": 1, "sha256": "", "url": ""}]
        (folder / spec.name).mkdir(parents=True, exist_ok=True)
        (folder / spec.name / "f").write_bytes(b"x")
        write_entry(folder, spec.name, {"path": f"{spec.name}/f", "files": files})
    cl = Checklist()
    check_weights(cl, folder)
    assert [(c.status, c.detail) for c in cl.items] == [(OK, f"{len(DEFAULT_RECIPES)} of {len(DEFAULT_RECIPES)} in {folder}")]


def test_the_defaults_list_matches_the_scripts_defaults():
    import infer_caption_match
    import infer_clip_colour
    import infer_cnn_features
    import infer_facenet
    import train_clip_arcface
    import train_resnet

    rows = {(kind, model, tag) for kind, model, tag, _ in DEFAULT_RECIPES}
    for mod in (train_resnet, infer_cnn_features):
        assert ("timm", mod.Config().model, mod.Config().weights) in rows, mod.__name__
    for mod in (train_clip_arcface, infer_clip_colour, infer_caption_match):
        assert ("open_clip", mod.Config().model, mod.Config().weights) in rows, mod.__name__
    assert ("hf", infer_caption_match.Config().captioner, "") in rows
    assert infer_facenet.Config().embedder == "facenet" and ("facenet", "facenet", "vggface2") in rows
    assert facenet_spec("vggface2").name == "facenet/vggface2"


def test_fingerprint_changes_when_the_file_is_replaced(tmp_path):
    from utils.embedding.backbone import weights_id

    f = tmp_path / "w.pt"
    f.write_bytes(b"one")
    before = fingerprint(f)
    assert before == f"3:{f.stat().st_mtime_ns}" and weights_id(str(f)) == f"{f}:{before}"
    f.write_bytes(b"other")
    assert fingerprint(f) != before
    with pytest.raises(KitError, match="not readable"):
        fingerprint(tmp_path / "gone.pt")


def test_load_weights_file_unwraps_and_cleans_and_load_into_reports(tmp_path, caplog):
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    wrapped = {"model": {f"module._orig_mod.{k}": v for k, v in net.state_dict().items()}, "epoch": 3}
    buf = io.BytesIO()
    torch.save(wrapped, buf)
    (tmp_path / "ck.pt").write_bytes(buf.getvalue())
    state = load_weights_file(tmp_path / "ck.pt")
    assert sorted(state) == sorted(net.state_dict())
    partial = {k: v for k, v in state.items() if k.startswith("0.")}
    partial["extra.weight"] = torch.zeros(1)
    with caplog.at_level("INFO"):
        report = load_into(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1)), partial, "ck.pt", strict=False)
    assert (report.missing, report.unexpected, report.n_loaded) == (["1.weight", "1.bias"], ["extra.weight"], 2)
    assert "ck.pt: 2 of 4 tensors loaded, 2 missing, 1 unexpected" in caplog.text
    with pytest.raises(KitError, match="only 1 of 4 tensors match the model"):
        load_into(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1)), {"0.bias": state["0.bias"]}, "ck.pt", strict=False)
