"""Stage-2 feature extraction: stores, resumption, data sources, targets, and the CLIs end to end."""

import json

import numpy as np
import pytest
import torch
from _spies import Counting

from multitap_rl import MultiTapModel
from multitap_rl.cli import main
from multitap_rl.heads import RidgeHeads
from multitap_rl.testing import make_image
from multitap_rl.training.features import extract_features, load_features
from multitap_rl.training.stage2 import evaluate_heads, fit_heads, read_targets

DIMS = ("prompt_following", "objective_rules", "clarity", "information_richness", "safety")
WORDS = "a the red green blue circle square left right top small large dog cat tree sky on in with".split()


@pytest.fixture(scope="module")
def small_model(tiny_dirs):
    base, reward = tiny_dirs
    return MultiTapModel.from_pretrained(reward, base_model=base, device="cpu", image_size=112)


def _text(rng, n=(3, 9)):
    return " ".join(rng.choice(WORDS, size=rng.integers(*n)))


@pytest.fixture()
def ti2t_jsonl(tmp_path):
    """10 align-anything-style rows (question, image, two responses, 0-3 rates) with relative paths."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(10):
        make_image(i % 4, size=(56, 48)).save(tmp_path / "img" / f"{i % 4}.png")
        row = {"id": f"q{i}", "image": f"img/{i % 4}.png", "question": _text(rng) + "?",
               "response_1": _text(rng), "response_2": _text(rng)}
        for d in DIMS:
            row[f"{d}_rate_1"], row[f"{d}_rate_2"] = int(rng.integers(0, 4)), int(rng.integers(0, 4))
        rows.append(row)
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def test_extract_jsonl_with_schema_matches_the_model(small_model, ti2t_jsonl, tmp_path):
    path, rows = ti2t_jsonl
    out = extract_features(small_model, path, tmp_path / "store", schema="align-anything-ti2t", chunk_size=4,
                           batch_size=3, progress=False)
    fs = load_features(out)
    assert len(fs) == 20 and fs.names == DIMS
    assert fs.rows.tolist() == [r for r in range(10) for _ in (1, 2)]
    assert fs.samples.tolist() == [0, 1] * 10
    # features and overall are the model's for the same (image, question, response)
    images = [str(path.parent / r["image"]) for r in rows for _ in (1, 2)]
    texts = [r[f"response_{k}"] for r in rows for k in (1, 2)]
    questions = [r["question"] for r in rows for _ in (1, 2)]
    h = small_model.features(images, texts, questions)
    torch.testing.assert_close(fs.features, h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fs.overall, small_model.overall_from_features(h), atol=1e-6, rtol=1e-6)
    # targets: rates binarised at >= 2 as the reference does
    expect = np.array([[float(r[f"{d}_rate_{k}"] >= 2) for d in DIMS] for r in rows for k in (1, 2)])
    np.testing.assert_array_equal(fs.targets, expect)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["checkpoint"] == small_model.info["fingerprint"]
    assert manifest["model"]["hidden_size"] == 64 and manifest["schema"]["name"] == "align-anything-ti2t"


def test_interrupted_extraction_resumes_without_losing_or_repeating_rows(small_model, ti2t_jsonl, tmp_path):
    path, rows = ti2t_jsonl
    kw = dict(schema="align-anything-ti2t", chunk_size=3, batch_size=4, progress=False)  # chunks: 3+3+3+1 rows

    def stop_after_chunk_1(k):
        if k == 1:
            raise KeyboardInterrupt

    first = Counting(small_model)
    with pytest.raises(KeyboardInterrupt):
        extract_features(first, path, tmp_path / "store", on_chunk=stop_after_chunk_1, **kw)
    chunks = tmp_path / "store" / "chunks"
    assert sorted(p.name for p in chunks.iterdir()) == ["chunk-000000.safetensors", "chunk-000001.safetensors"]
    with pytest.raises(ValueError, match="unfinished.*rerun the same `extract` command"):
        load_features(tmp_path / "store")
    assert len(load_features(tmp_path / "store", allow_partial=True)) == 12
    # a crash in the middle of writing chunk 2 leaves only its temporary file
    (chunks / ".chunk-000002.safetensors.tmp").write_bytes(b"half a chunk")

    second = Counting(small_model)
    extract_features(second, path, tmp_path / "store", **kw)
    resumed_rows = [r for r in rows[6:]]  # chunks 2 and 3: rows 6..9, nothing else
    assert second.texts == [r[f"response_{k}"] for r in resumed_rows for k in (1, 2)]
    assert len(first.texts) == 12  # rows 0..5 computed once, in the first run
    assert not list(chunks.glob(".*.tmp"))

    full = Counting(small_model)
    extract_features(full, path, tmp_path / "uninterrupted", **kw)
    a, b = load_features(tmp_path / "store"), load_features(tmp_path / "uninterrupted")
    assert torch.equal(a.features, b.features) and torch.equal(a.overall, b.overall)
    assert a.rows.tolist() == b.rows.tolist() and np.array_equal(a.targets, b.targets)
    third = Counting(small_model)  # a finished store: nothing to do
    extract_features(third, path, tmp_path / "store", **kw)
    assert third.texts == []


def test_a_corrupt_chunk_is_recomputed(small_model, ti2t_jsonl, tmp_path):
    path, _ = ti2t_jsonl
    kw = dict(schema="align-anything-ti2t", chunk_size=5, progress=False)
    extract_features(small_model, path, tmp_path / "s", **kw)
    good = load_features(tmp_path / "s")
    (tmp_path / "s" / "chunks" / "chunk-000001.safetensors").write_bytes(b"\x00" * 10)
    again = Counting(small_model)
    extract_features(again, path, tmp_path / "s", **kw)
    assert len(again.texts) == 10  # rows 5..9 only
    assert torch.equal(load_features(tmp_path / "s").features, good.features)


def test_resume_refuses_a_different_run(small_model, ti2t_jsonl, tmp_path):
    path, _ = ti2t_jsonl
    extract_features(small_model, path, tmp_path / "s", schema="align-anything-ti2t", chunk_size=4, limit=4,
                     progress=False)
    with pytest.raises(ValueError, match="different input or model.*chunk_size: stored 4 vs now 2"):
        extract_features(small_model, path, tmp_path / "s", schema="align-anything-ti2t", chunk_size=2, limit=4,
                         progress=False)
    with pytest.raises(ValueError, match="different input or model.*schema"):
        extract_features(small_model, path, tmp_path / "s", schema="accessibility", chunk_size=4, limit=4,
                         progress=False)
    out = extract_features(small_model, path, tmp_path / "s", schema="align-anything-ti2t", chunk_size=2, limit=4,
                           progress=False, overwrite=True)
    assert len(load_features(out)) == 8
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no feature store"):
        extract_features(small_model, path, tmp_path / "other", schema="align-anything-ti2t", progress=False)


def test_bad_rows_are_named(small_model, ti2t_jsonl, tmp_path):
    path, rows = ti2t_jsonl
    rows = [dict(r) for r in rows]
    rows[6]["image"] = "img/missing.png"
    rows[8]["response_2"] = ""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"bad.jsonl: line 7 \(sample 1\): image: .*not found"):
        extract_features(small_model, bad, tmp_path / "s1", schema="align-anything-ti2t", chunk_size=4,
                         progress=False)
    rows[6]["image"] = rows[5]["image"]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"bad.jsonl: line 9 \(sample 2\): column 'response_2' must be a non-empty string"):
        extract_features(small_model, bad, tmp_path / "s2", schema="align-anything-ti2t", progress=False)
    with pytest.raises(ValueError, match="no such file"):
        extract_features(small_model, tmp_path / "nope.jsonl", tmp_path / "s3", progress=False)


def test_datasets_sources_give_the_same_features(small_model, tmp_path):
    import datasets

    images = [make_image(i, size=(56, 48)) for i in range(4)]
    texts = ["A red circle.", "Two dogs.", "A tree.", "Sky."]
    scores = [0.5, 1.5, None, 3.0]
    for i, img in enumerate(images):
        img.save(tmp_path / f"{i}.png")
    (tmp_path / "d.jsonl").write_text("".join(
        json.dumps({"image": f"{i}.png", "text": t, "score": s}) + "\n" for i, (t, s) in enumerate(zip(texts, scores))))
    ds = datasets.Dataset.from_dict({"image": [str(tmp_path / f"{i}.png") for i in range(4)], "text": texts,
                                     "score": scores}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "disk"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    schema = {"name": "scored", "dimensions": ["score"]}
    got = {}
    for name, src in (("jsonl", tmp_path / "d.jsonl"), ("disk", tmp_path / "disk"),
                      ("parquet", tmp_path / "d.parquet"), ("object", ds)):
        got[name] = load_features(extract_features(small_model, src, tmp_path / f"s_{name}", schema=schema,
                                                   progress=False))
    ref = small_model.features(images, texts)
    for name, fs in got.items():
        torch.testing.assert_close(fs.features, ref, atol=1e-5, rtol=1e-5, msg=name)
        np.testing.assert_array_equal(fs.targets[:, 0], [0.5, 1.5, np.nan, 3.0])


def test_read_targets_in_order_or_by_id(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"a": 1, "b": null}\n{"a": 2.5, "b": 3}\n')
    t = read_targets(tmp_path / "t.jsonl", 2)
    np.testing.assert_array_equal(t["a"], [1, 2.5]) and np.testing.assert_array_equal(t["b"], [np.nan, 3])
    (tmp_path / "t.csv").write_text("id,a\nx,1\ny,\nz,3\n")
    t = read_targets(tmp_path / "t.csv", 2, ids=["z", "x"])
    np.testing.assert_array_equal(t["a"], [3, 1])
    with pytest.raises(ValueError, match="has 2 target rows but the features have 3 samples"):
        read_targets(tmp_path / "t.jsonl", 3)
    with pytest.raises(ValueError, match=r"no targets for 1 sample id\(s\), e.g. \['w'\]"):
        read_targets(tmp_path / "t.csv", 2, ids=["w", "x"])
    (tmp_path / "bad.jsonl").write_text('{"a": "high"}\n')
    with pytest.raises(ValueError, match="row 1, column 'a'.*not a number"):
        read_targets(tmp_path / "bad.jsonl", 1)


def test_fit_and_evaluate_on_a_store_recover_planted_targets(small_model, tmp_path):
    rng = np.random.default_rng(3)
    images = [make_image(i, size=(56 + 4 * (i % 4), 48)) for i in range(20)]
    rows = [{"image": images[i % 20], "text": _text(rng, (3, 11)), "id": f"s{i}"} for i in range(200)]
    schema = {"name": "plain", "id_column": "id", "samples": [{"image": "image", "text": "text"}]}
    fs = load_features(extract_features(small_model, rows, tmp_path / "s", schema=schema, chunk_size=64,
                                        batch_size=32, progress=False))
    assert fs.ids == [f"s{i}" for i in range(200)] and fs.names == ()
    X = fs.features.double().numpy()
    w = rng.normal(size=(64, 2))
    y = X @ w
    y += 0.05 * y.std(0) * rng.normal(size=y.shape)
    order = rng.permutation(200)  # targets file in another order, matched by id
    (tmp_path / "t.jsonl").write_text("".join(
        json.dumps({"id": f"s{i}", "quality": y[i, 0], "detail": y[i, 1], "overall": float(i % 3)}) + "\n"
        for i in order))
    heads, report = fit_heads(fs, tmp_path / "t.jsonl", dims=["quality", "detail"], val_fraction=0.25)
    assert heads.names == ("quality", "detail") and set(heads.stats) == {"quality", "detail", "overall"}
    assert report["quality"]["n"] == 50 and report["quality"]["r2"] > 0.95 and report["detail"]["r2"] > 0.95
    full = evaluate_heads(heads, fs, tmp_path / "t.jsonl")
    assert list(full) == ["quality", "detail", "overall"]  # 'overall' compares the stage-1 score
    with pytest.raises(ValueError, match="holds no targets"):
        fit_heads(fs)


# -- CLI --------------------------------------------------------------------------------------------------------
def _model_args(tiny_dirs):
    base, reward = tiny_dirs
    return ["--checkpoint", str(reward), "--base-model", str(base), "--device", "cpu"]


def test_cli_extract_fit_eval_end_to_end(tiny_dirs, tmp_path, capsys):
    rng = np.random.default_rng(5)
    for i in range(3):
        make_image(i, size=(40, 40)).save(tmp_path / f"{i}.png")
    rows = [{"image": f"{i % 3}.png", "text": _text(rng), "q": "What is it?", "key": f"k{i}",
             "score": float(rng.integers(1, 6))} for i in range(24)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    feats, heads_dir = tmp_path / "feats", tmp_path / "heads"
    assert main(["extract", *_model_args(tiny_dirs), "--data", str(tmp_path / "d.jsonl"), "--out", str(feats),
                 "--question-column", "q", "--id-column", "key", "--target-columns", "score", "--chunk-size", "10",
                 "--no-progress"]) == 0
    assert "24 samples from 24 rows" in capsys.readouterr().out
    assert main(["fit-heads", "--features", str(feats), "--out", str(heads_dir), "--val-fraction", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "score" in out and "held-out rows" in out and (heads_dir / "val_report.json").is_file()
    assert main(["eval", "--features", str(feats), "--heads", str(heads_dir), "--json", str(tmp_path / "r.json")]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:2] == ["dimension", "n"] and "score" in table
    lib = evaluate_heads(RidgeHeads.load(heads_dir), feats)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert list(saved) == list(lib) == ["score"]
    assert saved["score"] == pytest.approx(lib["score"], nan_ok=True)


def test_cli_errors_exit_2_with_a_message(tiny_dirs, tmp_path, capsys):
    import joblib
    from sklearn.linear_model import Ridge

    (tmp_path / "d.jsonl").write_text('{"image": "x.png", "text": "hi"}\n')
    code = main(["extract", *_model_args(tiny_dirs), "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o"),
                 "--schema", "caption", "--target-columns", "a"])
    assert code == 2 and "exclusive" in capsys.readouterr().err
    code = main(["fit-heads", "--features", str(tmp_path / "nowhere"), "--out", str(tmp_path / "h")])
    assert code == 2 and "not a feature store" in capsys.readouterr().err
    joblib.dump(Ridge().fit(np.eye(4), np.arange(8.0).reshape(4, 2)), tmp_path / "legacy.joblib")
    legacy = ["fit-heads", "--from-legacy", str(tmp_path / "legacy.joblib"), "--names", "a,b", "--out",
              str(tmp_path / "h")]
    assert main(legacy) == 2 and "arbitrary code" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()
    assert main([*legacy, "--trust-legacy-pickle"]) == 0
    assert RidgeHeads.load(tmp_path / "h").names == ("a", "b")
