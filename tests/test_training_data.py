"""Training data: every bad row is named before training starts; scores map to [0, 1]."""

import math

import pytest
import torch

from multitap_rl.testing import make_image, make_shapes_dataset
from multitap_rl.training.examples import PreferencePairs, ScoredExamples, collate_examples, collate_pairs
from multitap_rl.training.stage1 import pair_metrics, regression_metrics


def _rows(n=4, over=None):
    rows = [{"image": make_image(i), "text": f"caption {i}", "score": i / (n - 1)} for i in range(n)]
    for (i, key), value in (over or {}).items():
        rows[i][key] = value
    return rows


def test_scores_map_from_the_declared_range():
    rows = [{"image": make_image(0), "text": "t", "score": s} for s in (1, 2, 5, 3.5)]
    ex = ScoredExamples(rows, score_range=(1, 5))
    assert ex.scores.tolist() == pytest.approx([0.0, 0.25, 1.0, 0.625])
    item = ex[3]
    assert item["score"] == pytest.approx(0.625) and item["text"] == "t" and item["question"] is None
    batch = collate_examples([ex[0], ex[2]])
    assert batch["texts"] == ["t", "t"] and batch["questions"] is None
    assert batch["scores"].dtype == torch.float32 and batch["scores"].tolist() == [0.0, 1.0]
    assert batch["rows"].tolist() == [0, 2]


@pytest.mark.parametrize("over,match", [
    ({(2, "score"): 1.3}, r"train data: row 2: score 1.3 is outside the declared range \[0, 1\]"),
    ({(1, "score"): -0.1}, "row 1: score -0.1 is outside"),
    ({(3, "score"): float("nan")}, "row 3: score nan is not a finite number"),
    ({(0, "score"): None}, "row 0: score None is not a finite number"),
    ({(0, "score"): "0.5"}, "row 0: score '0.5' is not a finite number"),
    ({(1, "text"): "  "}, "row 1: 'text' is empty"),
    ({(2, "text"): 3}, "row 2: 'text' must be a string"),
    ({(3, "image"): None}, r"row 3: image missing"),
    ({(0, "image"): "/no/such/file.png"}, "row 0: image file not found: /no/such/file.png"),
])
def test_bad_rows_are_named(over, match):
    with pytest.raises(ValueError, match=match):
        ScoredExamples(_rows(over=over))


def test_many_bad_rows_are_summarised():
    rows = _rows(10)
    for r in rows:
        r["score"] = 7.0
    with pytest.raises(ValueError, match=r"row 0: .*row 4: .*\(and 5 more\)"):
        ScoredExamples(rows)


def test_empty_missing_column_and_wrong_types():
    with pytest.raises(ValueError, match="train data is empty"):
        ScoredExamples([])
    with pytest.raises(ValueError, match=r"no column\(s\) \['score'\]"):
        ScoredExamples([{"image": make_image(0), "text": "a"}])
    rows = _rows()
    del rows[2]["score"]
    with pytest.raises(ValueError, match=r"row 2: missing field\(s\) \['score'\]"):
        ScoredExamples(rows, name="eval")
    with pytest.raises(TypeError, match="datasets.Dataset or a list of dicts"):
        ScoredExamples("rows.jsonl")
    with pytest.raises(ValueError, match="score_range"):
        ScoredExamples(_rows(), score_range=(1, 1))


def test_questions_and_relative_paths(tmp_path):
    make_image(0).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "text": "x", "score": 1.0, "q": "Describe."},
            {"image": "a.png", "text": "y", "score": 0.0, "q": None}]
    with pytest.raises(ValueError, match="row 0: image file not found"):
        ScoredExamples(rows, question_column="q")
    ex = ScoredExamples(rows, question_column="q", image_root=tmp_path)
    assert ex[0]["image"] == str(tmp_path / "a.png") and ex[0]["question"] == "Describe."
    assert collate_examples([ex[0], ex[1]])["questions"] == ["Describe.", None]


def test_hf_dataset_images_are_checked_without_decoding(tmp_path):
    pytest.importorskip("datasets")
    from datasets import Dataset, Features, Image, Value

    ds = make_shapes_dataset(6, seed=0, image_size=32)
    ex = ScoredExamples(ds)
    assert len(ex) == 6 and ex[0]["image"].size == (32, 32)
    feats = Features({"image": Image(), "text": Value("string"), "score": Value("float32")})
    missing = Dataset.from_list([{"image": {"path": str(tmp_path / "gone.png"), "bytes": None}, "text": "a",
                                  "score": 0.5}], features=feats)
    with pytest.raises(ValueError, match="row 0: image file not found"):
        ScoredExamples(missing)


def test_preference_pairs():
    img = make_image(1)
    rows = [{"image": img, "chosen": "good", "rejected": "bad"}, {"image": img, "chosen": "ok", "rejected": "meh"}]
    pairs = PreferencePairs(rows)
    batch = collate_pairs([pairs[0], pairs[1]])
    assert batch["texts"] == ["good", "ok", "bad", "meh"] and len(batch["images"]) == 4
    with pytest.raises(ValueError, match="row 1: chosen and rejected texts are identical"):
        PreferencePairs([rows[0], {"image": img, "chosen": "x", "rejected": "x"}])
    by_image = [{"text": "a cat", "chosen": img, "rejected": None}]
    with pytest.raises(ValueError, match="row 0: image missing"):
        PreferencePairs(by_image, pair_kind="image")
    ok = PreferencePairs([{"text": "a cat", "chosen": img, "rejected": make_image(2)}], pair_kind="image")
    assert ok[0]["texts"] == ["a cat", "a cat"]


def test_regression_and_pair_metrics_hand_computed():
    m = regression_metrics(torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 0.0, 0.0]), train_mean=0.5)
    assert m["mse"] == pytest.approx(0.25)  # one error of 1 over 4
    assert m["baseline_mse"] == pytest.approx(0.25)  # every target 0.5 away
    assert m["mse_ratio"] == pytest.approx(1.0)
    # pearson of (0,1,1,0) and (0,1,0,0): cov 0.25/4*... = 1/sqrt(3)
    assert m["pearson"] == pytest.approx(1 / math.sqrt(3))
    p = pair_metrics(torch.tensor([1.0, -2.0, 0.0, 3.0]))
    assert p["pair_accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    want = sum(math.log1p(math.exp(-x)) for x in (1.0, -2.0, 0.0, 3.0)) / 4
    assert p["bt_loss"] == pytest.approx(want)
