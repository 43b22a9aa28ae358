"""Best-of-N reranking, the PPO-style scorer and the rerank CLI."""

import json
import pickle
import sys
from pathlib import Path

import pytest
import torch

from multitap_rl import ModelSpec
from multitap_rl.cli import main
from multitap_rl.errors import ConfigError
from reward_fns import MultiTapScorer, rerank

CANDS = [["A red circle.", "Two dogs.", "A tree near a house.", "Blue."], ["Red.", "A big green square."]]


def test_rerank_orders_by_reward_and_matches_score(tiny_model, images):
    ranked = rerank(tiny_model, images[:2], CANDS)
    assert [len(r) for r in ranked] == [4, 2]
    for img, cands, lst in zip(images[:2], CANDS, ranked):
        scores = tiny_model.score([img] * len(cands), cands).overall
        assert [c.index for c in lst] == sorted(range(len(cands)), key=lambda j: -float(scores[j]))
        for c in lst:
            assert c.text == cands[c.index]
            assert c.reward == pytest.approx(float(scores[c.index]), abs=1e-6) == c.dims["overall"]


def test_rerank_weights_gates_and_errors(tiny_model, images):
    flipped = rerank(tiny_model, images[:1], CANDS[:1], weights={"overall": -1.0})[0]
    plain = rerank(tiny_model, images[:1], CANDS[:1])[0]
    assert [c.index for c in flipped] == [c.index for c in reversed(plain)]
    capped = rerank(tiny_model, images[:1], CANDS[:1], gates=["overall<2:cap=0.25"])[0]
    assert all(c.reward == 0.25 for c in capped)
    with pytest.raises(ValueError, match="unknown dimension"):
        rerank(tiny_model, images[:1], CANDS[:1], weights="safety=1")
    with pytest.raises(ValueError, match="image 1, candidate 1: text: expected str"):
        rerank(tiny_model, images[:2], [["a"], ["b", None]])
    with pytest.raises(ValueError, match="2 images but 1 candidate lists"):
        rerank(tiny_model, images[:2], [["a"]])
    with pytest.raises(ValueError, match=r"image 1, candidate 0: image: missing"):
        rerank(tiny_model, [images[0], None], [["a"], ["b"]])
    assert rerank(tiny_model, images[:1], [[]]) == [[]]


def test_ppo_scorer(tiny_model, tiny_dirs, images):
    scorer = MultiTapScorer(tiny_model, weights="overall=2")
    got = scorer(images[:2], ["A red circle.", "Two dogs."])
    assert got.shape == (2,) and got.dtype == torch.float32
    assert torch.allclose(got, 2 * tiny_model.score(images[:2], ["A red circle.", "Two dogs."]).overall, atol=1e-6)
    full = scorer.score(images[:2], ["A red circle.", "Two dogs."])
    assert set(full.scores) == {"overall"} and torch.equal(full.reward, got)
    base, reward = tiny_dirs
    lazy = MultiTapScorer(ModelSpec(checkpoint=reward, base_model=base, device="cpu"))
    assert torch.allclose(pickle.loads(pickle.dumps(lazy))(images[:1], ["A."]),
                          tiny_model.score(images[:1], ["A."]).overall, atol=1e-6)


def test_rerank_cli(tiny_dirs, tiny_model, images, tmp_path, capsys):
    base, reward = tiny_dirs
    images[0].save(tmp_path / "a.png")
    (tmp_path / "c.txt").write_text("\n".join(CANDS[0]) + "\n\n")
    assert main(["rerank", "--checkpoint", str(reward), "--base-model", str(base), "--device", "cpu",
                 "--image", str(tmp_path / "a.png"), "--candidates", str(tmp_path / "c.txt"), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["reward"] >= rows[-1]["reward"]
    assert main(["rerank", "--checkpoint", str(reward), "--base-model", str(base), "--image", "nope.png",
                 "--candidates", str(tmp_path / "c.txt")]) == 2
    assert "image file not found" in capsys.readouterr().err


def test_best_of_n_example(monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import best_of_n

    ranked = best_of_n.main(["--tiny", "-n", "3", "--max-new-tokens", "4"])
    assert len(ranked) == 2 and all(len(r) == 3 for r in ranked)
    assert all(r[0].reward >= r[-1].reward for r in ranked)


def test_rerank_takes_a_spec_and_checks_weights_before_loading(tiny_dirs, tiny_model, images, monkeypatch):
    base, reward = tiny_dirs
    spec = ModelSpec(checkpoint=reward, base_model=base, device="cpu")
    from_spec = rerank(spec, images[:1], CANDS[:1])[0]
    loaded = rerank(tiny_model, images[:1], CANDS[:1])[0]
    assert [(c.index, c.reward) for c in from_spec] == [(c.index, pytest.approx(c.reward, abs=1e-6)) for c in loaded]
    from reward_fns import core

    core.forget_scorers()
    from multitap_rl.model import MultiTapModel

    monkeypatch.setattr(MultiTapModel, "from_spec", lambda spec: pytest.fail("loaded the model before the weights"))
    with pytest.raises(ConfigError, match="safety"):
        rerank(spec, images[:1], CANDS[:1], weights="safety=1")
    with pytest.raises(TypeError):
        rerank(spec, images[:1], CANDS[:1], "overall=1")  # weights are keyword-only
