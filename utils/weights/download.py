"""Download weight files into the weights folder: never a partial file under its final name.

    >>> record = fetch_spec(facenet_spec("vggface2"), weights_dir())   # downloads, verifies, records

A file is streamed into ``<name>.part`` while its sha256 is computed, checked
against the size the server announced and the sha256 the hub publishes (LFS
files), then renamed. An interrupted download leaves only the ``.part`` file;
the next run asks the server for the rest (an HTTP range) or starts again.
Hugging Face repositories are listed through the hub's API at ``$HF_ENDPOINT``
(default ``https://huggingface.co``); ``$HF_TOKEN`` is sent when set.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from utils.errors import KitError
from utils.file_hash import file_sha256
from utils.progress import ProgressBar
from utils.weights.catalog import WeightSpec
from utils.weights.store import write_entry

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0
SKIP_SUFFIXES = (".h5", ".msgpack", ".onnx", ".ot", ".md", ".tflite")  # other frameworks' copies, docs


@dataclass(frozen=True)
class RemoteFile:
    """One file to download: where from, where to (relative to the entry folder), what to expect."""

    url: str
    rel: str
    size: int | None = None
    sha256: str | None = None


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _request(url: str, headers: dict[str, str] | None = None):
    headers = dict(headers or {})
    token = os.environ.get("HF_TOKEN", "")
    if token and url.startswith(hub_endpoint()):
        headers["Authorization"] = f"Bearer {token}"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        raise KitError(f"{url}: download failed (HTTP {err.code} {err.reason})") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise KitError(f"{url}: download failed ({reason}); check the network or $HF_ENDPOINT") from None


def hub_files(spec: WeightSpec) -> list[RemoteFile]:
    """The files of ``spec``'s repository to download, from the hub's API (with sizes and LFS sha256).

    Raises:
        KitError: the hub cannot be reached, or the repository lacks the files.
    """
    api = f"{hub_endpoint()}/api/models/{spec.repo}?blobs=true"
    with _request(api) as resp:
        try:
            siblings = json.loads(resp.read()).get("siblings") or []
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise KitError(f"{api}: not a hub model listing") from None
    files = {s["rfilename"]: s for s in siblings if isinstance(s, dict) and "rfilename" in s}
    if spec.prefer:
        names = [next((f for f in spec.prefer if f in files), "")]
        if not names[0]:
            raise KitError(f"{spec.repo}: none of {list(spec.prefer)} in the repository (it holds {sorted(files)[:8]})")
    else:
        has_safetensors = any(n.endswith(".safetensors") for n in files)
        names = [n for n in sorted(files) if not n.startswith(".") and not n.endswith(SKIP_SUFFIXES)
                 and not (has_safetensors and (n.endswith(".bin") or n.endswith(".bin.index.json")))]
    out = []
    for name in names:
        if ".." in PurePosixPath(name).parts or name.startswith("/"):
            raise KitError(f"{spec.repo}: refusing the file name {name!r} (leaves the folder)")
        lfs = files[name].get("lfs") or {}
        size = lfs.get("size", files[name].get("size"))
        out.append(RemoteFile(f"{hub_endpoint()}/{spec.repo}/resolve/main/{name}", name, size, lfs.get("sha256")))
    return out


def remote_files(spec: WeightSpec) -> list[RemoteFile]:
    """What to download for ``spec``: its URL, or its repository's files."""
    if spec.url:
        return [RemoteFile(spec.url, PurePosixPath(spec.url.split("?")[0]).name)]
    return hub_files(spec)


def _resume_offset(part: Path, h: "hashlib._Hash") -> int:
    """Hash what ``part`` already holds; its size is where the download continues."""
    if not part.is_file():
        return 0
    with open(part, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(chunk)
    return part.stat().st_size


def _stream(resp, part: Path, mode: str, h, total: int | None, done: int, url: str) -> int:
    with open(part, mode) as f, ProgressBar(part.name.removesuffix(".part"), total=total) as bar:
        bar.advance(done)
        while True:
            try:
                chunk = resp.read(CHUNK_BYTES)
            except (OSError, ValueError, http.client.HTTPException) as err:  # reset, timeout, IncompleteRead
                raise KitError(f"{url}: download cut off at {done} bytes ({type(err).__name__}); "
                               f"{part} is kept: run the same command again to resume") from None
            if not chunk:
                break
            f.write(chunk)
            h.update(chunk)
            done += len(chunk)
            bar.advance(len(chunk))
        f.flush()
        os.fsync(f.fileno())
    return done


def download_file(remote: RemoteFile, dest: Path, redo: bool = False) -> dict[str, Any]:
    """Download ``remote`` to ``dest`` through ``dest.part`` (resumed when present); its manifest record.

    A file already at ``dest`` is kept when its sha256 (and size) match what the
    server publishes, or when nothing is published; ``redo`` downloads it again.

    Raises:
        KitError: network error (the part file stays, to resume), short download,
            sha256 mismatch (the part file is removed), or a disk error.
    """
    part = dest.with_name(dest.name + ".part")
    if dest.is_file() and not redo:
        sha = file_sha256(dest)
        if remote.sha256 in (None, sha) and remote.size in (None, dest.stat().st_size):
            log.info("%s: present (%d bytes)", dest, dest.stat().st_size)
            return {"path": "", "url": remote.url, "size": dest.stat().st_size, "sha256": sha}
    if redo:
        part.unlink(missing_ok=True)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        done = _resume_offset(part, h)
        resp = _request(remote.url, {"Range": f"bytes={done}-"} if done else None)
        with resp:
            if done and resp.status != 206:  # the server ignores ranges: start again
                log.info("%s: the server does not resume; downloading from the start", remote.url)
                h, done = hashlib.sha256(), 0
            length = resp.headers.get("Content-Length")
            total = done + int(length) if length and length.isdigit() else remote.size
            done = _stream(resp, part, "ab" if done else "wb", h, total, done, remote.url)
    except OSError as err:  # the disk, not the network (_request and _stream raise KitError for those)
        raise KitError(f"{part}: cannot write the download ({err.strerror or err}); free space or set $KIT_WEIGHTS_DIR") from None
    return _finish(remote, part, dest, done, total, h.hexdigest())


def _finish(remote: RemoteFile, part: Path, dest: Path, done: int, total: int | None, sha: str) -> dict[str, Any]:
    """Check a complete ``part`` and move it to ``dest``."""
    if total is not None and done != total:
        raise KitError(f"{remote.url}: download cut off at {done} of {total} bytes; {part} is kept: "
                       "run the same command again to resume")
    if remote.sha256 and sha != remote.sha256:
        part.unlink(missing_ok=True)
        raise KitError(f"{dest}: sha256 mismatch (got {sha[:16]}..., the hub publishes {remote.sha256[:16]}...); "
                       "the download was removed: run fetch again")
    os.replace(part, dest)
    log.info("%s: %d bytes, sha256 %s", dest, done, sha[:16])
    return {"path": "", "url": remote.url, "size": done, "sha256": sha}


def fetch_spec(spec: WeightSpec, root: Path, redo: bool = False) -> dict[str, Any]:
    """Download every file of ``spec`` into ``root/<spec.name>/`` and record the entry in the manifest.

    Raises:
        KitError: see :func:`download_file`; the manifest keeps its earlier entries.
    """
    folder = root / spec.name
    files = []
    for remote in remote_files(spec):
        record = download_file(remote, folder / remote.rel, redo=redo)
        record["path"] = (PurePosixPath(spec.name) / remote.rel).as_posix()
        files.append(record)
    entry = {
        "kind": spec.kind,
        "source": spec.url or f"{hub_endpoint()}/{spec.repo}",
        "path": files[0]["path"] if spec.single_file else spec.name,
        "files": files,
        "fetched_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_entry(root, spec.name, entry)
    return entry
