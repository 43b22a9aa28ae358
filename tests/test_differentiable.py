"""Differentiable MULTI-TAP scores: PIL-exact torch preprocessing, forward = ordinary path,
gradients to the pixels, and the AlignProp-style reward adapter."""

import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from multitap_rl.differentiable import (
    mllama_pixel_values,
    pil_resize,
    pil_resize_weights,
    qwen2_vl_pixel_values,
    score_pixels,
    to_uint8_ste,
)
from multitap_rl.images import load_image

PROMPTS = ["a red circle on the left", "a dog next to a tree", "two blue squares"]


def _pil(arr: np.ndarray, size, resample) -> np.ndarray:
    return np.asarray(Image.fromarray(arr).resize((size[1], size[0]), resample)).astype(np.float64)


# -- pure functions -------------------------------------------------------------------------------
def test_bicubic_weights_hand_computed():
    # 2 -> 4 pixels: scale 0.5, support 2. Output 0 has center 0.25 and taps at inputs 0 and 1 with
    # arguments 0.25 and 1.25: k(0.25) = 1 - 2.125 * 0.0625 = 0.8671875,
    # k(1.25) = -0.5 * ((-3.75 * 1.25 + 8) * 1.25 - 4) = -0.0703125; normalised by their sum.
    w = pil_resize_weights(2, 4, "bicubic") / 2**22
    total = 0.8671875 - 0.0703125
    assert w[0, 0].item() == pytest.approx(0.8671875 / total, abs=1e-6)
    assert w[0, 1].item() == pytest.approx(-0.0703125 / total, abs=1e-6)
    assert torch.allclose(w.sum(dim=1), torch.ones(4, dtype=torch.float64), atol=1e-6)
    # mirror symmetry: output 3 is output 0 reversed
    assert torch.equal(w[3], w[0].flip(0))
    # bilinear 2 -> 4: output 0 (center 0.25) has the single tap x=0 (window [0, 1)): weight 1;
    # output 1 (center 0.75) has taps x=0, 1 at distances 0.25, 0.75: weights 0.75, 0.25.
    wb = pil_resize_weights(2, 4, "bilinear") / 2**22
    assert wb[0].tolist() == [1.0, 0.0] and wb[1].tolist() == [0.75, 0.25]


@pytest.mark.parametrize("resample", ["bicubic", "bilinear", "lanczos"])
@pytest.mark.parametrize("src,dst", [
    ((64, 64), (560, 560)),    # text-to-image output -> MULTI-TAP's resize
    ((48, 64), (560, 560)),    # non-square upscale
    ((7, 5), (40, 33)),        # tiny
    ((600, 600), (560, 560)),  # downscale, aspect kept (antialiased support)
    ((120, 90), (60, 100)),    # height shrinks, width grows: Pillow goes vertical first
    ((100, 37), (13, 250)),
])
def test_pil_resize_bit_exact(src, dst, resample):
    rng = np.random.default_rng(hash((src, dst)) % 2**32)
    arr = rng.integers(0, 256, (*src, 3), dtype=np.uint8)
    code = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS}[resample]
    out = pil_resize(torch.from_numpy(arr).permute(2, 0, 1).double(), dst, resample).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(out, _pil(arr, dst, code))


def test_pil_resize_bit_exact_on_random_downscales_in_either_pass_order():
    """Both sides shrinking by different amounts: Pillow 13 runs the vertical pass first when the
    height loses more than twice as many pixels as the width (earlier Pillows: always horizontal
    first). Random sizes cover both orders and the boundary."""
    rng = np.random.default_rng(7)
    cases = [((300, 200), (100, 100)), ((301, 200), (100, 100)), ((299, 200), (100, 100)),
             ((1024, 768), (560, 560)), ((768, 1024), (560, 560)), ((2000, 1500), (560, 560))]
    cases += [((int(h), int(w)), (int(rng.integers(8, h)), int(rng.integers(8, w))))
              for h, w in rng.integers(16, 400, (20, 2))]
    for src, dst in cases:
        arr = rng.integers(0, 256, (*src, 3), dtype=np.uint8)
        out = pil_resize(torch.from_numpy(arr).permute(2, 0, 1).double(), dst).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(out, _pil(arr, dst, Image.BICUBIC), err_msg=f"{src} -> {dst}")


def test_pil_resize_gradient_is_the_linear_map():
    x = torch.rand(3, 6, 5, dtype=torch.float64) * 255
    x = x.round().requires_grad_(True)
    g = torch.randn(3, 9, 11, dtype=torch.float64)
    (pil_resize(x, (9, 11)) * g).sum().backward()
    wh = pil_resize_weights(5, 11) / 2**22  # (11, 5)
    wv = pil_resize_weights(6, 9) / 2**22  # (9, 6)
    expected = wv.t() @ g @ wh  # d/dx of sum(g * (Wv x Wh^T))
    assert torch.allclose(x.grad, expected, atol=1e-12)


def test_to_uint8_matches_image_loader():
    # exact .5 boundaries (k/510) are where rounding modes differ
    vals = torch.tensor([k / 510 for k in range(511)], dtype=torch.float32)
    x = torch.cat([vals, torch.rand(3 * 16 * 16 - 511)]).reshape(3, 16, 16)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xd = x.to(dtype)
        ours = to_uint8_ste(xd).permute(1, 2, 0).numpy()
        ref = np.asarray(load_image(xd)).astype(np.float64)
        np.testing.assert_array_equal(ours, ref)


def test_straight_through_gradient_of_uint8():
    x = torch.rand(3, 4, 4, requires_grad=True)
    to_uint8_ste(x).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 255.0))


@pytest.mark.parametrize("size,image_size", [((64, 64), 560), ((48, 40), 560), ((512, 512), 560), ((60, 90), None)])
def test_pixel_values_match_the_image_processor(tiny_model, size, image_size):
    bb = tiny_model.backbone
    x = torch.rand(3, *size, generator=torch.Generator().manual_seed(sum(size)))
    soft, grid = qwen2_vl_pixel_values(x, bb.image_processor, image_size)
    pil = load_image(x)
    if image_size is not None:
        pil = pil.resize((image_size, image_size), Image.BICUBIC)
    ref = bb.image_processor(images=[pil], return_tensors="pt")
    assert grid == tuple(ref["image_grid_thw"][0].tolist())
    assert soft.dtype == torch.float32
    assert torch.equal(soft.detach(), ref["pixel_values"])  # bit-exact


@pytest.mark.parametrize("size,image_size", [((64, 48), 560), ((600, 1300), 560), ((300, 200), None),
                                             ((600, 1300), None), ((1200, 1100), None)])
def test_mllama_pixel_values_match_the_image_processor(tiny_mllama_model, size, image_size):
    """Llama-3.2-Vision: resize to the tile canvas, zero pad, rescale, normalise, tiles, zero
    tiles up to max_image_tiles -- bit-exact, one tile or several (image_size=None keeps the
    aspect ratio: 600x1300 -> 1x3 tiles, 1200x1100 -> 2x2)."""
    bb = tiny_mllama_model.backbone
    x = torch.rand(3, *size, generator=torch.Generator().manual_seed(sum(size)))
    soft, num_tiles = mllama_pixel_values(x, bb.image_processor, image_size)
    pil = load_image(x)
    if image_size is not None:
        pil = pil.resize((image_size, image_size), Image.BICUBIC)
    ref = bb.image_processor(images=[pil], return_tensors="pt")
    assert num_tiles == int(torch.as_tensor(ref["num_tiles"]).flatten()[0])
    assert num_tiles == (1 if image_size else {(300, 200): 1, (600, 1300): 3, (1200, 1100): 4}[size])
    assert soft.dtype == torch.float32
    assert torch.equal(soft, ref["pixel_values"])  # bit-exact


def test_prepare_pixels_forward_is_the_processor_output(tiny_model):
    """The backbone's differentiable preparation returns the ordinary path's numbers exactly (both
    sides shrink here: Pillow's pass order matters)."""
    bb = tiny_model.backbone
    x = torch.rand(3, 700, 610, generator=torch.Generator().manual_seed(1), requires_grad=True)
    got = bb.prepare_pixels(x)
    ref = bb.prepare_image(load_image(x.detach()))
    assert torch.equal(got.inputs["pixel_values"].detach(), ref.inputs["pixel_values"])
    assert torch.equal(got.inputs["image_grid_thw"], ref.inputs["image_grid_thw"])
    assert (got.num_tokens, got.cost) == (ref.num_tokens, ref.cost)
    got.inputs["pixel_values"].sum().backward()
    assert x.grad.abs().sum() > 0


# -- model ----------------------------------------------------------------------------------------
@pytest.fixture()
def pixels():
    return torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_forward_equals_ordinary_path_and_gradient_flows(backbone_model, pixels):
    x = pixels.clone().requires_grad_(True)
    dims = score_pixels(backbone_model, x, PROMPTS)
    ref = backbone_model.score(list(pixels), PROMPTS)
    assert set(dims) == {"overall", *ref.dims}
    assert torch.allclose(dims["overall"].detach().cpu(), ref.overall, atol=1e-4, rtol=0)
    dims["overall"].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    per_image = x.grad.abs().flatten(1).sum(1)
    assert (per_image > 0).all()  # every image gets a gradient


def test_gradient_ascent_raises_the_ordinary_score(backbone_model):
    """The gradient is useful: a few Adam steps on the pixels raise the *non-differentiable* score."""
    tiny_model = backbone_model
    torch.manual_seed(0)
    logits = torch.zeros(1, 3, 32, 32).uniform_(-1, 1).requires_grad_(True)
    prompts = ["a green square in the center"]
    before = float(tiny_model.score([torch.sigmoid(logits.detach())[0]], prompts).overall[0])
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(4):
        opt.zero_grad()
        score = score_pixels(tiny_model, torch.sigmoid(logits), prompts)["overall"]
        (-torch.logit(score)).sum().backward()  # ascend the pre-sigmoid score (the sigmoid saturates)
        opt.step()
    after = float(tiny_model.score([torch.sigmoid(logits.detach())[0]], prompts).overall[0])
    assert after > before


def test_inference_mode_is_refused(tiny_model, pixels):
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        score_pixels(tiny_model, pixels, PROMPTS)


# -- combining with gradients ---------------------------------------------------------------------
@pytest.mark.parametrize("normalize", ["none", "fixed", "running"])
def test_combiner_keeps_the_graph_and_equals_its_detached_value(normalize):
    from multitap_rl.combiner import RewardCombiner

    stats = {"overall": (0.5, 0.2), "clarity": (1.0, 2.0)}
    kw = dict(normalize=normalize, stats=stats if normalize == "fixed" else None,
              gates=["clarity<0.0:cap=0.1", "overall<0.3:penalty=1"])
    a = RewardCombiner({"overall": 1.0, "clarity": 0.5}, ["overall", "clarity"], **kw)
    b = RewardCombiner({"overall": 1.0, "clarity": 0.5}, ["overall", "clarity"], **kw)
    overall = torch.tensor([0.9, 0.2, 0.95, 0.7], requires_grad=True)
    clarity = torch.tensor([1.5, 2.0, -1.0, 0.5], requires_grad=True)
    for _ in range(2):  # twice: running statistics evolve identically
        got = a({"overall": overall, "clarity": clarity}).reward
        want = b({"overall": overall.detach(), "clarity": clarity.detach()}).reward
        assert torch.allclose(got.detach(), want, atol=1e-6)
    got.sum().backward()
    assert overall.grad[0] != 0 and clarity.grad[0] != 0
    assert clarity.grad[2] == 0 and overall.grad[2] == 0  # capped (clarity < 0, reward above the cap)


def test_combine_hand_computed():
    from multitap_rl.combiner import RewardCombiner

    c = RewardCombiner({"overall": 2.0, "clarity": -1.0}, ["overall", "clarity"], normalize="fixed",
                       stats={"overall": (0.5, 0.25), "clarity": (0.0, 2.0)})
    r = c({"overall": torch.tensor([0.75]), "clarity": torch.tensor([1.0])}).reward
    assert r.item() == pytest.approx(2.0 * (0.75 - 0.5) / 0.25 - 1.0 * (1.0 - 0.0) / 2.0)


# -- the reward adapter ---------------------------------------------------------------------------
def test_differentiable_reward_contract(backbone_model, pixels):
    from reward_fns.differentiable import DifferentiableReward, differentiable_reward

    tiny_model = backbone_model
    fn = differentiable_reward(tiny_model)
    assert isinstance(fn, DifferentiableReward) and fn.__name__ == "multitap"
    x = pixels.clone().requires_grad_(True)
    rewards, info = fn(x, tuple(PROMPTS), ({}, {}, {}))
    assert rewards.shape == (3,) and rewards.dtype == torch.float32 and rewards.requires_grad
    assert set(info) >= {"overall"} and all(v.shape == (3,) and not v.requires_grad for v in info.values())
    (10.0 - rewards.mean()).backward()  # AlignProp's loss
    assert (x.grad.abs().flatten(1).sum(1) > 0).all()
    # the same numbers as the DDPO (non-differentiable) reward
    from reward_fns.ddpo import ddpo_reward

    ref, _ = ddpo_reward(tiny_model)(pixels, tuple(PROMPTS), None)
    assert torch.allclose(rewards.detach(), ref, atol=1e-4, rtol=0)
    clone = pickle.loads(pickle.dumps(fn))
    assert clone.__name__ == "multitap" and "_model" not in vars(clone)
    assert torch.allclose(clone(pixels, PROMPTS)[0].detach(), rewards.detach(), atol=1e-6)


@pytest.mark.parametrize("images,prompts,err,match", [
    (np.zeros((2, 32, 32, 3), np.uint8), ["a", "b"], TypeError, "carry gradients"),
    (torch.rand(3, 32, 32), ["a"], ValueError, r"\(B, 3, H, W\)"),
    (torch.rand(2, 4, 32, 32), ["a", "b"], ValueError, r"\(B, 3, H, W\)"),
    (torch.rand(2, 3, 8, 8) * 2, ["a", "b"], ValueError, "image 0: float pixels must lie in"),
    (torch.full((2, 3, 8, 8), float("nan")), ["a", "b"], ValueError, "image 0: .*NaN"),
    (torch.rand(2, 3, 8, 8), ["a"], ValueError, "2 images but 1 prompts"),
    (torch.rand(1, 3, 8, 8), [3], TypeError, "prompt 0"),
    (torch.rand(1, 3, 8, 8), "a", TypeError, "prompts must be"),
])
def test_differentiable_reward_bad_input(tiny_model, images, prompts, err, match):
    from reward_fns.differentiable import differentiable_reward

    with pytest.raises(err, match=match):
        differentiable_reward(tiny_model)(images, prompts, None)


def test_unknown_weight_rejected_at_construction(tiny_model):
    from reward_fns.differentiable import differentiable_reward

    with pytest.raises(ValueError, match="unknown dimension"):
        differentiable_reward(tiny_model, weights="nonsense=1")


def test_nonfinite_dimension_named():
    from multitap_rl.combiner import RewardCombiner

    c = RewardCombiner(None, ["overall"])
    with pytest.raises(ValueError, match="'overall' is not finite at sample 1"):
        c({"overall": torch.tensor([0.5, math.nan], requires_grad=True)})


def test_stage2_dimensions_are_differentiable(tiny_model, pixels):
    """With real ridge heads attached, every dimension equals the ordinary path and carries gradients."""
    from multitap_rl.heads import RidgeHeads
    from multitap_rl.model import MultiTapModel
    from reward_fns.differentiable import differentiable_reward

    g = torch.Generator().manual_seed(0)
    heads = RidgeHeads(["clarity", "safety"], torch.randn(tiny_model.hidden_size, 2, generator=g).numpy(),
                       np.array([0.1, -0.2]), stats={"clarity": (0.0, 1.0), "safety": (0.0, 1.0)})
    model = MultiTapModel(tiny_model.backbone, tiny_model.reward_head, heads=heads,
                          info={"checkpoint": "<tiny model with ridge heads: differentiable test>"}).eval()
    x = pixels.clone().requires_grad_(True)
    dims = score_pixels(model, x, PROMPTS)
    ref = model.score(list(pixels), PROMPTS)
    assert set(dims) == {"overall", "clarity", "safety"}
    for name in ("clarity", "safety"):
        assert torch.allclose(dims[name].detach().cpu(), ref.dims[name], atol=1e-4, rtol=0)
    fn = differentiable_reward(model, weights="overall=1,safety=0.5")
    rewards, info = fn(x, PROMPTS, None)
    assert set(info) == {"overall", "clarity", "safety"}
    assert torch.allclose(rewards.detach(), info["overall"] + 0.5 * info["safety"], atol=1e-5)
    dims["safety"].sum().backward()
    assert x.grad.abs().sum() > 0
