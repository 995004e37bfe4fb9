"""The local weights folder and its manifest.

    weights/                          ($KIT_WEIGHTS_DIR, default: weights/ in the repository)
      manifest.json                   {"version": 1, "entries": {name: {"kind", "source", "files": [...]}}}
      facenet/vggface2/20180402-114759-vggface2.pt
      timm/timm/resnet50.a1_in1k/model.safetensors
      open_clip/ViT-L-14/openai/open_clip_model.safetensors
      hf/Salesforce/blip2-opt-2.7b/{config.json, model-0000x-of-0000y.safetensors, ...}

Each file of an entry is recorded with its path (relative to the folder), size
and sha256. An entry counts as present when every recorded file exists with its
recorded size; ``python -m utils.weights list --verify`` also checks the sha256.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.atomic import atomic_write_json
from utils.errors import KitError
from utils.file_hash import file_sha256

ENV_DIR = "KIT_WEIGHTS_DIR"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[2]


def weights_dir() -> Path:
    """``$KIT_WEIGHTS_DIR``, else ``weights/`` at the top of the repository."""
    return Path(os.environ.get(ENV_DIR) or REPO_ROOT / "weights")


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest's entries (name -> record); empty when the folder has none.

    Raises:
        KitError: a manifest that is not this kit's.
    """
    path = root / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise KitError(f"{path}: not a readable weights manifest ({err}); delete it and run python -m utils.weights fetch") from None
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION or not isinstance(data.get("entries"), dict):
        raise KitError(f"{path}: not a weights manifest of this kit (needs version {MANIFEST_VERSION} and 'entries')")
    for name, record in data["entries"].items():
        if not _record_ok(record):
            raise KitError(f"{path}: entry {name!r} is not a record of this kit (needs 'path' and 'files', each file with "
                           f"'path', 'size' and 'sha256'); delete the entry or run python -m utils.weights fetch --redo")
    return data["entries"]


def _record_ok(record: Any) -> bool:
    """A manifest record as fetch writes it: ``path`` and a list of files, each with its path, size and sha256."""
    if not isinstance(record, dict) or not isinstance(record.get("path"), str) or not isinstance(record.get("files"), list):
        return False
    return all(isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("size"), int)
               and not isinstance(f.get("size"), bool) and isinstance(f.get("sha256"), str) for f in record["files"])


def write_entry(root: Path, name: str, record: dict[str, Any]) -> None:
    """Add or replace one entry; the manifest is rewritten atomically."""
    entries = read_manifest(root)
    entries[name] = record
    atomic_write_json(root / MANIFEST, {"version": MANIFEST_VERSION, "entries": entries})


@dataclass
class Entry:
    """A manifest entry as found on disk."""

    name: str
    root: Path
    record: dict[str, Any]

    @property
    def files(self) -> list[Path]:
        return [self.root / f["path"] for f in self.record.get("files", [])]

    @property
    def path(self) -> Path:
        """The file of a single-file entry, the folder of a repository entry."""
        return self.root / self.record["path"]

    def problem(self, verify: bool = False) -> str:
        """'' when every file is there with its recorded size (and sha256 with ``verify``), else what is wrong."""
        if not self.record.get("files"):
            return "no files recorded"
        for f, path in zip(self.record["files"], self.files):
            if not path.is_file():
                return f"{path}: missing"
            if path.stat().st_size != f["size"]:
                return f"{path}: {path.stat().st_size} bytes, the manifest says {f['size']}"
            if verify and file_sha256(path) != f["sha256"]:
                return f"{path}: sha256 differs from the manifest's"
        return ""


def find_entry(name: str, root: Path | None = None) -> Entry | None:
    """The entry ``name`` of the weights folder when all its files are present, else None."""
    root = root or weights_dir()
    record = read_manifest(root).get(name)
    if record is None:
        return None
    entry = Entry(name, root, record)
    return None if entry.problem() else entry
