"""utils/ensemble/topk_plan.py on real top-k run folders: the weight search on the candidate unions
finds the informative member, fixed weights are normalised and scored as given, the best fusion wins,
and the fused run it writes is a loadable top-k run that records the choice."""

from __future__ import annotations

import numpy as np
import pytest

from utils.ensemble.topk_plan import fuse_topk_runs, search_topk
from utils.errors import KitError
from utils.runs.topk_run import load_topk_split, make_topk_split, read_meta, save_topk_run

N_ID = 10
SEARCH = {"grid_step": 0.25, "n_random": 50, "top_m": 10, "bootstrap": 10, "seed": 0, "smooth_radius": 0.0}


@pytest.fixture
def runs(tmp_path):
    """Two top-k runs on the same names: "good" embeds each identity near its own centre, "noise" at random."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((N_ID, 8)).astype(np.float32)
    ident = np.repeat(np.arange(N_ID), 2)
    names = {"val": ([f"train/id{i:02d}/real_{k}.jpg" for i in range(N_ID) for k in range(2)],
                     [f"train/id{i:02d}/synth_{k}.png" for i in range(N_ID) for k in range(2)]),
             "test": ([f"q{i:03d}.jpg" for i in range(2 * N_ID)], [f"g{i:03d}.png" for i in range(2 * N_ID)])}
    embed = {"good": lambda: centres[ident] + 0.05 * rng.standard_normal((2 * N_ID, 8)).astype(np.float32),
             "noise": lambda: rng.standard_normal((2 * N_ID, 8)).astype(np.float32)}
    dirs = []
    for name, emb in embed.items():
        splits = {s: make_topk_split(emb(), emb(), q, g, k=5) for s, (q, g) in names.items()}
        dirs.append(save_topk_run(tmp_path / "runs" / name, splits, {"model": name}))
    return dirs


def test_the_search_puts_the_weight_on_the_informative_member(runs):
    fusion, weights, scores = search_topk(runs, ["zscore"], None, SEARCH)
    assert fusion == "zscore" and set(scores) == {"zscore"}
    assert weights.shape == (2,) and weights.sum() == pytest.approx(1.0) and weights[0] > weights[1]
    assert scores["zscore"] == pytest.approx(1000.0)  # every validation query's right answers come first


def test_fixed_weights_are_normalised_and_scored_as_given(runs):
    _, weights, good = search_topk(runs, ["zscore"], [2.0, 0.0], SEARCH)
    assert weights.tolist() == [1.0, 0.0] and good["zscore"] == pytest.approx(1000.0)
    _, weights, noise = search_topk(runs, ["zscore"], [0.0, 3.0], SEARCH)
    assert weights.tolist() == [0.0, 1.0] and noise["zscore"] < 500  # random embeddings: far from perfect


def test_the_best_of_several_fusions_is_chosen(runs):
    fusion, _, scores = search_topk(runs, ["rank", "zscore", "minmax"], [0.1, 0.9], SEARCH)
    assert set(scores) == {"rank", "zscore", "minmax"}
    assert scores[fusion] == max(scores.values())


def test_no_fusion_to_try_is_an_error(runs):
    with pytest.raises(KitError, match="no fusion to try"):
        search_topk(runs, [], None, SEARCH)


def test_fuse_topk_runs_writes_a_fused_topk_run_recording_the_choice(runs, tmp_path):
    out = tmp_path / "runs" / "ensemble"
    choice = fuse_topk_runs(runs, out, ["zscore"], [1.0, 1.0], SEARCH, meta={"model": "ensemble", "config": {"k": 1}})
    assert choice["members"] == ["good", "noise"] and choice["weights"] == [0.5, 0.5]
    assert choice["fusion"] == "zscore" and choice["form"] == "topk" and set(choice["val_score_by_fusion"]) == {"zscore"}
    meta = read_meta(out)
    assert meta["choice"] == choice and meta["config"] == {"k": 1} and [m["name"] for m in meta["members"]] == ["good", "noise"]
    for split in ("val", "test"):
        fused = load_topk_split(out, split, with_embeddings=False)
        member = load_topk_split(runs[0], split)
        assert fused.query_names == member.query_names and fused.gallery_names == member.gallery_names
        assert fused.indices.shape == (2 * N_ID, 5) and fused.query_emb is None
