"""Every accepted image form gives the same score; every bad input a clear error naming the sample."""

import io

import numpy as np
import pytest
import torch

from multitap_rl.images import load_image


def _forms(img, tmp_path):
    path = tmp_path / "img.png"
    img.save(path)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    arr = np.asarray(img)
    return {
        "pil": img,
        "path": str(path),
        "pathlike": path,
        "bytes": buf.getvalue(),
        "hf_dict": {"bytes": buf.getvalue(), "path": None},
        "hwc_uint8": arr,
        "chw_float": torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0,
        "hwc_uint8_tensor": torch.from_numpy(arr.copy()),
        "chw_uint8_tensor": torch.from_numpy(arr.copy()).permute(2, 0, 1),
        "rgba": img.convert("RGBA"),
    }


def test_all_forms_score_identically(tiny_model, images, tmp_path):
    forms = _forms(images[0], tmp_path)
    scores = tiny_model.score(list(forms.values()), ["A red circle."] * len(forms)).overall
    assert torch.equal(scores, scores[:1].expand_as(scores)), dict(zip(forms, scores.tolist()))


@pytest.mark.parametrize(
    "bad, match",
    [
        (None, "image 0: missing"),
        ("/no/such/file.png", "image 0: file not found"),
        (b"not an image", "image 0: cannot decode bytes"),
        (np.full((4, 4, 3), 70000, dtype=np.int64), r"image 0: int64 array values span \[70000, 70000\]"),
        (np.zeros((4, 4, 3), dtype=np.complex64), "image 0: arrays must be uint8"),
        (np.zeros((4, 4, 5), dtype=np.uint8), "image 0: expected .H, W, 3."),
        (torch.full((3, 4, 4), float("nan")), "image 0: pixel values contain NaN"),
        (torch.full((3, 4, 4), 2.0), r"image 0: float pixels must lie in \[0, 1\]"),
        (12, "image 0: unsupported type int"),
    ],
)
def test_bad_images(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        load_image(bad, 0)


def test_corrupt_file_names_the_sample(tiny_model, images, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ValueError, match=r"image 1: cannot decode file .*broken.jpg"):
        tiny_model.score([images[0], str(bad)], ["a", "b"])


def test_batch_shape_errors(tiny_model, images):
    with pytest.raises(ValueError, match="got 2 images but 1 texts"):
        tiny_model.score(images[:2], ["a"])
    with pytest.raises(ValueError, match=r"text 1: not valid Unicode: a lone surrogate '\\udc80' at character 1"):
        tiny_model.score(images[:2], ["a", "b\udc80c"])
    with pytest.raises(TypeError, match="text 0: expected str"):
        tiny_model.score(images[:1], [None])
    with pytest.raises(ValueError, match="one question per text"):
        tiny_model.score(images[:2], ["a", "b"], ["q"])
    with pytest.raises(TypeError, match="texts must be a list"):
        tiny_model.score(images[:1], "a caption")


def test_empty_batch(tiny_model):
    out = tiny_model.score([], [])
    assert out.overall.shape == (0,) and out.dims == {}
    assert tiny_model.features([], []).shape == (0, tiny_model.hidden_size)
