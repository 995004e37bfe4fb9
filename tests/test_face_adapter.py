"""train_face_adapter.py and utils/faces/adapter.py: per-domain statistics, the residual adapter,
real<->synthetic pairs, the validation gate, and the script end to end on a real face run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import infer_facenet
import train_face_adapter
from utils.embedding.embed import l2_normalize
from utils.errors import KitError
from utils.faces.adapter import Adapter, DomainStats, cross_domain_pairs
from utils.runs.cosine import cosine_similarity
from utils.runs.similarity_io import load_run


def _unit(rng, n, d=16):
    return l2_normalize(rng.normal(size=(n, d)).astype(np.float32))


def test_domain_stats_centre_each_side_and_whiten_the_pooled_covariance():
    rng = np.random.default_rng(0)
    emb = np.r_[_unit(rng, 200) + 0.5, _unit(rng, 300) - 0.5]
    side = np.r_[np.zeros(200, np.int64), np.ones(300, np.int64)]
    centred = DomainStats.fit(emb, side, "center")
    assert np.allclose(centred.means[0], emb[:200].mean(0)) and np.allclose(centred.means[1], emb[200:].mean(0))
    x = centred.transform(emb[:200], 0)
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5) and np.abs(x.mean(0)).max() < 0.1  # the shift is gone
    white = DomainStats.fit(emb, side, "whiten", shrinkage=0.0)
    z = (emb - white.means[side]) @ white.whitener
    assert np.allclose(z.T @ z / len(z), np.eye(16), atol=1e-6)  # unit covariance before re-normalising
    both = white.transform_sides(emb, side)
    assert np.allclose(both[:200], white.transform(emb[:200], 0)) and np.allclose(both[200:], white.transform(emb[200:], 1))
    assert np.array_equal(DomainStats.fit(emb, side, "none").transform(emb, 1), emb)
    with pytest.raises(KitError, match="--domain-stats 'zca'"):
        DomainStats.fit(emb, side, "zca")
    with pytest.raises(KitError, match="--shrinkage"):
        DomainStats.fit(emb, side, "whiten", shrinkage=1.5)


def test_untrained_adapter_is_the_identity_and_pairs_cross_domains():
    x = torch.from_numpy(_unit(np.random.default_rng(1), 5))
    for kind in ("linear", "mlp"):
        assert torch.allclose(Adapter(16, kind, hidden=8)(x), x, atol=1e-6)
    with pytest.raises(KitError, match="--adapter 'deep'"):
        Adapter(16, "deep")
    labels, side = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    a1, p, a2, n = cross_domain_pairs(labels, side)
    assert sorted(zip(a1.tolist(), p.tolist())) == [(0, 1), (1, 0), (2, 3), (3, 2)]  # the same person, real<->synthetic
    assert sorted(zip(a2.tolist(), n.tolist())) == [(0, 3), (1, 2), (2, 1), (3, 0)]  # others, real<->synthetic only


def test_a_candidate_replaces_the_source_only_when_it_wins_on_validation():
    rng = np.random.default_rng(2)
    truth = _unit(rng, 8)
    rel = np.eye(8, dtype=bool)
    source = {"val_query": l2_normalize(truth + 1.5 * _unit(rng, 8)), "val_gallery": truth}
    loser = {"val_query": source["val_query"], "val_gallery": truth[::-1].copy()}  # matches pointed at other people
    winner = {"val_query": truth, "val_gallery": truth}
    assert train_face_adapter.choose({"source": source, "adapter": loser}, rel)[0] == "source"
    assert train_face_adapter.choose({"source": source, "same": dict(source)}, rel)[0] == "source"  # a tie keeps the source
    chosen, scores, tie = train_face_adapter.choose({"source": source, "adapter": loser, "whiten": winner}, rel)
    assert tie is None and scores["source"]["score"] < 1000 and chosen == "whiten" and scores["whiten"]["score"] == 1000 and scores["adapter"]["score"] < scores["source"]["score"]


@pytest.mark.slow
def test_adapter_run_end_to_end_on_a_dlib_face_run(rehearsal_data, tmp_path):
    runs = tmp_path / "runs"
    common = ["--data", str(rehearsal_data), "--runs", str(runs)]
    with pytest.raises(KitError, match="no finished run 'dlib'.*infer_facenet.py"):
        train_face_adapter.main([*common, "--source", "dlib"])
    assert infer_facenet.main([*common, "--embedder", "dlib", "--detector", "none", "--tta", "--workers", "0"]) == 0
    argv = [*common, "--source", "dlib", "--domain-stats", "center", "--epochs", "3", "--patience", "0"]
    assert train_face_adapter.main(argv) == 0
    run, src = load_run(runs / "dlib_adapted"), load_run(runs / "dlib")
    adapt = run.meta["adaptation"]
    assert set(adapt["val"]) == {"source", "center", "center + mlp adapter"}
    best = max(adapt["val"], key=lambda k: (train_face_adapter.rank_key(adapt["val"][k]), k == "source"))
    # validation decided, or where candidates tied at the top score, the harder validation did
    assert adapt["chosen"] == (adapt["tie_break"]["chosen"] if adapt["tie_break"] else best)
    assert run.meta["metrics"]["val"]["score"] == pytest.approx(adapt["val"][best]["score"])  # the gate scored the run's own matrices
    assert run.meta["gallery_norm"] == src.meta["gallery_norm"] == {"norm": "dual_softmax", "temperature": 1.0}  # the source's norm
    if best == "source":
        assert np.allclose(run.splits["test"].sim, src.splits["test"].sim, atol=1e-6)
    else:
        assert not np.allclose(run.splits["test"].sim, src.splits["test"].sim, atol=1e-4)
    assert [h["epoch"] for h in run.meta["history"]] == [1, 2, 3] and (runs / "dlib_adapted" / "last.pt").is_file()
    # each epoch was scored on the matrices the run would hold (normalised as the source's): the kept epoch's score is the
    # gate's score of the adapter (unnormalised cosines rank the gallery otherwise: another mAP)
    best_epoch = max(h["val_score"] for h in run.meta["history"])
    assert best_epoch == pytest.approx(train_face_adapter.rank_key(adapt["val"]["center + mlp adapter"]), abs=1e-9)
    # the same command again: the finished training is reused, the run is the same
    before = run.splits["val"].sim
    assert train_face_adapter.main(argv) == 0
    assert np.array_equal(load_run(runs / "dlib_adapted").splits["val"].sim, before)
    # a run that is not a face run is refused in one line
    (runs / "resnet").mkdir()
    (runs / "resnet" / "meta.json").write_text(json.dumps({"config": {"model": "resnet50"}}))
    with pytest.raises(KitError, match="not a face run"):
        train_face_adapter.main([*common, "--source", "resnet"])


def test_two_training_identities_name_the_data_and_a_fix_that_works(rehearsal_data, tmp_path):
    """With 2 identities one is always held out (at least 1 is): the adapter said '1 training identity: adaptation
    needs at least 2 (lower --val-fraction)', naming no file and a fix that cannot work (any fraction holds one out)."""
    for ident in sorted((rehearsal_data / "train").iterdir())[2:]:
        shutil.rmtree(ident)
    common = ["--data", str(rehearsal_data), "--runs", str(tmp_path / "runs")]
    assert infer_facenet.main([*common, "--embedder", "dlib", "--detector", "none", "--workers", "0"]) == 0
    with pytest.raises(KitError, match=r"data/train: 1 training identity with readable images once the validation split "
                                       r"holds out 1 of 2; adaptation needs at least 2: add identities \(one is always held out\)"):
        train_face_adapter.main([*common, "--source", "dlib", "--epochs", "1"])


def test_cosines_of_adapted_embeddings_stay_cosines():
    a = Adapter(16, "mlp", hidden=8)
    torch.nn.init.normal_(a.f[-1].weight)
    y = a.apply_np(_unit(np.random.default_rng(3), 6))
    sim = cosine_similarity(y, y)
    assert np.allclose(np.diag(sim), 1, atol=1e-5) and sim.dtype == np.float32 and not a.training


@pytest.mark.slow
def test_finetune_trains_only_facenets_last_blocks_and_refuses_dlib(rehearsal_data, tmp_path):
    from facenet_pytorch import InceptionResnetV1

    from utils.faces.finetune import freeze_frozen_norms, unfreeze_last_blocks

    model = InceptionResnetV1()
    names = unfreeze_last_blocks(model, 2)
    assert names == ["last_linear", "last_bn"] and not model.block8.conv2d.weight.requires_grad and model.last_linear.weight.requires_grad
    model.train()
    freeze_frozen_norms(model, names)
    assert model.last_bn.training and not model.repeat_1.training  # frozen BatchNorm statistics stay as loaded
    with pytest.raises(KitError, match="--finetune-blocks 0"):
        unfreeze_last_blocks(model, 0)

    runs = tmp_path / "runs"
    common = ["--data", str(rehearsal_data), "--runs", str(runs)]
    face = ["--detector", "none", "--tta", "--workers", "0", "--embed-batch-size", "16"]
    assert infer_facenet.main([*common, "--embedder", "facenet", "--weights", "none", *face]) == 0
    argv = [*common, "--source", "facenet", "--adapter", "finetune", "--finetune-blocks", "2", "--epochs", "1", "--max-steps", "2",
            "--batch-size", "8", "--m-per-class", "2", "--finetune-lr", "1e-2"]
    assert train_face_adapter.main(argv) == 0
    run = load_run(runs / "facenet_adapted")
    adapt = run.meta["adaptation"]
    assert set(adapt["val"]) == {"source", "finetune 2 blocks"} and adapt["chosen"] in adapt["val"]
    ckpt = torch.load(runs / "facenet_adapted" / "last.pt", weights_only=False)
    from utils.faces.embedder import FaceNetEmbedder
    from utils.seed import seed_everything

    seed_everything(0)  # the source's random init, as infer_facenet made it
    init = FaceNetEmbedder("none", torch.device("cpu")).model.state_dict()
    tuned = ckpt["facenet"]
    assert torch.equal(tuned["block8.conv2d.weight"], init["block8.conv2d.weight"])  # frozen
    assert not torch.equal(tuned["last_linear.weight"], init["last_linear.weight"])  # trained
    assert torch.equal(tuned["repeat_1.0.branch0.bn.running_mean"], init["repeat_1.0.branch0.bn.running_mean"])
    meta = json.loads((runs / "facenet" / "meta.json").read_text())
    meta["config"]["embedder"] = "dlib"
    (runs / "dlib").mkdir()
    (runs / "dlib" / "meta.json").write_text(json.dumps(meta))  # a dlib face run's settings
    with pytest.raises(KitError, match="--adapter finetune.*uses dlib"):
        train_face_adapter.main([*common, "--source", "dlib", "--adapter", "finetune"])


def test_a_source_run_from_before_the_rotation_and_colour_flags_keeps_its_cache_key(tmp_path):
    """A face run whose meta.json predates --detector-rotations, --detector-rotated-stages and
    --face-colour was made upright with colour crops: the adapter rebuilds those settings, and the
    cascade's cache key is the one an upright cascade has (its crops are found again, not redone)."""
    from utils.config import config_to_dict
    from utils.faces.cascade import MTCNN_STAGES, CascadeParams
    from utils.faces.pipeline import build_detector

    old = config_to_dict(infer_facenet.Config(data=tmp_path, runs=tmp_path / "runs", embedder="dlib"))
    for key in ("detector_rotations", "detector_rotated_stages", "face_colour"):
        del old[key]
    (tmp_path / "runs" / "dlib").mkdir(parents=True)
    (tmp_path / "runs" / "dlib" / "meta.json").write_text(json.dumps({"config": old}))
    cfg = train_face_adapter.Config(data=tmp_path, runs=tmp_path / "runs", source="dlib")
    src = train_face_adapter.source_settings(cfg)
    assert src.detector_rotations == [] and src.face_colour == "rgb"
    assert build_detector(src, torch.device("cpu")).params.tag() == CascadeParams(stage_rotations=()).tag()
    # today's defaults rotate in two stages: another key
    assert CascadeParams().tag() != CascadeParams(stage_rotations=()).tag()
    # an old run made with --detector-rotations searched them in every MTCNN stage: read back so, same key
    old["detector_rotations"] = [-15.0, 15.0]
    (tmp_path / "runs" / "dlib" / "meta.json").write_text(json.dumps({"config": old}))
    rotated = build_detector(train_face_adapter.source_settings(cfg), torch.device("cpu")).params
    assert set(rotated.rotated_stages) == set(MTCNN_STAGES)
    assert rotated.tag() == CascadeParams(stage_rotations=(-15.0, 15.0), rotated_stages=MTCNN_STAGES).tag()
    assert "rotated_stages" not in rotated.tag()  # the key such a run had before the field existed
