"""Every script knows torchrun: embedding shards across ranks, rank 0 alone writes the run, and the
scripts that run as one process only refuse to start under torchrun with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import infer_caption_match
import infer_clip_colour
import infer_cnn_features
import infer_facenet
import train_clip_arcface
import train_face_adapter
import train_resnet
from tests.helpers.tiny_models import TINY_VIT
from utils.config import config_from_args
from utils.data.task import prepare_task
from utils.errors import KitError
from utils.runs.similarity_io import load_run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "test_resnet", "--weights", "none", "--img-size", "32", "--workers", "0", "--pixel-k", "0", "--device", "cpu"]


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "cache" not in p.parts}


def _torchrun(script: str, runs: Path, log: Path, argv: list[str], reads_under: Path | None = None) -> None:
    """``script`` on 2 gloo ranks through tests/helpers/rank_writes.py: rank 1's writes under ``runs`` go to ``log``
    (and its reads under ``reads_under`` to LOG.reads.json)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1"}
    if reads_under is not None:
        env["RANK_READS_UNDER"] = str(reads_under)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "tests" / "helpers" / "rank_writes.py"), str(runs), str(log), str(ROOT / script), *argv],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _top10(sim: np.ndarray) -> np.ndarray:
    return np.argsort(-sim, axis=1, kind="stable")[:, :10]


def _same_matrices(one: Path, two: Path) -> None:
    """The runs hold the same names, matrices to float rounding and the same top-10 of every query."""
    solo, sharded = load_run(one), load_run(two)
    for split in ("val", "test"):
        a, b = solo.splits[split], sharded.splits[split]
        assert a.query_names == b.query_names and a.gallery_names == b.gallery_names
        assert np.allclose(a.sim, b.sim, atol=1e-6, rtol=0)
        assert np.array_equal(_top10(a.sim), _top10(b.sim))
    for split, metrics in solo.meta["metrics"].items():
        assert sharded.meta["metrics"][split] == pytest.approx(metrics, abs=1e-6)


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("clip_cfg") / "tiny-vit.json"
    path.write_text(json.dumps(TINY_VIT))
    return str(path)


# each script with what it caches under torchrun: rank 0 writes every cache file, rank 1 none (TINY_CLIP: the tiny tower)
TINY_CLIP = "<tiny-vit.json>"
CACHING = {
    "cnn_features": (infer_cnn_features, "cnn_features", [*TINY], []),
    "cnn_faces": (infer_cnn_features, "cnn_features", [*TINY, "--face-crop", "all"], ["face_cache/face_boxes_*.npz", "face_cache/face_gates_*.npy"]),
    "clip_colour": (infer_clip_colour, "clip_colour", ["--model", TINY_CLIP, "--weights", "none", "--workers", "0", "--device", "cpu",
                                                       "--crop-object", "border"],
                    ["clip_colour/cache/object_crops_*/*.png", "clip_colour/cache/colour_*.npy"]),
    "clip_zeroshot": (train_clip_arcface, "clip_zeroshot", ["--model", TINY_CLIP, "--weights", "none", "--workers", "0", "--device", "cpu",
                                                             "--zero-shot"], []),
}


@pytest.mark.parametrize("case", list(CACHING))
def test_two_gloo_ranks_equal_one_process_and_rank_0_alone_writes_every_file_and_cache(case, rehearsal_data_session, tmp_path, tiny_vit):
    script, run_name, argv, caches = CACHING[case]
    argv = [tiny_vit if a == TINY_CLIP else a for a in argv]
    data, one, two = str(rehearsal_data_session), tmp_path / "one", tmp_path / "two"
    assert script.main(["--data", data, "--runs", str(one), *argv]) == 0
    log = tmp_path / "rank1_writes.json"
    _torchrun(Path(script.__file__).name, two, log, ["--data", data, "--runs", str(two), *argv])
    assert json.loads(log.read_text()) == []  # rank 1 opened nothing for writing under the runs folder, caches included
    assert _files(two) == _files(one)  # rank 0 wrote the same run (and the shared split, and the face cache)
    for pattern in caches:  # ... and as many cache files as the one process (keys may hold the runs folder's path)
        assert len(list(two.glob(pattern))) == len(list(one.glob(pattern))) > 0, pattern
    _same_matrices(one / run_name, two / run_name)


# what the tiny open_clip tower learns with in a few seconds (tests/test_train_clip_arcface.py); --tta with no
# view: the validation between epochs and the final embedding see the same single view
CLIP_TRAIN = ["--weights", "none", "--workers", "0", "--tta", "--embed-dim", "64", "--batch-size", "8", "--unfreeze", "-1",
              "--lr", "1e-3", "--scale", "16", "--margin-deg", "15", "--patience", "0", "--epochs", "2", "--device", "cpu"]


@pytest.mark.slow
def test_train_clip_arcface_embeds_sharded_and_rank_0_alone_writes(rehearsal_data_session, tmp_path, tiny_vit):
    data, runs = rehearsal_data_session, tmp_path / "runs"
    argv = ["--data", str(data), "--runs", str(runs), "--model", tiny_vit, *CLIP_TRAIN]
    log = tmp_path / "rank1_writes.json"
    _torchrun("train_clip_arcface.py", runs, log, argv, reads_under=data)
    assert json.loads(log.read_text()) == []  # rank 1 wrote nothing: no checkpoint, cache, matrix or meta.json
    run = runs / "clip_arcface"
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name in ("val_sim.npy", "test_sim.npy", "meta.json"):
        (sharded / name).write_bytes((run / name).read_bytes())
    meta = json.loads((sharded / "meta.json").read_text())
    assert meta["world_size"] == 2 and [h["epoch"] for h in meta["history"]] == [1, 2]

    # rank 1 embedded its share of the validation (between epochs) and of the test images, not all of them
    read = {Path(p).resolve() for p in json.loads(log.with_suffix(".reads.json").read_text())}
    cfg = config_from_args(train_clip_arcface.Config, train_clip_arcface.build_parser().parse_args(argv))
    task = prepare_task(cfg.data, cfg.runs, cfg.split_params())
    for which in ("val_query", "val_gallery", "test_query", "test_gallery"):
        paths = {p.resolve() for p in getattr(task, which)}
        assert 0 < len(read & paths) < len(paths), which

    # one process reuses the finished 2-rank training and embeds the same best.pt alone: the same matrices
    assert train_clip_arcface.main(argv) == 0
    solo = json.loads((run / "meta.json").read_text())
    assert solo["history"] == meta["history"] and solo["checkpoint"] == meta["checkpoint"] == str(run / "best.pt")
    for name in ("val_sim.npy", "test_sim.npy"):
        a, b = np.load(run / name), np.load(sharded / name)
        assert np.allclose(a, b, atol=1e-5, rtol=0) and np.array_equal(_top10(a), _top10(b))
    # the sharded validation between epochs scored what the final embedding of its best epoch scores
    assert meta["metrics"]["val"]["score"] == pytest.approx(max(h["val_score"] for h in meta["history"]), abs=1e-6)


@pytest.mark.parametrize("script, argv", [
    (infer_facenet, []),
    (infer_caption_match, []),
    (train_face_adapter, []),
    (train_resnet, ["--weights", "none"]),
])
def test_single_process_scripts_refuse_torchrun_before_touching_anything(script, argv, rehearsal_data_session, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    runs = tmp_path / "runs"
    name = Path(script.__file__).name
    with pytest.raises(KitError, match=rf"^{name}: runs as one process only \(.+\); start it with python, not torchrun \(WORLD_SIZE=2\)$"):
        script.main(["--data", str(rehearsal_data_session), "--runs", str(runs), *argv])
    assert not runs.exists()


def test_the_refusal_is_one_line_and_exit_2(rehearsal_data_session, tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1"}
    proc = subprocess.run([sys.executable, "infer_facenet.py", "--data", str(rehearsal_data_session), "--runs", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: infer_facenet.py: runs as one process only")
