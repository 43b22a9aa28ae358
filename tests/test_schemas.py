"""Objective schemas: presets as data, user YAML, row expansion, bad schemas and rows."""

import math

import pytest

from multitap_rl.schemas import PRESETS, Dimension, ObjectiveSchema, list_schemas, load_schema


def test_presets_name_the_reference_dimensions():
    ti2t = load_schema("align-anything-ti2t")
    assert ti2t.task == "instruction"
    assert ti2t.names == ("prompt_following", "objective_rules", "clarity", "information_richness", "safety")
    t2i = load_schema("align-anything-t2i")
    assert t2i.task == "caption"
    assert t2i.names == ("prompt_following", "objective_rules", "aesthetics", "information_richness", "safety")
    assert len(load_schema("visionreward").names) == 5
    assert load_schema("caption").names == ()
    assert {"align-anything-ti2t", "align-anything-t2i", "visionreward", "caption", "accessibility"} <= set(
        list_schemas())


def test_align_anything_row_becomes_two_binarised_samples():
    row = {"question": "What is this?", "image": "img.png", "response_1": "A cat.", "response_2": "A dog.",
           **{f"{d}_rate_1": 3 for d in ("prompt_following", "objective_rules", "clarity",
                                         "information_richness", "safety")},
           **{f"{d}_rate_2": r for d, r in zip(("prompt_following", "objective_rules", "clarity",
                                                "information_richness", "safety"), (0, 1, 2, None, 3))}}
    s1, s2 = load_schema("align-anything-ti2t").expand(row, 7)
    assert (s1["text"], s1["question"], s1["image"], s1["sample"]) == ("A cat.", "What is this?", "img.png", 0)
    assert s1["targets"] == [1.0] * 5
    assert s2["targets"][:3] == [0.0, 0.0, 1.0] and math.isnan(s2["targets"][3]) and s2["targets"][4] == 1.0
    t2i = load_schema("align-anything-t2i").expand(
        {"prompt": "a red cat", "image_1": "a.png", "image_2": "b.png", "aesthetics_rate_2": 2.5}, 0)
    assert [s["image"] for s in t2i] == ["a.png", "b.png"] and t2i[0]["question"] is None
    assert t2i[1]["targets"][2] == 1.0 and math.isnan(t2i[0]["targets"][2])


def test_user_yaml_schema_with_list_columns(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "name: mine\n"
        "samples: [{image: img, text: caption}]\n"
        "dimensions:\n"
        "  - {name: checklist_a, column: answers, index: [0, 1]}\n"
        "  - {name: second, column: answers, index: 2, range: [0, 1]}\n"
        "  - plain\n"
    )
    schema = load_schema(path)
    assert schema.task == "caption" and schema.names == ("checklist_a", "second", "plain")
    (s,) = schema.expand({"img": "x.png", "caption": "hi", "answers": [1, 0, 1], "plain": 4.5}, 0)
    assert s["targets"] == [0.5, 1.0, 4.5]
    assert ObjectiveSchema.from_dict(schema.to_dict()) == schema  # round trip
    acc = load_schema("accessibility")  # recipes/objectives/accessibility.yaml
    assert acc.task == "instruction" and acc.id_column == "id"
    assert not next(d for d in acc.dimensions if d.name == "afraidness").higher_is_better


@pytest.mark.parametrize(
    "data, match",
    [
        ({"name": "x", "dimensions": ["overall"]}, "'overall' is the stage-1 score"),
        ({"name": "x", "dimensions": ["a", "a"]}, "repeat"),
        ({"name": "x", "dimensions": [{"name": "a", "weight": 2}]}, r"unknown key\(s\) \['weight'\]"),
        ({"name": "x", "task": "instruction", "samples": [{"image": "i", "text": "t"}]}, "needs a question column"),
        ({"name": "x", "task": "video"}, "task must be one of"),
        ({"name": "x", "dimensions": [{"name": "a", "range": [1, 0]}]}, "lo < hi"),
        ({"dimensions": []}, "needs a 'name'"),
        ({"name": "x", "samples": [{"image": "a", "text": "b"}, {"image": "c", "text": "d"}]}, "distinct tags"),
    ],
)
def test_bad_schemas_are_clear_errors(data, match):
    with pytest.raises(ValueError, match=match):
        ObjectiveSchema.from_dict(data)


@pytest.mark.parametrize(
    "row, match",
    [
        ({"text": "hi", "score": 1}, r"row 4: missing image column 'image'"),
        ({"image": "a.png", "text": "  ", "score": 1}, "row 4: column 'text' must be a non-empty string"),
        ({"image": "a.png", "text": "hi", "score": "high"}, "row 4: column 'score' must be a number"),
        ({"image": "a.png", "text": "hi", "score": 7}, r"row 4: score = 7 .* outside its range \[0, 5\]"),
    ],
)
def test_bad_rows_name_the_row_and_column(row, match):
    schema = ObjectiveSchema("s", (Dimension("score", range=(0, 5)),))
    with pytest.raises(ValueError, match=match):
        schema.expand(row, 4)


def test_unknown_schema_lists_the_available_ones():
    with pytest.raises(ValueError, match="available: .*align-anything-ti2t"):
        load_schema("nope")
    assert set(PRESETS) <= set(list_schemas())
