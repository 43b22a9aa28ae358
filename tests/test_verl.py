"""The verl adapters with the real verl package (0.9.1): the reward manager built as verl builds it
from its config, fed DataProto trajectories shaped as verl's agent loop makes them; the custom
reward functions loaded as verl loads them; GDPO over the manager's keys. CI runs these in a
virtualenv of their own (verl pins transformers < 5.11); elsewhere they are skipped."""

import asyncio
import os
import pickle

import numpy as np
import pytest
import torch

if os.environ.get("MULTITAP_REQUIRE_VERL") == "1":  # CI's verl virtualenv: a missing verl is a failure
    import verl  # noqa: F401
else:
    verl = pytest.importorskip("verl", reason="verl is not installed (pip install 'multitap-rl[verl]')")

from omegaconf import OmegaConf  # noqa: E402

from multitap_rl import ModelSpec  # noqa: E402
from multitap_rl.model import MultiTapModel  # noqa: E402
from reward_fns import core, multitap_reward  # noqa: E402

G = 4  # responses per image, as a GRPO group
CAPTIONS = ["A red circle.", "Two dogs on the grass.", "A tree near a house.", "Blue."]


def _config(reward_dir, base, **extra) -> OmegaConf:
    kwargs = {"model_or_path": str(reward_dir), "base_model": str(base), "device": "cpu", **extra}
    return OmegaConf.create({"reward": {
        "num_workers": 1,
        "reward_manager": {"source": "importlib", "name": "MultiTapRewardManager",
                           "module": {"path": "pkg://reward_fns.verl", "name": "custom_reward_manager"}},
        "custom_reward_function": {"path": None, "name": "compute_score", "reward_kwargs": kwargs},
    }})


def _manager(cfg, tokenizer):
    from verl.trainer.ppo.reward import load_reward_manager

    return load_reward_manager(cfg, tokenizer, reward_router_address=None, reward_model_tokenizer=None)


def _trajectory(tokenizer, messages, response: str):
    """One finished trajectory as verl's agent loop hands it to a reward worker (one sequence,
    no padding), pickled and unpickled as Ray would."""
    from tensordict import TensorDict
    from verl import DataProto

    prompt = torch.tensor(tokenizer("<|im_start|>user\nDescribe this image.<|im_end|>\n")["input_ids"])
    resp = torch.tensor(tokenizer(response)["input_ids"] + [tokenizer.eos_token_id or 0])
    ids = torch.cat([prompt, resp])
    batch = TensorDict({"prompts": prompt[None], "responses": resp[None], "input_ids": ids[None],
                        "attention_mask": torch.ones_like(ids)[None]}, batch_size=1)
    row = {"raw_prompt": messages, "data_source": "multitap-test", "reward_model": {"ground_truth": ""},
           "extra_info": {"index": 0}}
    non_tensor = {**{k: np.array([v]) for k, v in row.items()},
                  "__num_turns__": np.array([2]), "tool_extra_fields": np.array([{}], dtype=object),
                  "prompt_len": np.array([len(prompt)]), "response_len": np.array([len(resp)])}
    return pickle.loads(pickle.dumps(DataProto(batch=batch, non_tensor_batch=non_tensor)))


def _messages(image, question="Describe this image."):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


@pytest.fixture()
def tokenizer(tiny_dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dirs[0])


def test_verl_manager_scores_a_grpo_batch_in_one_engine_call(tiny_dirs, tiny_model, tokenizer, images, tmp_path):
    base, reward = tiny_dirs
    core.forget_scorers()
    mgr = _manager(_config(reward, base, weights="overall=2"), tokenizer)
    assert type(mgr).__name__ == "MultiTapRewardManager"
    # images as verl's dataset may carry them: PIL, a file path, and the dataset's bytes form
    path = tmp_path / "img2.png"
    images[2].save(path)
    forms = [images[0], images[1], str(path), {"bytes": path.read_bytes(), "path": None}]
    data, want_texts, want_images = [], [], []
    for i, img in enumerate(forms):
        for g in range(G):
            text = CAPTIONS[(i + g) % len(CAPTIONS)]
            data.append(_trajectory(tokenizer, _messages(img), text))
            want_texts.append(text)
            want_images.append(images[i] if i < 2 else path)
    calls = []
    original = MultiTapModel.score
    MultiTapModel.score = lambda self, *a, **k: calls.append(len(a[1])) or original(self, *a, **k)
    try:
        results = mgr.loop.run_until_complete(asyncio.gather(*[mgr.run_single(d) for d in data]))
    finally:
        MultiTapModel.score = original
    assert calls == [len(data)] and mgr.batcher.calls == 1  # the whole batch: one engine call
    want = multitap_reward(tiny_model, weights="overall=2")(["Describe this image."] * len(data), want_texts,
                                                           image=want_images)
    assert [r["reward_score"] for r in results] == pytest.approx(want, abs=1e-6)
    keys = {tuple(sorted(r["reward_extra_info"])) for r in results}
    assert keys == {("multitap_valid", "overall")}  # the same keys for every sample
    assert all(r["reward_extra_info"]["multitap_valid"] == 1.0 for r in results)


def test_verl_manager_a_bad_image_is_that_samples_problem(tiny_dirs, tokenizer, images):
    base, reward = tiny_dirs
    mgr = _manager(_config(reward, base, on_invalid=-1.0), tokenizer)
    data = [_trajectory(tokenizer, _messages(images[0]), "A cat."),
            _trajectory(tokenizer, _messages(b"not an image"), "A dog."),
            _trajectory(tokenizer, [{"role": "user", "content": "no image here"}], "A tree.")]
    out = mgr.loop.run_until_complete(asyncio.gather(*[mgr.run_single(d) for d in data]))
    assert out[0]["reward_extra_info"]["multitap_valid"] == 1.0 and out[0]["reward_score"] != -1.0
    for r in out[1:]:
        assert r["reward_score"] == -1.0 and r["reward_extra_info"] == {"overall": -1.0, "multitap_valid": 0.0}


def test_verl_manager_instruction_task_and_config_errors(tiny_dirs, tiny_model, tokenizer, images):
    base, reward = tiny_dirs
    mgr = _manager(_config(reward, base, task="instruction"), tokenizer)
    out = mgr.loop.run_until_complete(mgr.run_single(
        _trajectory(tokenizer, _messages(images[1], "What colour is it?"), "Red.")))
    want = tiny_model.score(images[1:2], ["Red."], ["What colour is it?"]).overall
    assert out["reward_score"] == pytest.approx(float(want[0]), abs=1e-6)
    from multitap_rl.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown MULTI-TAP reward setting"):
        _manager(_config(reward, base, wieghts="overall=1"), tokenizer)
    with pytest.raises(ConfigError, match="unknown dimension"):
        _manager(_config(reward, base, weights="safety=1"), tokenizer)


def test_verl_custom_reward_functions_load_as_verl_loads_them(tiny_dirs, tiny_model, images, tmp_path):
    from verl.trainer.ppo.reward import get_custom_reward_fn

    base, reward = tiny_dirs
    path = tmp_path / "a.png"
    images[0].save(path)
    want = float(tiny_model.score([path], ["A red circle."]).overall[0])
    for name in ("compute_score", "compute_score_async"):
        cfg = _config(reward, base)
        cfg.reward.custom_reward_function.path = "pkg://reward_fns.verl"
        cfg.reward.custom_reward_function.name = name
        fn = get_custom_reward_fn(cfg)
        call = fn(data_source="d", solution_str="A red circle.", ground_truth="", extra_info={"image": str(path)})
        out = asyncio.run(call) if name.endswith("async") else call
        assert out["score"] == pytest.approx(want, abs=1e-6) and out["overall"] == out["score"]
        assert out["multitap_valid"] == 1.0


def test_verl_gdpo_advantages_read_the_managers_keys(tiny_dirs, tokenizer, images):
    """verl's own GDPO estimator over the manager's per-dimension keys (as the v0 trainer's
    extract_reward puts reward_extra_info into non_tensor_batch)."""
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.core_algos import compute_gdpo_outcome_advantage

    base, reward = tiny_dirs
    mgr = _manager(_config(reward, base), tokenizer)
    data = [_trajectory(tokenizer, _messages(images[i // G]), CAPTIONS[i % G]) for i in range(2 * G)]
    out = mgr.loop.run_until_complete(asyncio.gather(*[mgr.run_single(d) for d in data]))
    n, resp_len = len(out), 6
    batch = {"prompts": torch.zeros(n, 3, dtype=torch.long), "attention_mask": torch.ones(n, 3 + resp_len, dtype=torch.long)}
    non_tensor = {k: np.array([r["reward_extra_info"][k] for r in out]) for k in ("overall", "multitap_valid")}
    adv, _ = compute_gdpo_outcome_advantage(
        token_level_rewards=torch.zeros(n, resp_len), response_mask=torch.ones(n, resp_len),
        index=np.array([i // G for i in range(n)]), config=AlgoConfig(gdpo_reward_keys=["overall"]),
        non_tensor_batch=non_tensor, batch=batch)
    assert adv.shape == (n, resp_len) and torch.isfinite(adv).all() and adv.abs().sum() > 0


def test_verl_omni_image_score_matches_the_ddpo_reward(tiny_dirs, tiny_model):
    from reward_fns import ddpo_reward
    from reward_fns.verl import compute_image_score

    base, reward = tiny_dirs
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a blue square", "a tree"]

    async def all_three():
        return await asyncio.gather(*[compute_image_score("t2i", pixels[i], prompts[i], {}, model_or_path=str(reward),
                                                          base_model=str(base), device="cpu") for i in range(3)])

    out = asyncio.run(all_three())
    want, _ = ddpo_reward(tiny_model)(pixels, tuple(prompts), None)
    assert [o["score"] for o in out] == pytest.approx(want.tolist(), abs=1e-6)


@pytest.fixture(autouse=True)
def _fresh_registry():
    core.forget_scorers()
    yield
    core.forget_scorers()


def test_verl_manager_pickles_as_a_spec(tiny_dirs, tokenizer):
    """A reward worker is a Ray actor: what it holds must not drag the model across processes."""
    base, reward = tiny_dirs
    mgr = _manager(_config(reward, base), tokenizer)
    assert mgr.core.spec == ModelSpec(checkpoint=str(reward), base_model=str(base), device="cpu")
    assert len(pickle.dumps(mgr.core)) < 20_000
