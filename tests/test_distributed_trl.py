"""TRL GRPO/RLOO with the co-located MULTI-TAP reward in 2 CPU processes (``accelerate launch``,
gloo): plain DDP, DeepSpeed ZeRO-3 for the policy, and ZeRO-3 sharding of the reward model itself.

Each run (``tests/distributed/trl_run.py``) records, per rank, every reward call's inputs and
outputs. The test replays the same inputs in this one process and checks:

* the reward model loaded once per rank, on that rank's device, and ran one forward per step for
  the weighted reward and all objective callables together;
* per-dimension (objective) rewards equal a 1-process call on the same inputs exactly: the same
  samples in the same batch run the same float32 operations in the same order, on CPU with one
  thread, whether sharded or not (a ZeRO-3 gather restores the loaded weights bit for bit);
* the weighted ``normalize="running"`` reward equals one process that sees the whole global batch
  of each step (both ranks' samples) -- the running statistics are shared by the ranks.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed" / "trl_run.py"
PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
WEIGHTS = "overall=1,detail=0.5"
EPS32 = 2.0 ** -23  # float32 unit roundoff (relative spacing / 2 is 2**-24; one ulp at 1.0 is 2**-23)


@pytest.fixture(scope="module")
def heads_dir(tiny_model, tmp_path_factory):
    """Two stage-2 dimensions on the tiny model's features (so the weighted reward normalises two)."""
    from multitap_rl.testing import make_image
    from multitap_rl.training.features import model_identity
    from multitap_rl.training.ridge import fit_ridge_heads

    texts = ["A red circle.", "Two dogs.", "A tree.", "Blue.", "A cat on a mat.", "Grass and sky.", "Red.", "Dog."]
    feats = tiny_model.features([make_image(i % 3, size=(56, 56)) for i in range(8)], texts)
    y = {"detail": torch.arange(8.0), "brevity": -torch.arange(8.0)}
    heads = fit_ridge_heads(feats.double(), y, fingerprint=model_identity(tiny_model))
    return heads.save(tmp_path_factory.mktemp("heads"))


def _launch(config, out: Path, base, reward, heads, *extra):
    import _launch as launcher

    def cmd(port):
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                  "--main_process_port", str(port)]
        if "zero3.yaml" in str(config):  # the recipe is bf16 for GPUs; CPUs here run float32
            launch += ["--num_processes", "2", "--mixed_precision", "no"]
        return [*launch, str(SCRIPT), "--base", str(base), "--reward", str(reward), "--heads", str(heads),
                "--weights", WEIGHTS, "--out", str(out), *extra]

    proc = launcher.run(cmd)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]


def _steps(report):
    """Per reward call round: {callable name: call record}."""
    steps, current = [], {}
    for call in report["calls"]:
        if call["name"] in current:
            steps.append(current)
            current = {}
        current[call["name"]] = call
    steps.append(current)
    return steps


def _inputs(call):
    from multitap_rl.testing import make_image

    n = len(call["texts"])
    images = [make_image(i, size=(56, 56)) for i in call["idx"]]
    return [PROMPT] * n, [[{"role": "assistant", "content": t}] for t in call["texts"]], images


def _check_run(reports, base, reward, heads, *, zero3_policy=False, sharded=False):
    from multitap_rl import ModelSpec, MultiTapModel
    from multitap_rl.combiner import RewardCombiner
    from reward_fns import core, multitap_objective_rewards

    # 1. What each rank held and did.
    for r, rep in enumerate(reports):
        summary = {k: v for k, v in rep.items() if k != "calls"}  # shown when an assertion fails
        assert rep["rank"] == r and rep["world"] == 2, summary
        assert torch.device(rep["reward_device"]).type == torch.device(rep["process_device"]).type, summary
        assert rep["loads"] == 1 and rep["same_scorer"], summary
        rounds = _steps(rep)
        assert len(rounds) == rep["policy_steps"] >= 2, summary
        # one forward for the weighted reward and one shared by the 3 objective callables, per round
        assert rep["forwards"] == 2 * len(rounds), summary
        assert rep["policy_max_change"] > 0, summary  # the policy trained
        if zero3_policy:
            assert "DEEPSPEED" in rep["distributed_type"] and rep["policy_zero3"], summary
        if sharded:  # each rank holds half of the reward's weights (+ DeepSpeed's padding to equal slices)
            assert rep["reward_numel_here"] * 2 - rep["reward_numel_full"] in (0, 1), summary
        else:
            assert rep["reward_numel_here"] == rep["reward_numel_full"], summary
    assert reports[0]["running"] == reports[1]["running"]  # bitwise the same statistics on both ranks

    # 2. Replay in this one process.
    core.forget_scorers()
    objectives = multitap_objective_rewards(ModelSpec(checkpoint=reward, base_model=base, heads=heads, device="cpu"))
    model = MultiTapModel.from_pretrained(reward, base_model=base, heads=heads, device="cpu")
    combiner = RewardCombiner(WEIGHTS, model.dimension_names, normalize="running")
    rounds = list(zip(*(_steps(rep) for rep in reports)))
    worst = 0.0
    for per_rank in rounds:
        dims, recorded = [], []
        for step in per_rank:
            prompts, completions, images = _inputs(step["multitap"])
            for fn in objectives:  # the same inputs, the same batch: exactly the same numbers
                assert fn(prompts, completions, image=images) == step[fn.__name__]["rewards"], fn.__name__
            texts, rewards = step["multitap"]["texts"], step["multitap"]["rewards"]
            out = model.score(images, texts)  # every completion is scored, empty ones included
            dims.append(out.scores)
            recorded += rewards
        # one process, the whole global batch of this round (rank 0's samples, then rank 1's)
        combined = combiner({k: torch.cat([d[k] for d in dims]) for k in dims[0]})
        got = torch.tensor(recorded)
        # Tolerance: both sides normalise the same float32 raw scores with float64 statistics that
        # differ only in summation order (Chan's pairwise merge of two ranks vs one pass), ~1e-15
        # relative. Each weighted term w * (x - m) / s is then evaluated in float32: m rounds to
        # float32 (at worst to the neighbouring float32, eps32 * |m|), the subtraction, division,
        # scaling and the sum of two terms each round once more (<= 4 eps32 * |term| per term).
        bound = 0.0
        for name, w in combiner.weights.items():
            m, s = combiner.running.mean[name], (combiner.running.var[name] + combiner.running.eps) ** 0.5
            term = float(combiner.running.normalize(name, torch.cat([d[name] for d in dims])).abs().max())
            bound += abs(w) * (EPS32 * abs(m) / s + 4 * EPS32 * term)
        diff = float((combined.reward - got).abs().max())
        assert diff <= bound, (diff, bound)
        worst = max(worst, diff)
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["grpo", "rloo"])
def test_two_processes_ddp(trainer, tiny_dirs, heads_dir, tmp_path):
    base, reward = tiny_dirs
    reports = _launch(ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml", tmp_path / "run", base, reward, heads_dir,
                      "--trainer", trainer)
    _check_run(reports, base, reward, heads_dir)


@pytest.mark.slow
def test_two_processes_zero3_recipe_policy_with_colocated_reward(tiny_dirs, heads_dir, tmp_path):
    """recipes/accelerate/zero3.yaml as shipped (float32 on CPU). The tiny policy's tensors are
    below DeepSpeed's persistence threshold (1e5 elements), so ZeRO-3 keeps them whole on each rank;
    the next test partitions them."""
    pytest.importorskip("deepspeed")
    base, reward = tiny_dirs
    reports = _launch(ROOT / "recipes" / "accelerate" / "zero3.yaml", tmp_path / "run", base, reward, heads_dir)
    _check_run(reports, base, reward, heads_dir, zero3_policy=True)


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["grpo", "rloo"])
def test_two_processes_zero3_policy_and_sharded_reward(trainer, tiny_dirs, heads_dir, tmp_path):
    """ZeRO-3 with every policy tensor partitioned (persistence threshold 0), and the reward model
    sharded too (``shard="zero3"``): each rank holds half of each; rewards as unsharded, in 1 process."""
    pytest.importorskip("deepspeed")
    base, reward = tiny_dirs
    reports = _launch(ROOT / "tests" / "distributed" / "zero3_cpu.yaml", tmp_path / "run", base, reward, heads_dir,
                      "--shard", "zero3", "--trainer", trainer)
    for rep in reports:
        assert rep["policy_persistent_numel"] == 0 and 2 * rep["policy_numel_here"] >= rep["policy_numel_full"]
        assert rep["policy_numel_here"] < rep["policy_numel_full"]
    _check_run(reports, base, reward, heads_dir, zero3_policy=True, sharded=True)
