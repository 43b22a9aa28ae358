"""Contract tests for the TRL reward adapters, and real GRPO/RLOO steps on tiny models."""

import inspect
import pickle
import sys
from pathlib import Path

import pytest
import torch

from multitap_rl import ModelSpec
from multitap_rl.errors import ConfigError
from reward_fns import multitap_objective_rewards, multitap_reward
from reward_fns import core

PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]


@pytest.fixture()
def model_with_heads(tiny_model):
    """The tiny model with two stage-2 ridge dimensions (random coefficients)."""
    import numpy as np

    from multitap_rl.heads import RidgeHeads
    from multitap_rl.model import MultiTapModel

    g = torch.Generator().manual_seed(0)
    coef = (torch.randn(tiny_model.hidden_size, 2, generator=g) / tiny_model.hidden_size**0.5).numpy()
    heads = RidgeHeads(["clarity", "safety"], coef, np.zeros(2))
    return MultiTapModel(tiny_model.backbone, tiny_model.reward_head, heads=heads).eval()


def _batch(images, g=2):
    imgs = [images[i // g] for i in range(2 * g)]
    completions = [[{"role": "assistant", "content": t}] for t in
                   ["A red circle.", "Two dogs on the grass.", "A tree.", "A blue square at the top."][: 2 * g]]
    return [PROMPT] * len(imgs), completions, imgs


@pytest.fixture()
def reward(tiny_dirs):
    base, reward_dir = tiny_dirs
    return multitap_reward(ModelSpec(checkpoint=reward_dir, base_model=base, device="cpu"))


def test_contract(reward, tiny_model, images):
    sig = inspect.signature(reward.__call__)
    assert list(sig.parameters)[:2] == ["prompts", "completions"]
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    assert reward.__name__ == "multitap"
    prompts, completions, imgs = _batch(images)
    out = reward(prompts=prompts, completions=completions, image=imgs)
    assert isinstance(out, list) and len(out) == len(completions) and all(isinstance(x, float) for x in out)
    texts = [c[0]["content"] for c in completions]
    expected = tiny_model.score(imgs, texts).overall
    assert torch.allclose(torch.tensor(out), expected, atol=1e-6)


def test_pickle_round_trip_reloads_in_a_fresh_process_state(reward, images):
    prompts, completions, imgs = _batch(images)
    before = reward(prompts=prompts, completions=completions, image=imgs)
    blob = pickle.dumps(reward)
    assert len(blob) < 10_000  # the model does not travel with the callable
    core.forget_scorers()  # as in a new process: the model must be reloaded from the spec
    clone = pickle.loads(blob)
    assert clone.__name__ == "multitap"
    assert clone(prompts=prompts, completions=completions, image=imgs) == pytest.approx(before, abs=1e-6)


def test_pickled_in_memory_model_reloads_with_its_heads_and_backbone_options(tiny_mllama_dirs, images):
    """A reward made from a loaded model: another process reloads the checkpoint with the same
    backbone options (Mllama's pad token) and the heads that were attached as an object."""
    from multitap_rl import MultiTapModel
    from multitap_rl.training.ridge import fit_ridge_heads
    from multitap_rl.training.features import model_identity

    base, reward_dir = tiny_mllama_dirs
    model = MultiTapModel.from_pretrained(reward_dir, base_model=base, device="cpu", max_length=64,
                                          backbone_options={"pad_token": "<|eot_id|>"})
    texts = ["A red circle.", "Two dogs.", "A tree.", "Blue.", "A cat on a mat.", "Grass and sky.", "Red.", "Dog."]
    feats = model.features([images[i % 3] for i in range(8)], texts)
    y = {"detail": torch.arange(8.0), "brevity": -torch.arange(8.0)}
    model.load_heads(fit_ridge_heads(feats.double(), y, fingerprint=model_identity(model)))
    fn = multitap_reward(model, weights="overall=1,detail=0.5,brevity=0.25")
    prompts, completions, imgs = _batch(images)
    before = fn(prompts=prompts, completions=completions, image=imgs)
    blob = pickle.dumps(fn)
    assert len(blob) < 20_000
    core.forget_scorers()  # as in a new process
    clone = pickle.loads(blob)
    assert clone(prompts=prompts, completions=completions, image=imgs) == pytest.approx(before, abs=1e-6)
    reloaded = core.get_scorer(clone.spec).model
    assert reloaded is not model and reloaded.backbone.options() == {"pad_token": "<|eot_id|>"}
    assert reloaded.dimension_names == model.dimension_names


def test_pickled_model_without_a_checkpoint_is_a_clear_error(tiny_dirs, images):
    from multitap_rl import MultiTapModel

    base, _ = tiny_dirs
    fn = multitap_reward(MultiTapModel.from_base_model(base, device="cpu", image_size=56))
    prompts, completions, imgs = _batch(images)
    assert len(fn(prompts=prompts, completions=completions, image=imgs)) == 4  # fine in this process
    core.forget_scorers()
    clone = pickle.loads(pickle.dumps(fn))
    with pytest.raises(ConfigError, match=r"no checkpoint .*save_pretrained"):
        clone(prompts=prompts, completions=completions, image=imgs)


def test_none_for_missing_images_and_empty_completions(tiny_dirs, images):
    base, reward_dir = tiny_dirs
    r = multitap_reward(reward_dir, base_model=base, empty_reward=-1.0)
    prompts = [PROMPT] * 4
    completions = ["A red circle.", "A tree.", "   ", "Dogs."]
    out = r(prompts=prompts, completions=completions, image=[images[0], None, images[1], images[2]])
    assert len(out) == 4
    assert out[1] is None and out[2] == -1.0 and isinstance(out[0], float) and isinstance(out[3], float)
    assert r(prompts=prompts[:1], completions=["x"], image=[None]) == [None]


def test_images_column_and_string_completions(reward, tiny_model, images):
    prompts = ["Describe this image."] * 3
    out = reward(prompts=prompts, completions=["A.", "B b.", "C."], images=[[images[0]], [images[1]], []])
    assert out[2] is None
    expected = tiny_model.score(images[:2], ["A.", "B b."]).overall
    assert torch.allclose(torch.tensor(out[:2]), expected, atol=1e-6)
    assert reward(prompts=prompts[:1], completions=["A."], images=[[images[0], images[1]]]) == [None]
    strict = multitap_reward(reward.spec, on_invalid="raise")
    with pytest.raises(ValueError, match="completion 0: image: 2 images"):
        strict(prompts=prompts[:1], completions=["A."], images=[[images[0], images[1]]])
    with pytest.raises(ValueError, match="no images reached the MULTI-TAP reward"):
        reward(prompts=prompts[:1], completions=["A."])


def test_instruction_task_takes_the_question_from_the_prompt(tiny_dirs, tiny_model, images):
    base, reward_dir = tiny_dirs
    r = multitap_reward(reward_dir, base_model=base, task="instruction")
    prompt = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    out = r(prompts=[prompt], completions=[[{"role": "assistant", "content": "Red."}]], image=[images[0]])
    expected = tiny_model.score(images[:1], ["Red."], ["What colour is it?"]).overall
    assert out[0] == pytest.approx(float(expected[0]), abs=1e-6)


def test_unknown_weights_rejected_at_construction(tiny_dirs):
    base, reward_dir = tiny_dirs
    with pytest.raises(ValueError, match=r"unknown dimension\(s\) \['safety'\].*valid names: \['overall'\]"):
        multitap_reward(reward_dir, base_model=base, weights="safety=1")
    with pytest.raises(ValueError, match="unknown dimension"):
        multitap_objective_rewards(reward_dir, base_model=base, dims=["clarity"])


def test_log_metric_gets_every_dimension(reward, images):
    logged = {}
    prompts, completions, imgs = _batch(images)
    out = reward(prompts=prompts, completions=completions, image=imgs,
                 log_metric=lambda k, v: logged.__setitem__(k, v))
    assert logged["multitap/overall"] == pytest.approx(sum(out) / len(out), abs=1e-6)


def test_objective_rewards_share_one_forward_per_step(model_with_heads, images):
    """The callables made together take one forward per batch (TRL calls each once per step);
    a new step, an edited list or another set of callables computes anew."""
    model = model_with_heads
    funcs = multitap_objective_rewards(model)
    names = [f.__name__ for f in funcs]
    assert names[0] == "multitap_overall" and len(funcs) == len(model.dimension_names) >= 2
    calls = []
    original = model.score
    model.score = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        prompts, completions, imgs = _batch(images)
        step = [f(prompts=prompts, completions=completions, image=imgs) for f in funcs]
        assert len(calls) == 1
        again = [f(prompts=prompts, completions=completions, image=imgs) for f in funcs]  # the next step
        assert len(calls) == 2 and again == step
        funcs[0](prompts=prompts, completions=completions, image=imgs)
        completions[0] = [{"role": "assistant", "content": "Something else entirely."}]  # edited in place
        edited = funcs[1](prompts=prompts, completions=completions, image=imgs)
        assert len(calls) == 4 and edited[0] != pytest.approx(step[1][0], abs=1e-6)
        twin = multitap_objective_rewards(model, dims=["overall"])
        assert twin[0](prompts=prompts, completions=completions, image=imgs)[1:] == pytest.approx(step[0][1:], abs=1e-6)
    finally:
        del model.score
    expected = original(imgs, [c[0]["content"] for c in completions])
    assert edited == pytest.approx(expected.scores[funcs[1].dim].tolist(), abs=1e-6)


def _policy_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.integration
@pytest.mark.parametrize("trainer, steps", [("grpo", 2), ("rloo", 1)])
def test_real_trainer_steps(tmp_path, trainer, steps):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import grpo_captioner

    seen = []

    args = grpo_captioner.parse_args(["--tiny", "--trainer", trainer, "--max-steps", str(steps),
                                      "--num-generations", "2", "--batch-size", "4",
                                      "--max-completion-length", "6", "--learning-rate", "1e-2",
                                      "--output-dir", str(tmp_path / "out")])
    torch.manual_seed(0)
    _, reward = grpo_captioner.build(args, workdir=str(tmp_path))

    def recording(prompts, completions, **kwargs):
        seen.append(kwargs.get("image"))
        return reward(prompts, completions, **kwargs)

    recording.__name__ = reward.__name__
    trainer_obj, _ = grpo_captioner.build(args, reward_funcs=recording, workdir=str(tmp_path))
    before = _policy_params(trainer_obj.model)
    trainer_obj.train()
    assert len(seen) == steps
    from PIL import Image

    assert all(len(batch) == 4 and all(isinstance(im, Image.Image) for im in batch) for batch in seen)
    after = _policy_params(trainer_obj.model)
    assert any(not torch.equal(before[n], after[n]) for n in before), "policy parameters did not change"
    logged = [h for h in trainer_obj.state.log_history if "reward" in h]
    assert logged and all("rewards/multitap/mean" in h for h in logged)


def test_offload_moves_the_model_between_calls(images):
    """offload=True: the model lives on CPU between calls and on its device during one."""
    from reward_fns.core import Scorer

    class FakeModel:
        def __init__(self):
            self.device = torch.device("cuda", 0)  # pretend home device
            self.moves = []

        def to(self, device):
            self.moves.append(str(device))
            self.device = torch.device(device)
            return self

        def score(self, imgs, texts, questions=None, on_invalid="raise"):
            from multitap_rl.model import ScoreOutput

            self.moves.append(f"score on {self.device}")
            return ScoreOutput(scores={"overall": torch.zeros(len(texts))})

    fake = FakeModel()
    scorer = Scorer(ModelSpec(checkpoint="fake", offload=True), model=fake)
    scorer.score([images[0]], ["a"])
    scorer.score([images[0]], ["b"])
    assert fake.moves == ["score on cuda:0", "cpu", "cuda:0", "score on cuda:0", "cpu"]


def test_default_dtype_is_bf16_on_gpu_fp32_on_cpu():
    from multitap_rl.model import resolve_dtype

    assert resolve_dtype(None, torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8", torch.device("cpu"))


@pytest.mark.integration
def test_example_tiny_run_leaves_nothing_behind_and_its_help_keeps_line_breaks(tmp_path, monkeypatch, capsys):
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import grpo_captioner

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the example's temporary folder goes
    grpo_captioner.main(["--tiny", "--max-steps", "1", "--num-generations", "2", "--batch-size", "2",
                         "--max-completion-length", "4"])
    assert not list(tmp_path.glob("grpo-captioner-*"))  # the example's temporary folder is gone
    with pytest.raises(SystemExit):
        grpo_captioner.parse_args(["--help"])
    assert "examples/grpo_captioner.py \\\n        --policy" in capsys.readouterr().out


def test_an_overflow_in_the_combiner_is_that_samples_error_named_by_its_batch_index(tiny_model, images):
    """The combiner sees only the valid samples; its per-sample error names the caller's sample."""
    from multitap_rl.errors import SampleError
    from reward_fns.core import RewardCore

    class Overflowing:
        """Stands for a combiner whose normalised value overflows for one sample."""

        running, gates = None, ()

        def __init__(self, real):
            self.real, self.raised = real, False

        def __call__(self, dims):  # the last of the samples it sees overflows, once
            if not self.raised:
                self.raised = True
                raise SampleError(len(dims["overall"]) - 1, "score", "the normalised value overflows float32")
            return self.real(dims)

    texts = ["A red circle.", "Two dogs.", "A tree."]
    for on_invalid in (-5.0, "skip"):
        core = RewardCore(tiny_model, on_invalid=on_invalid)
        core.combiner = Overflowing(core.combiner)
        batch = core.evaluate([b"not an image", images[1], images[2]], texts)
        assert sorted(batch.errors) == [0, 2] and "overflows" in str(batch.errors[2])
        assert batch.values()[1] == pytest.approx(float(tiny_model.score(images[1:2], texts[1:2]).overall[0]), abs=1e-6)
        assert batch.values()[2] == (None if on_invalid == "skip" else -5.0)
    strict = RewardCore(tiny_model, on_invalid="raise")
    strict.combiner = Overflowing(strict.combiner)
    with pytest.raises(SampleError, match="score 2: the normalised value overflows"):
        strict.evaluate([images[0], images[1], images[2]], texts)
