"""Precision users can see: ranking agreement of two score vectors, ``dtype="tf32"``, the
``compare_precision`` function and the ``multitap-rl precision`` command."""

import json
import pickle

import pytest
import torch

from multitap_rl import MultiTapModel
from multitap_rl.cli import main
from multitap_rl.errors import ConfigError, DataError
from multitap_rl.precision import compare_precision, ranking_agreement, tf32_matmuls
from multitap_rl.testing import make_image

TEXTS = ["A red circle.", "A blue square at the top.", "Two dogs on the grass.", "A tree.",
         "Something green.", "A small shape, left.", "Sky.", "A large yellow triangle in the middle."]


def _flags():
    return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision


# -- ranking agreement (pure) ----------------------------------------------------------------------
def test_ranking_agreement_by_hand():
    ref = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    cand = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 0.65, 0.8])  # group 1: members 1 and 2 swap
    a = ranking_agreement(ref, cand, 4)
    assert a.mean_abs_diff == pytest.approx(0.2 / 8) and a.max_abs_diff == pytest.approx(0.15)
    assert a.group_spread == pytest.approx(0.3)
    assert a.same_ranking == 0.5  # group 0 identical, group 1 reordered
    assert a.top1 == 1.0  # both groups keep their best member
    assert a.pair_agreement == pytest.approx(11 / 12)  # 6 + 5 of 6 + 6 pairs
    assert a.advantage_mean_abs_diff > 0
    same = ranking_agreement(ref, ref.clone(), 4)
    assert (same.same_ranking, same.top1, same.pair_agreement, same.max_abs_diff, same.advantage_mean_abs_diff) == \
        (1.0, 1.0, 1.0, 0.0, 0.0)


def test_ranking_agreement_ties_and_top1():
    # the candidate breaks a tie of the reference: a disagreement; its best is still one of the reference's best
    a = ranking_agreement(torch.tensor([0.5, 0.5, 0.1]), torch.tensor([0.51, 0.5, 0.1]), 3)
    assert a.same_ranking == 0.0 and a.pair_agreement == pytest.approx(2 / 3) and a.top1 == 1.0
    b = ranking_agreement(torch.tensor([0.9, 0.5]), torch.tensor([0.4, 0.5]), 2)  # the worst comes first
    assert b.top1 == 0.0 and b.same_ranking == 0.0


def test_ranking_agreement_bad_input():
    with pytest.raises(ConfigError, match="group_size must be an int >= 2"):
        ranking_agreement(torch.zeros(4), torch.zeros(4), 1)
    with pytest.raises(DataError, match="5 samples do not form groups of 2"):
        ranking_agreement(torch.zeros(5), torch.zeros(5), 2)
    with pytest.raises(DataError, match="reference has 4 scores, candidate 2"):
        ranking_agreement(torch.zeros(4), torch.zeros(2), 2)
    with pytest.raises(DataError, match="finite"):
        ranking_agreement(torch.tensor([0.0, float("nan")]), torch.zeros(2), 2)


# -- tf32 ----------------------------------------------------------------------------------------
def test_tf32_context_restores_the_users_settings_exactly():
    before = _flags()
    with tf32_matmuls(True):
        assert _flags() == ("tf32", "tf32")
    assert _flags() == before
    with pytest.raises(RuntimeError, match="boom"), tf32_matmuls(True):
        raise RuntimeError("boom")
    assert _flags() == before
    with tf32_matmuls(False):
        assert _flags() == before
    torch.backends.cuda.matmul.fp32_precision = "ieee"  # a user's own choice survives too
    try:
        with tf32_matmuls(True):
            assert _flags()[0] == "tf32"
        assert _flags()[0] == "ieee"
    finally:
        torch.backends.cuda.matmul.fp32_precision = before[0]


def test_tf32_model_on_cpu_is_plain_fp32(tiny_dirs, tiny_model):
    base, reward = tiny_dirs
    model = MultiTapModel.from_pretrained(reward, base_model=base, device="cpu", dtype="tf32")
    assert model.matmul_precision == "tf32" and model.backbone.dtype == torch.float32
    seen = []
    original = model.engine.features
    model.engine.features = lambda *a, **k: seen.append(_flags()) or original(*a, **k)
    before = _flags()
    images = [make_image(i) for i in range(4)]
    got = model.score(images, TEXTS[:4]).overall
    assert seen == [before] and _flags() == before  # on CPU nothing is switched
    assert torch.equal(got, tiny_model.score(images, TEXTS[:4]).overall)
    # a reward made from it reloads it as tf32 in another process
    from reward_fns import core, multitap_reward

    fn = multitap_reward(model)
    assert fn.spec.dtype == "tf32"
    core.forget_scorers()
    clone = pickle.loads(pickle.dumps(fn))
    assert core.get_scorer(clone.spec).model.matmul_precision == "tf32"
    core.forget_scorers()


def test_tf32_model_on_cuda_switches_around_its_own_forward(tiny_dirs, monkeypatch):
    """No GPU here: the model is made to report a CUDA device, and its forward methods are checked to
    run inside the TF32 context (which is what switches cuBLAS/cuDNN on a real GPU)."""
    base, reward = tiny_dirs
    model = MultiTapModel.from_pretrained(reward, base_model=base, device="cpu", dtype="tf32")
    before = _flags()
    monkeypatch.setattr(MultiTapModel, "device", property(lambda self: torch.device("cuda", 0)))
    with model._matmuls():
        assert _flags() == ("tf32", "tf32")
    assert _flags() == before
    monkeypatch.undo()
    seen = []
    original = model.engine.features
    model.engine.features = lambda *a, **k: seen.append(_flags()) or original(*a, **k)
    monkeypatch.setattr(model, "_matmuls", lambda: tf32_matmuls(True))
    images = [make_image(0), make_image(1)]
    model.score(images, TEXTS[:2])
    model.features(images, TEXTS[:2])
    model(images, TEXTS[:2])
    assert seen == [("tf32", "tf32")] * 3 and _flags() == before
    plain = MultiTapModel.from_pretrained(reward, base_model=base, device="cpu", dtype="fp32")
    assert plain.matmul_precision is None


# -- compare_precision ---------------------------------------------------------------------------------
def test_compare_precision_bf16_and_tf32_against_fp32(tiny_dirs):
    base, reward = tiny_dirs
    images = [make_image(i // 4) for i in range(8)]  # 2 images x 4 captions: 2 groups of 4
    texts = TEXTS[:4] * 2
    bf16, tf32 = compare_precision(reward, images, texts, base_model=base, device="cpu", group_size=4,
                                   candidates=["bf16", "tf32"], batch_size=8)
    assert (bf16.candidate, bf16.reference, bf16.n, bf16.group_size, bf16.device) == ("bf16", "fp32", 8, 4, "cpu")
    # the report is ranking_agreement of the two models' own scores (one call each, as batch_size=8 does)
    ref = MultiTapModel.from_pretrained(reward, base_model=base, device="cpu").score(images, texts).overall
    low = MultiTapModel.from_pretrained(reward, base_model=base, device="cpu", dtype="bf16").score(images, texts).overall
    assert bf16.dims["overall"] == ranking_agreement(ref, low, 4)
    assert 0 < bf16.dims["overall"].max_abs_diff < 0.1
    # TF32 on CPU is float32: nothing differs
    t = tf32.dims["overall"]
    assert (t.max_abs_diff, t.same_ranking, t.pair_agreement) == (0.0, 1.0, 1.0)
    json.dumps(bf16.to_dict())


def test_compare_precision_bad_input(tiny_dirs):
    base, reward = tiny_dirs
    images = [make_image(0)] * 3
    with pytest.raises(DataError, match="3 samples do not form groups of 2"):
        compare_precision(reward, images, TEXTS[:3], base_model=base, group_size=2)
    with pytest.raises(ConfigError, match="precision must be one of"):
        compare_precision(reward, images[:2], TEXTS[:2], base_model=base, group_size=2, candidates=["int8"])
    with pytest.raises(DataError, match="got 3 images but 2 texts"):
        compare_precision(reward, images, TEXTS[:2], base_model=base, group_size=2)


def test_precision_command(tiny_dirs, tmp_path, capsys):
    base, reward = tiny_dirs
    for i in range(2):
        make_image(i).save(tmp_path / f"{i}.png")
    rows = [{"image": f"{i // 2}.png", "text": TEXTS[i]} for i in range(4)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["precision", "--checkpoint", str(reward), "--base-model", str(base), "--device", "cpu",
              "--input", str(tmp_path / "rows.jsonl")]
    assert main([*common, "--group-size", "2", "--candidates", "bf16,tf32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["candidate"] for r in out["reports"]] == ["bf16", "tf32"]
    assert out["reports"][1]["dims"]["overall"]["max_abs_diff"] == 0.0
    assert main([*common, "--group-size", "2"]) == 0
    table = capsys.readouterr().out
    assert "bf16 vs fp32" in table and "same ranking" in table
    assert main([*common, "--group-size", "3"]) == 2
    assert "4 rows do not form groups of 3" in capsys.readouterr().err
    assert main([*common, "--group-size", "2", "--candidates", "int4"]) == 2
    assert "unknown precision 'int4'" in capsys.readouterr().err


def test_tf32_model_trains_and_scores_under_the_same_precision(tiny_dirs, tmp_path, monkeypatch):
    """Stage 1 trains the model's own forward, so a ``dtype: tf32`` recipe trains in the context it
    scores in. No GPU here: the model's context is made to switch on CPU too (what it does on CUDA),
    and the matmul flags are read inside every feature computation, in training and in scoring."""
    pytest.importorskip("accelerate")
    from multitap_rl.training import train_stage1

    base, _ = tiny_dirs
    monkeypatch.setattr(MultiTapModel, "_matmuls", lambda self: tf32_matmuls(self.matmul_precision == "tf32"))
    seen = []
    from multitap_rl.scoring import FeatureEngine

    original = FeatureEngine.features
    monkeypatch.setattr(FeatureEngine, "features", lambda self, *a, **k: seen.append(_flags()) or original(self, *a, **k))
    cfg = {"model": {"base_model": str(base), "image_size": 56, "dtype": "tf32"},
           "data": {"dataset": "shapes", "dataset_kwargs": {"n_train": 8, "n_eval": 4}},
           "train": {"output_dir": str(tmp_path / "out"), "batch_size": 4, "max_steps": 2, "log_every": 1,
                     "progress": False}}
    before = _flags()
    res = train_stage1(cfg)
    trained = len(seen)
    assert trained >= 2 and res.model.matmul_precision == "tf32"
    res.model.score([make_image(0), make_image(1)], TEXTS[:2])
    assert len(seen) > trained and set(seen) == {("tf32", "tf32")} and _flags() == before
