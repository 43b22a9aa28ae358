"""Contract of the DDPO reward: ``reward_fn(images, prompts, metadata) -> (rewards, info)``."""

import inspect
import pickle

import numpy as np
import pytest
import torch

from reward_fns.ddpo import DDPOReward, ddpo_reward

PROMPTS = ("a red circle on the left", "a dog next to a tree", "two blue squares")


@pytest.fixture(scope="module")
def u8():
    """(3, 40, 48, 3) uint8 images; as floats k/255 they round back to the same bytes in any dtype."""
    return np.random.default_rng(0).integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def floats(u8):
    return torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture(scope="module")
def model_with_heads(tiny_model):
    """The tiny model with two stage-2 ridge dimensions (random coefficients)."""
    from multitap_rl.heads import RidgeHeads
    from multitap_rl.model import MultiTapModel

    g = torch.Generator().manual_seed(0)
    coef = (torch.randn(tiny_model.hidden_size, 2, generator=g) / tiny_model.hidden_size**0.5).numpy()
    heads = RidgeHeads(["clarity", "safety"], coef, np.zeros(2), stats={"clarity": (0.0, 1.0), "safety": (0.0, 1.0)})
    return MultiTapModel(tiny_model.backbone, tiny_model.reward_head, heads=heads,
                         info={"checkpoint": "<tiny model with ridge heads>"}).eval()


def test_contract(tiny_model, floats):
    fn = ddpo_reward(tiny_model)
    assert isinstance(fn, DDPOReward) and fn.__name__ == "multitap"
    assert list(inspect.signature(fn).parameters)[:3] == ["images", "prompts", "metadata"]
    rewards, info = fn(floats, PROMPTS, ({}, {}, {}))
    assert isinstance(rewards, torch.Tensor) and rewards.shape == (3,)
    assert rewards.dtype == torch.float32 and rewards.device.type == "cpu" and not rewards.requires_grad
    assert set(info) == {"overall"} and info["overall"].shape == (3,)
    # default weights: overall=1 -> the reward is the stage-1 score of the caption layout
    ref = tiny_model.score(list(floats), list(PROMPTS))
    assert torch.allclose(rewards, ref.overall, atol=1e-6)
    assert torch.equal(info["overall"], rewards)


def test_prompt_is_scored_as_the_caption(tiny_model):
    prompt = tiny_model.backbone.prompt("a dog", None)
    user = prompt.index("Describe this image.")
    image = prompt.index("<|vision_start|><|image_pad|><|vision_end|>")
    assert user < prompt.index("<|im_start|>assistant") < image < prompt.index("a dog<|im_end|>")


def test_all_image_formats_agree(tiny_model, u8, floats):
    from PIL import Image

    fn = ddpo_reward(tiny_model)
    want, _ = fn(floats, PROMPTS, None)
    formats = {
        "float16": floats.half(),
        "bfloat16": floats.bfloat16(),
        "uint8 numpy (B,H,W,3)": u8,
        "uint8 tensor (B,H,W,3)": torch.from_numpy(u8),
        "float numpy (B,3,H,W)": floats.numpy(),
        "list of PIL": [Image.fromarray(a) for a in u8],
    }
    for name, images in formats.items():
        got, info = fn(images, PROMPTS, None)
        assert torch.allclose(got, want, atol=1e-6), name


def test_pickle_round_trip(tiny_model, floats):
    fn = ddpo_reward(tiny_model, weights={"overall": 2.0})
    clone = pickle.loads(pickle.dumps(fn))
    assert clone.__name__ == fn.__name__ and "_model" not in vars(clone)
    assert torch.allclose(clone(floats, PROMPTS, None)[0], fn(floats, PROMPTS, None)[0])


def test_info_carries_every_dimension_and_weights_apply(model_with_heads, floats):
    fn = ddpo_reward(model_with_heads, weights="overall=1,clarity=0.5,safety=-2")
    rewards, info = fn(floats, PROMPTS, None)
    assert set(info) == {"overall", "clarity", "safety"}
    assert all(v.shape == (3,) and v.dtype == torch.float32 for v in info.values())
    hand = info["overall"] + 0.5 * info["clarity"] - 2.0 * info["safety"]
    assert torch.allclose(rewards, hand, atol=1e-6)


def test_gates_reported(model_with_heads, floats):
    fn = ddpo_reward(model_with_heads, gates=["safety<100:cap=-5"])  # every sample gated
    rewards, info = fn(floats, PROMPTS, None)
    assert info["gated"].dtype == torch.bool and bool(info["gated"].all())
    assert torch.allclose(rewards, torch.full((3,), -5.0))


def test_unknown_weight_rejected_at_construction(tiny_model):
    with pytest.raises(ValueError, match=r"unknown dimension\(s\) \['clarity'\]"):
        ddpo_reward(tiny_model, weights="clarity=1")


def test_empty_batch(tiny_model):
    rewards, info = ddpo_reward(tiny_model)(torch.zeros(0, 3, 8, 8), (), ())
    assert rewards.shape == (0,) and rewards.dtype == torch.float32 and info["overall"].shape == (0,)


@pytest.mark.parametrize("images,prompts,metadata,err,match", [
    (torch.rand(3, 32, 32), ("a",), None, ValueError, r"shape \(3, 32, 32\).*add the batch dimension"),
    (torch.rand(1, 1, 2, 3, 4), ("a",), None, ValueError, "got an array of shape"),
    (torch.rand(2, 5, 8, 8), ("a", "b"), None, ValueError, "images must have 3 channels"),
    (torch.rand(2, 3, 8, 8) * 1.5, ("a", "b"), None, ValueError, r"image 0: float pixels must lie in \[0, 1\]"),
    (torch.cat([torch.rand(1, 3, 8, 8), torch.full((1, 3, 8, 8), float("nan"))]), ("a", "b"), None,
     ValueError, "image 1: pixel values contain NaN"),
    (torch.rand(2, 3, 8, 8), ("a",), None, ValueError, "2 images but 1 prompts"),
    (torch.rand(2, 3, 8, 8), ("a", None), None, TypeError, "prompt 1: expected str"),
    (torch.rand(2, 3, 8, 8), ("a", "  "), None, ValueError, "prompt 1: empty prompt"),
    (torch.rand(1, 3, 8, 8), "a", None, TypeError, "prompts must be a tuple or list"),
    (torch.rand(2, 3, 8, 8), ("a", "b"), ({},), ValueError, "1 metadata entries for 2 images"),
    (torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.int32), ("a", "b"), None, TypeError, "float in"),
    ("images.png", ("a",), None, TypeError, "images must be"),
])
def test_bad_input(tiny_model, images, prompts, metadata, err, match):
    with pytest.raises(err, match=match):
        ddpo_reward(tiny_model)(images, prompts, metadata)
