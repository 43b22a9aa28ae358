"""Best-of-N reranking, the PPO-style scorer and the rerank CLI."""

import json
import pickle
import sys
from pathlib import Path

import pytest
import torch

from multitap_rl.cli import main
from reward_fns import MultiTapScorer, rerank

CANDS = [["A red circle.", "Two dogs.", "A tree near a house.", "Blue."], ["Red.", "A big green square."]]


def test_rerank_orders_by_reward_and_matches_score(tiny_model, images):
    ranked = rerank(images[:2], CANDS, model_or_path=tiny_model)
    assert [len(r) for r in ranked] == [4, 2]
    for img, cands, lst in zip(images[:2], CANDS, ranked):
        scores = tiny_model.score([img] * len(cands), cands).overall
        assert [c.index for c in lst] == sorted(range(len(cands)), key=lambda j: -float(scores[j]))
        for c in lst:
            assert c.text == cands[c.index]
            assert c.reward == pytest.approx(float(scores[c.index]), abs=1e-6) == c.dims["overall"]


def test_rerank_weights_gates_and_errors(tiny_model, images):
    flipped = rerank(images[:1], CANDS[:1], {"overall": -1.0}, model_or_path=tiny_model)[0]
    plain = rerank(images[:1], CANDS[:1], model_or_path=tiny_model)[0]
    assert [c.index for c in flipped] == [c.index for c in reversed(plain)]
    capped = rerank(images[:1], CANDS[:1], model_or_path=tiny_model, gates=["overall<2:cap=0.25"])[0]
    assert all(c.reward == 0.25 for c in capped)
    with pytest.raises(ValueError, match="unknown dimension"):
        rerank(images[:1], CANDS[:1], "safety=1", model_or_path=tiny_model)
    with pytest.raises(ValueError, match="image 1, candidate 1: text: empty text"):
        rerank(images[:2], [["a"], ["b", " "]], model_or_path=tiny_model)
    with pytest.raises(ValueError, match="2 images but 1 candidate lists"):
        rerank(images[:2], [["a"]], model_or_path=tiny_model)
    with pytest.raises(ValueError, match=r"image 1, candidate 0: image: missing"):
        rerank([images[0], None], [["a"], ["b"]], model_or_path=tiny_model)
    assert rerank(images[:1], [[]], model_or_path=tiny_model) == [[]]


def test_ppo_scorer(tiny_model, tiny_dirs, images):
    scorer = MultiTapScorer(tiny_model, weights="overall=2")
    got = scorer(images[:2], ["A red circle.", "Two dogs."])
    assert got.shape == (2,) and got.dtype == torch.float32
    assert torch.allclose(got, 2 * tiny_model.score(images[:2], ["A red circle.", "Two dogs."]).overall, atol=1e-6)
    full = scorer.score(images[:2], ["A red circle.", "Two dogs."])
    assert set(full.dims) == {"overall"}
    base, reward = tiny_dirs
    lazy = MultiTapScorer(reward, base_model=base, device="cpu")
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


def test_rerank_model_keyword_is_a_deprecated_alias(tiny_model, images):
    with pytest.warns(DeprecationWarning, match="model_or_path"):
        old = rerank(images[:1], CANDS[:1], model=tiny_model)[0]
    new = rerank(images[:1], CANDS[:1], model_or_path=tiny_model)[0]
    assert [(c.index, c.reward) for c in old] == [(c.index, c.reward) for c in new]
