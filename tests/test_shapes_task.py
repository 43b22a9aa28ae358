"""The offline shapes task: right/wrong captions, binary and graded scores, images that show the scene."""

import pytest

from multitap_rl.testing import (
    SHAPE_COLORS,
    ShapeScene,
    draw_shapes_image,
    make_shapes_dataset,
    make_shapes_pairs,
    make_shapes_records,
    shape_caption,
)


def _said(text):
    # "a red circle on the left" -> ("red", "circle", "left")
    words = text.split()
    return words[1], words[2], words[-1]


def test_caption_text():
    assert shape_caption(ShapeScene("red", "circle", "left")) == "a red circle on the left"
    assert shape_caption(ShapeScene("blue", "cross", "center")) == "a blue cross in the center"
    assert shape_caption(ShapeScene("black", "triangle", "top")) == "a black triangle at the top"


def test_binary_scores_say_whether_the_caption_is_right():
    rows = make_shapes_records(200, seed=3, scoring="binary")
    for r in rows:
        truth = (r["color"], r["shape"], r["position"])
        assert r["score"] == (1.0 if _said(r["text"]) == truth else 0.0)
        assert (r["n_wrong"] == 0) == (r["score"] == 1.0)
        # the number of wrong attributes is what the caption gets wrong
        assert sum(a != b for a, b in zip(_said(r["text"]), truth)) == r["n_wrong"]
    frac = sum(r["score"] for r in rows) / len(rows)
    assert 0.35 < frac < 0.65  # p_correct=0.5


def test_graded_scores_are_the_fraction_right():
    rows = make_shapes_records(200, seed=4, scoring="graded")
    seen = set()
    for r in rows:
        right = sum(a == b for a, b in zip(_said(r["text"]), (r["color"], r["shape"], r["position"])))
        assert r["score"] == pytest.approx(right / 3)
        seen.add(round(r["score"], 4))
    assert seen == {0.0, 0.3333, 0.6667, 1.0}


def test_only_the_named_attributes_are_corrupted():
    rows = make_shapes_records(100, seed=5, attributes=["color"], colors=["red", "green"], shapes=["square"],
                               positions=["center"], scoring="graded")
    for r in rows:
        color, shape, pos = _said(r["text"])
        assert (shape, pos) == ("square", "center")
        assert r["score"] == (1.0 if color == r["color"] else 0.0)


def test_same_arguments_same_samples_and_seed_changes_them():
    a = make_shapes_records(20, seed=1)
    b = make_shapes_records(20, seed=1)
    c = make_shapes_records(20, seed=2)
    assert [r["text"] for r in a] == [r["text"] for r in b]
    assert all(x["image"].tobytes() == y["image"].tobytes() for x, y in zip(a, b))
    assert [r["text"] for r in a] != [r["text"] for r in c]


@pytest.mark.parametrize("shape", ["circle", "square", "triangle", "cross"])
@pytest.mark.parametrize("position,centre", [("left", (0.25, 0.5)), ("right", (0.75, 0.5)), ("top", (0.5, 0.25)),
                                             ("bottom", (0.5, 0.75)), ("center", (0.5, 0.5))])
def test_image_shows_the_scene(shape, position, centre):
    img = draw_shapes_image(ShapeScene("red", shape, position), size=112)
    assert img.size == (112, 112) and img.mode == "RGB"
    x, y = int(centre[0] * 112), int(centre[1] * 112)
    assert img.getpixel((x, y + 4)) == SHAPE_COLORS["red"]  # inside the shape, near its centre
    # the opposite side of the image is background
    assert img.getpixel((111 - x if x != 56 else 2, 111 - y if y != 56 else 2)) == (128, 128, 128)


def test_dataset_and_pairs():
    datasets = pytest.importorskip("datasets")
    ds = make_shapes_dataset(8, seed=0, image_size=64, question="Describe the shape.")
    assert isinstance(ds, datasets.Dataset) and len(ds) == 8
    assert type(ds.features["image"]).__name__ == "Image"
    row = ds[0]
    assert row["image"].size == (64, 64) and row["question"] == "Describe the shape."
    assert set(ds.column_names) >= {"image", "text", "score", "color", "shape", "position", "n_wrong"}
    pairs = make_shapes_pairs(10, seed=0, image_size=64)
    for r in pairs:
        assert r["chosen"] != r["rejected"]
        assert r["chosen"].split()[1] in SHAPE_COLORS


@pytest.mark.parametrize("kwargs,match", [
    (dict(n=0), "positive"),
    (dict(n=3, scoring="soft"), "scoring"),
    (dict(n=3, p_correct=1.5), "p_correct"),
    (dict(n=3, attributes=["size"]), "attributes"),
    (dict(n=3, colors=["red"]), "colors"),
    (dict(n=3, colors=["red", "mauve"]), "colors"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_shapes_records(**kwargs)
