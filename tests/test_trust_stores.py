"""Stores and settings that must never give a silent wrong result or a raw error (issue 22).

* a feature store resumed after image files changed under the same data file is refused;
* head statistics whose ``(x - mean) / std`` is not a finite float32 are refused, and a value that
  overflows at run time is that sample's error;
* weights and gates accept any real number (numpy, torch scalars), never bools, NaN or inf;
* a malformed user preset (weights or objective schema) names its file and field; listing the
  presets shows the good ones and names the broken ones.
"""

import json
import math

import numpy as np
import pytest
import torch
from _spies import Counting

from multitap_rl import MultiTapModel
from multitap_rl.errors import ConfigError, DataError, HeadsError, SampleError
from multitap_rl.testing import make_image
from multitap_rl.training.features import extract_features, load_features


@pytest.fixture(scope="module")
def small_model(tiny_dirs):
    base, reward = tiny_dirs
    return MultiTapModel.from_pretrained(reward, base_model=base, device="cpu", image_size=112)


# ---------------------------------------------------------------------------------------------
# 1. feature stores: image files changed between runs
# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def captions(tmp_path):
    """6 caption rows, each with its own image file (relative paths)."""
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(6):
        make_image(i, size=(56, 48)).save(tmp_path / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "text": f"picture number {i}"})
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _overwrite(path, seed):
    make_image(seed, size=(56, 48)).save(path)


def test_resume_over_a_changed_image_file_is_refused_naming_row_and_file(small_model, captions, tmp_path):
    kw = dict(chunk_size=2, batch_size=2, progress=False)

    def stop_after_chunk_0(k):
        if k == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_features(small_model, captions, tmp_path / "s", on_chunk=stop_after_chunk_0, **kw)
    _overwrite(captions.parent / "img" / "1.png", seed=40)  # row 1: in the chunk already written
    with pytest.raises(DataError, match=r"image file of 1 sample\(s\) changed.*data.jsonl: line 2: image .*img/1.png.*"
                                        r"--overwrite"):
        extract_features(small_model, captions, tmp_path / "s", **kw)
    # overwrite starts again: the store then equals a fresh run over the new files
    again = Counting(small_model)
    extract_features(again, captions, tmp_path / "s", overwrite=True, **kw)
    assert len(again.texts) == 6
    fresh = load_features(extract_features(small_model, captions, tmp_path / "fresh", **kw))
    assert torch.equal(load_features(tmp_path / "s").features, fresh.features)


def test_a_finished_store_rerun_over_changed_images_is_refused(small_model, captions, tmp_path):
    kw = dict(chunk_size=4, progress=False)
    extract_features(small_model, captions, tmp_path / "s", **kw)
    rerun = Counting(small_model)
    extract_features(rerun, captions, tmp_path / "s", **kw)  # unchanged: nothing to do
    assert rerun.texts == []
    _overwrite(captions.parent / "img" / "5.png", seed=41)
    with pytest.raises(DataError, match=r"line 6: image .*img/5.png"):
        extract_features(small_model, captions, tmp_path / "s", **kw)
    _overwrite(captions.parent / "img" / "5.png", seed=5)  # the same pixels, written again: resumable
    extract_features(small_model, captions, tmp_path / "s", **kw)


def test_a_changed_image_not_yet_extracted_is_extracted_from_its_new_content(small_model, captions, tmp_path):
    kw = dict(chunk_size=3, progress=False)

    def stop_after_chunk_0(k):
        if k == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_features(small_model, captions, tmp_path / "s", on_chunk=stop_after_chunk_0, **kw)
    _overwrite(captions.parent / "img" / "4.png", seed=42)  # row 4: chunk 1, not written yet
    extract_features(small_model, captions, tmp_path / "s", **kw)
    fresh = load_features(extract_features(small_model, captions, tmp_path / "fresh", **kw))
    assert torch.equal(load_features(tmp_path / "s").features, fresh.features)


def test_a_datasets_image_column_stored_as_paths_is_fingerprinted_by_content(small_model, tmp_path):
    import datasets

    for i in range(4):
        make_image(i, size=(56, 48)).save(tmp_path / f"{i}.png")
    ds = datasets.Dataset.from_dict({"image": [str(tmp_path / f"{i}.png") for i in range(4)],
                                     "text": [f"picture {i}" for i in range(4)]}).cast_column("image", datasets.Image())
    extract_features(small_model, ds, tmp_path / "s", chunk_size=2, progress=False)
    make_image(30, size=(56, 48)).save(tmp_path / "2.png")
    with pytest.raises(DataError, match=r"row 2: image .*2.png"):
        extract_features(small_model, ds, tmp_path / "s", chunk_size=2, progress=False)


def test_images_held_in_the_data_record_no_file_digest(small_model, tmp_path):
    rows = [{"image": make_image(i, size=(56, 48)), "text": f"picture {i}"} for i in range(3)]
    out = extract_features(small_model, rows, tmp_path / "s", chunk_size=2, progress=False)
    from safetensors import safe_open

    with safe_open(str(out / "chunks" / "chunk-000000.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["images"]) == [None, None]
    extract_features(small_model, rows, tmp_path / "s", chunk_size=2, progress=False)  # resumes


# ---------------------------------------------------------------------------------------------
# 2. head statistics: every normalised reward a finite float32
# ---------------------------------------------------------------------------------------------
F32 = np.finfo(np.float32)


def _heads(stats, ranges=None):
    from multitap_rl.heads import RidgeHeads

    return RidgeHeads(["clarity"], torch.zeros(4, 1), torch.zeros(1), stats=stats,
                      meta={"target_ranges": ranges} if ranges else None)


@pytest.mark.parametrize("std", [1e-300, 1e-40, 0.0, -1.0, 1e39])
def test_head_stats_with_a_std_no_float32_normalisation_survives_are_refused(std):
    with pytest.raises(HeadsError, match=r"stats\['clarity'\].*std must be a normal float32"):
        _heads({"clarity": (0.5, std)})
    with pytest.raises(HeadsError, match=r"stats\['clarity'\].*must be finite"):
        _heads({"clarity": (0.5, float("inf"))})


def test_head_stats_are_checked_against_the_dimension_range_and_their_shape():
    # a normal float32 std, but the dimension's range ends normalise beyond float32
    with pytest.raises(HeadsError, match=r"stats\['clarity'\].*range \[0, 1e\+10\] normalises to 1e\+40"):
        _heads({"clarity": (0.0, 1e-30)}, ranges={"clarity": [0, 1e10]})
    assert _heads({"clarity": (0.0, 1e-30)}, ranges={"clarity": [0, 1]}).stats == {"clarity": (0.0, 1e-30)}
    # overall is a sigmoid: its range is [0, 1]
    with pytest.raises(HeadsError, match=r"stats\['overall'\] .*mean is outside the float32 range"):
        _heads({"overall": (1e39, 1.0)})
    for bad in (3, "0.5", (1, 2, 3), (True, 1.0)):
        with pytest.raises(HeadsError, match=r"stats\['clarity'\] must be \[mean, std\]"):
            _heads({"clarity": bad})
    # numpy and torch numbers are numbers
    assert _heads({"clarity": (np.float32(0.5), torch.tensor(0.25))}).stats == {"clarity": (0.5, 0.25)}


def test_a_heads_file_with_a_vanishing_std_is_refused_naming_the_file(tmp_path):
    heads = _heads({"clarity": (0.5, 0.25)})
    heads.save(tmp_path / "h")
    cfg = json.loads((tmp_path / "h" / "heads.json").read_text())
    cfg["stats"]["clarity"] = [0.5, 1e-300]
    (tmp_path / "h" / "heads.json").write_text(json.dumps(cfg))
    from multitap_rl.heads import RidgeHeads

    with pytest.raises(HeadsError, match=r"h: stats\['clarity'\] = \(0.5, 1e-300\)"):
        RidgeHeads.load(tmp_path / "h")


def test_converting_a_legacy_pickle_checks_the_stats_given(tmp_path):
    import joblib
    from sklearn.linear_model import Ridge

    from multitap_rl.heads import convert_legacy_heads

    x = np.random.default_rng(0).normal(size=(20, 4))
    joblib.dump(Ridge(alpha=1.0).fit(x, x[:, 0]), tmp_path / "r.joblib")
    with pytest.raises(HeadsError, match=r"stats\['a'\] = \(0.0, 1e-300\)"):
        convert_legacy_heads(tmp_path / "r.joblib", tmp_path / "safe", names=["a"], trust_legacy=True,
                             stats={"a": (0.0, 1e-300)})
    heads = convert_legacy_heads(tmp_path / "r.joblib", tmp_path / "safe", names=["a"], trust_legacy=True,
                                 stats={"a": (np.float32(0.0), np.float32(2.0))})
    assert heads.stats == {"a": (0.0, 2.0)}


def test_fixed_normalisation_refuses_stats_that_would_give_inf():
    from multitap_rl.combiner import RewardCombiner

    dims = ("overall", "clarity")
    for stats, match in (({"clarity": (0.5, 1e-300)}, "std must be a normal float32"),
                         ({"clarity": 0.5}, r"stats must be \(mean, std\), two numbers"),
                         ({"clarity": ("a", 1)}, r"stats must be \(mean, std\), two numbers")):
        with pytest.raises(ConfigError, match=r"fixed normalisation of 'clarity': .*" + match):
            RewardCombiner("clarity=1", dims, normalize="fixed", stats=stats)
    heads = _heads({"clarity": (0.5, 0.25)})
    heads.stats["clarity"] = (0.5, 1e-300)  # edited after loading: the combiner checks again
    with pytest.raises(ConfigError, match="'clarity'"):
        RewardCombiner("clarity=1", dims, normalize="fixed", stats=heads.stats)


def test_a_normalised_value_that_overflows_at_run_time_is_that_samples_error():
    from multitap_rl.combiner import RewardCombiner

    c = RewardCombiner("clarity=1", ("overall", "clarity"), normalize="fixed", stats={"clarity": (0.0, 1e-30)})
    ok = c({"overall": [0.5, 0.5], "clarity": [1.0, 2.0]})
    torch.testing.assert_close(ok.reward, torch.tensor([1e30, 2e30]))
    # 1e10 / 1e-30 = 1e40: beyond float32 -> sample 1's error, not an inf reward
    with pytest.raises(SampleError, match=r"score 1: clarity: the normalised value .* not finite") as info:
        c({"overall": [0.5, 0.5, 0.5], "clarity": [1.0, 1e10, 2.0]})
    assert info.value.index == 1
    # finite normalised values whose weighted sum overflows float32
    big = RewardCombiner({"overall": 3e38, "clarity": 3e38}, ("overall", "clarity"))
    with pytest.raises(SampleError, match=r"score 0: reward: the weighted sum .* not finite"):
        big({"overall": [1.0], "clarity": [1.0]})


# ---------------------------------------------------------------------------------------------
# 3. weights and gates: any real number
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [np.float32(1.5), np.float64(1.5), np.int64(2), torch.tensor(1.5),
                                   torch.tensor(2, dtype=torch.int32), np.array(1.5)])
def test_weights_and_gates_accept_numpy_and_torch_numbers(value):
    from multitap_rl.combiner import Gate, RunningStats, Weights

    w = Weights.parse({"overall": value, "safety": 1})
    assert w.as_dict() == {"overall": float(value), "safety": 1.0}
    assert all(type(x) is float for _, x in w.pairs)
    assert Weights((("overall", value),)).pairs == (("overall", float(value)),)
    hash(w)  # still hashable (every weight a float)
    g = Gate("safety", value, "penalty", value)
    assert (g.threshold, g.value) == (float(value), float(value)) and type(g.value) is float
    assert RunningStats(np.float32(0.5)).momentum == 0.5


@pytest.mark.parametrize(
    "value, match",
    [
        (np.float32("nan"), "must be a finite number"),
        (torch.tensor(float("inf")), "must be a finite number"),
        (np.float64(1e39), r"= 1e\+39 is beyond float32 range"),
        (True, "must be a number, got bool"),
        (np.bool_(True), "must be a number"),
        (torch.tensor([1.0, 2.0]), "must be a number, got Tensor"),
        ("2", "must be a number, got str"),
    ],
)
def test_weights_refuse_what_is_not_a_finite_number(value, match):
    from multitap_rl.combiner import Gate, Weights

    with pytest.raises(ConfigError, match=r"weight for 'overall' " + match):
        Weights.parse({"overall": value})
    with pytest.raises(ConfigError, match="gate value " + match):
        Gate("safety", 0.5, "penalty", value)


# ---------------------------------------------------------------------------------------------
# 4. malformed user presets: named by file and field; listing shows the good ones
# ---------------------------------------------------------------------------------------------
BROKEN_WEIGHTS = {
    "weights_int": ("weights: 3\n", "field 'weights' must be a mapping"),
    "weight_list": ("weights:\n  overall: [1]\n", "weight for 'overall' must be a number, got list"),
    "weight_text": ("weights:\n  overall: high\n", "weight for 'overall' must be a number, got str"),
    "weight_inf": ("weights:\n  overall: .inf\n", "weight for 'overall' must be a finite number"),
    "twice": ("weights:\n  overall: 1\n  overall: 2\n", r"key 'overall' appears twice .*line 3"),
    "extra_field": ("weights:\n  overall: 1\ngates: [safety<0.5]\n", r"unknown field\(s\) \['gates'\]"),
    "top_list": ("- overall\n", "expected a mapping of dimension -> weight"),
    "description_int": ("weights:\n  overall: 1\ndescription: 3\n", "field 'description' must be a string"),
    "key_int": ("weights:\n  1: 2\n", "dimension names must be strings"),
}
GOOD_SCHEMA = "name: {name}\nsamples: [{{image: img, text: caption}}]\ndimensions: [a]\n"
BROKEN_SCHEMAS = {
    "dims_int": ("name: x\ndimensions: 5\n", "field 'dimensions' must be a list, got int"),
    "samples_int": ("name: x\nsamples: 7\n", "field 'samples' must be a list, got int"),
    "name_list": ("name: [x]\n", "field 'name' must be a non-empty string, got list"),
    "task_int": ("name: x\ntask: 3\n", "task must be one of"),
    "source_list": ("name: x\nsource: [a]\n", "field 'source' must be a string"),
    "id_int": ("name: x\nid_column: 3\n", "field 'id_column'"),
    "view_str": ("name: x\nsamples: [img]\n", "each sample view must be a mapping"),
    "view_image_int": ("name: x\nsamples: [{image: 3, text: t}]\n", r"samples\[0\]: sample view: field 'image'"),
    "view_tag_list": ("name: x\nsamples: [{image: i, text: t, tag: [1]}]\n", "field 'tag' must be a string"),
    "dim_int": ("name: x\ndimensions: [3]\n", r"dimensions\[0\] must be a name or a mapping"),
    "range_int": ("name: x\ndimensions: [{name: a, range: 3}]\n", r"dimension 'a': field 'range' must be \[lo, hi\]"),
    "range_text": ("name: x\ndimensions: [{name: a, range: [0, b]}]\n", "field 'range' must be a finite number"),
    "index_text": ("name: x\ndimensions: [{name: a, index: b}]\n", "field 'index' must be an int"),
    "index_bool": ("name: x\ndimensions: [{name: a, index: [true]}]\n", "field 'index' must be an int"),
    "binarize_text": ("name: x\ndimensions: [{name: a, binarize_at: b}]\n", "field 'binarize_at' must be a finite"),
    "hib_text": ("name: x\ndimensions: [{name: a, higher_is_better: no_thanks}]\n",
                 "field 'higher_is_better' must be true or false"),
    "column_int": ("name: x\ndimensions: [{name: a, column: 3}]\n", "field 'column' must be a non-empty string"),
    "description_list": ("name: x\ndimensions: [{name: a, description: [1]}]\n", "field 'description' must be"),
    "not_utf8": (b"name: \xff\n", "not UTF-8 text"),
}


@pytest.fixture()
def user_presets(tmp_path, monkeypatch):
    wdir, odir = tmp_path / "weights", tmp_path / "objectives"
    wdir.mkdir(), odir.mkdir()
    (wdir / "mine.yaml").write_text("weights:\n  overall: 1\n  safety: 2\ndescription: a good one\n")
    (odir / "mine.yaml").write_text(GOOD_SCHEMA.format(name="mine"))
    for folder, broken in ((wdir, BROKEN_WEIGHTS), (odir, BROKEN_SCHEMAS)):
        for name, (text, _) in broken.items():
            path = folder / f"{name}.yaml"
            path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    monkeypatch.setenv("MULTITAP_WEIGHTS_DIR", str(wdir))
    monkeypatch.setenv("MULTITAP_OBJECTIVES_DIR", str(odir))
    return wdir, odir


@pytest.mark.parametrize("name", sorted(BROKEN_WEIGHTS))
def test_a_broken_weights_preset_is_a_config_error_naming_file_and_field(user_presets, name):
    from multitap_rl.combiner import Weights

    with pytest.raises(ConfigError, match=rf"weights[/\\]{name}\.yaml: .*{BROKEN_WEIGHTS[name][1]}"):
        Weights.parse(name)


@pytest.mark.parametrize("name", sorted(BROKEN_SCHEMAS))
def test_a_broken_schema_preset_is_a_config_error_naming_file_and_field(user_presets, name):
    from multitap_rl.schemas import load_schema

    with pytest.raises(ConfigError, match=rf"objectives[/\\]{name}\.yaml: .*{BROKEN_SCHEMAS[name][1]}"):
        load_schema(name)


def test_listing_presets_shows_the_good_ones_and_names_each_broken_file(user_presets, capsys):
    from multitap_rl.cli import main

    assert main(["presets", "--json"]) == 0
    captured = capsys.readouterr()
    got = json.loads(captured.out)
    assert got["weights"]["mine"] == {"overall": 1.0, "safety": 2.0} and "ti2t_balanced" in got["weights"]
    assert got["schemas"]["mine"]["dimensions"] == ["a"] and "align-anything-ti2t" in got["schemas"]
    assert set(got["broken"]["weights"]) == set(BROKEN_WEIGHTS)
    assert set(got["broken"]["schemas"]) == set(BROKEN_SCHEMAS)
    warnings = captured.err.strip().splitlines()
    assert len(warnings) == len(BROKEN_WEIGHTS) + len(BROKEN_SCHEMAS)
    for name, (_, field) in BROKEN_SCHEMAS.items():
        line = next(w for w in warnings if f"objective schema {name!r}" in w)
        assert f"{name}.yaml" in line and __import__("re").search(field, line), line
    assert main(["presets"]) == 0
    captured = capsys.readouterr()
    assert "mine" in captured.out and "weights_int" not in captured.out and "weights_int.yaml" in captured.err


def test_schema_types_are_checked_when_built_in_python_too():
    from multitap_rl.schemas import Dimension, ObjectiveSchema, SampleView

    with pytest.raises(ConfigError, match=r"dimension 'a': field 'range' must be \[lo, hi\] \(two numbers\), got int"):
        Dimension("a", range=3)
    with pytest.raises(ConfigError, match="field 'higher_is_better' must be true or false"):
        Dimension("a", higher_is_better="no")
    with pytest.raises(ConfigError, match="sample view: field 'text'"):
        SampleView(text=None)
    with pytest.raises(ConfigError, match="dimensions must be a tuple of Dimension"):
        ObjectiveSchema("s", dimensions=("a",))
    assert Dimension("a", binarize_at=np.float32(2), range=(np.int64(0), 1)).range == (0.0, 1.0)
    assert math.isclose(Dimension("a", binarize_at=np.float32(2)).binarize_at, 2.0)
