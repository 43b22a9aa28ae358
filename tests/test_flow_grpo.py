"""The flow_grpo scorers called as flow_grpo calls them: built by a factory with the device, run from
a thread pool on float NCHW tensors (or NHWC uint8 arrays), compared with ddpo_reward."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from reward_fns import core, ddpo_reward
from reward_fns.flow_grpo import multitap_multi_score, multitap_score

PROMPTS = ["a red circle", "a blue square at the top", "a green cross", "a yellow ring"]


@pytest.fixture(autouse=True)
def _fresh_registry():
    core.forget_scorers()
    yield
    core.forget_scorers()


def _kwargs(tiny_dirs, **extra):
    base, reward = tiny_dirs
    return {"model_or_path": str(reward), "base_model": str(base), **extra}


def test_flow_grpo_scorer_from_a_thread_pool_equals_the_ddpo_reward(tiny_dirs, tiny_model):
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    fn = multitap_score("cpu", **_kwargs(tiny_dirs, weights="overall=2"))
    with ThreadPoolExecutor(max_workers=1) as pool:  # flow_grpo: executor.submit(reward_fn, ...)
        scores, meta = pool.submit(fn, pixels, PROMPTS, [{}] * 4).result()
    want, info = ddpo_reward(tiny_model, weights="overall=2")(pixels, tuple(PROMPTS), None)
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float32 and scores.shape == (4,)
    np.testing.assert_allclose(scores, want.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(meta["overall"], info["overall"].numpy(), atol=1e-6, rtol=0)
    uint8 = (pixels * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # NHWC
    again, _ = fn(uint8, PROMPTS, [{}] * 4)
    np.testing.assert_allclose(again, scores, atol=1e-6, rtol=0)  # the same pixels after rounding


def test_flow_grpo_multi_score_has_every_dimension_and_the_weighted_avg(tiny_dirs, tiny_model, tmp_path):
    from multitap_rl.heads import RidgeHeads

    g = torch.Generator().manual_seed(0)
    coef = (torch.randn(tiny_model.hidden_size, 2, generator=g) / tiny_model.hidden_size ** 0.5).numpy()
    RidgeHeads(["clarity", "safety"], coef, np.zeros(2)).save(tmp_path / "heads")
    fn = multitap_multi_score("cpu", **_kwargs(tiny_dirs, heads=str(tmp_path / "heads"),
                                               weights={"overall": 1.0, "safety": 0.5}))
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    details, meta = fn(pixels, PROMPTS, [{}] * 4, ref_images=None, only_strict=True)
    assert set(details) == {"overall", "clarity", "safety", "avg"} and meta == {}
    want = details["overall"] + 0.5 * details["safety"]
    np.testing.assert_allclose(details["avg"], want, atol=1e-6, rtol=0)
    as_flow_grpo = {k: torch.as_tensor(v).float() for k, v in details.items()}  # what its train loop does
    assert all(v.shape == (4,) for v in as_flow_grpo.values())


def test_flow_grpo_settings_are_checked_when_the_scorer_is_built(tiny_dirs):
    from multitap_rl.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown MULTI-TAP reward setting"):
        multitap_score("cpu", **_kwargs(tiny_dirs, wieghts="overall=1"))
    with pytest.raises(ConfigError, match="unknown dimension"):
        multitap_multi_score("cpu", **_kwargs(tiny_dirs, weights="safety=1"))
    with pytest.raises(ConfigError, match="needs model_or_path"):
        multitap_score("cpu")
    with pytest.raises(TypeError, match="device"):
        multitap_score("cpu", device="cpu", **_kwargs(tiny_dirs))
