"""One TRL GRPO/RLOO run with co-located MULTI-TAP rewards, launched by the slow tests with
``accelerate launch`` (2 CPU processes over gloo, DDP or DeepSpeed ZeRO-3) or plainly (1 process).

Every rank writes ``<out>/rank-<r>.json``: where its reward model lives, how often it was loaded
and run, and every reward call (dataset row ids, completion texts, the rewards returned), so the
test can replay the same inputs in one process and compare.

Reward functions: the weighted ``multitap_reward`` (``normalize`` as given) and one
``multitap_objective_rewards`` callable per dimension, all from the same checkpoint path (one
spec, so one model and one forward per step and rank).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--trainer", choices=["grpo", "rloo"], default="grpo")
    p.add_argument("--base", required=True)
    p.add_argument("--reward", required=True)
    p.add_argument("--heads", default=None)
    p.add_argument("--weights", default="overall=1")
    p.add_argument("--normalize", default="running")
    p.add_argument("--shard", default=None, help="shard the reward model: zero3")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-generations", type=int, default=2)
    p.add_argument("--max-completion-length", type=int, default=6)
    return p.parse_args(argv)


class Counting:
    """Counts MultiTapModel loads and forwards in this process (instrumentation only)."""

    loads = 0
    forwards = 0

    @classmethod
    def install(cls):
        from multitap_rl.model import MultiTapModel

        load, score = MultiTapModel.from_pretrained.__func__, MultiTapModel.score

        def from_pretrained(klass, *a, **k):
            cls.loads += 1
            return load(klass, *a, **k)

        def counted_score(self, *a, **k):
            cls.forwards += 1
            return score(self, *a, **k)

        MultiTapModel.from_pretrained = classmethod(from_pretrained)
        MultiTapModel.score = counted_score


class Recording:
    """Wraps a TRL reward callable; records what it was given and what it returned."""

    def __init__(self, fn, log: list):
        self.fn, self.log, self.__name__ = fn, log, fn.__name__

    def __call__(self, prompts, completions, **kwargs):
        from reward_fns.trl import completion_text

        out = self.fn(prompts, completions, **kwargs)
        self.log.append({"name": self.__name__, "idx": list(kwargs["idx"]),
                         "texts": [completion_text(c) for c in completions], "rewards": out})
        return out


def _max_change(model, before: dict) -> float:
    """Largest |change| of any policy parameter (ZeRO-3 partitions gathered first)."""
    import contextlib

    params = dict(model.named_parameters())
    ctx = contextlib.nullcontext()
    if any(hasattr(p, "ds_tensor") for p in params.values()):
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None)
    with ctx:
        return max(float((params[n].detach() - b).abs().max()) for n, b in before.items())


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    Counting.install()
    from multitap_rl.testing import make_image
    from multitap_rl import ModelSpec
    from reward_fns import multitap_objective_rewards, multitap_reward
    from reward_fns.captioner import build_captioner_trainer, captioning_dataset

    ds = captioning_dataset([make_image(i, size=(56, 56)) for i in range(args.images)])
    ds = ds.add_column("idx", list(range(args.images)))
    spec = ModelSpec(checkpoint=args.reward, base_model=args.base, heads=args.heads, shard=args.shard or None)
    weighted = multitap_reward(spec, weights=args.weights, normalize=args.normalize)
    objectives = multitap_objective_rewards(spec)
    log: list = []
    funcs = [Recording(f, log) for f in [weighted, *objectives]]
    out = Path(args.out)
    trainer = build_captioner_trainer(
        args.base, funcs, ds, trainer=args.trainer, output_dir=str(out / "trainer"),
        num_generations=args.num_generations, batch_size=args.batch_size,
        max_completion_length=args.max_completion_length, max_steps=args.steps, learning_rate=1e-2,
        reward_weights=[1.0] + [0.5] * len(objectives),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = _max_change(trainer.model, before)

    from accelerate import PartialState

    state = PartialState()
    scorer = weighted.scorer
    model = scorer.model
    params = list(model.parameters())
    from multitap_rl.sharding import local_numel

    policy = [p for p in trainer.model_wrapped.parameters()]
    report = {
        "rank": state.process_index,
        "world": state.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "process_device": str(state.device),
        "reward_device": str(model.device),
        "loads": Counting.loads,
        "forwards": Counting.forwards,
        "same_scorer": all(f.scorer is scorer for f in objectives),
        "reward_numel_here": local_numel(model),
        "reward_numel_full": sum(int(getattr(p, "ds_numel", p.numel())) for p in params),
        "policy_numel_here": local_numel(trainer.model_wrapped),
        "policy_zero3": all(hasattr(p, "ds_tensor") for p in policy),
        "policy_persistent_numel": sum(p.numel() for p in policy if getattr(p, "ds_persist", False)),
        "policy_numel_full": sum(int(getattr(p, "ds_numel", p.numel())) for p in policy),
        "running": weighted.combiner.running.state_dict() if weighted.combiner.running is not None else None,
        "calls": log,
        "policy_steps": trainer.state.global_step,
        "policy_max_change": changed,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{state.process_index}.json").write_text(json.dumps(report))
    # Every rank has written its report once all pass this barrier; then leave without the
    # interpreter's native teardown. On CPU (gloo) a rank now and then aborts there after all the
    # work is done ("terminate called without an active exception", no Python frame left): seen
    # under DeepSpeed ZeRO-3 (2 of 14 runs without any MULTI-TAP sharding; with and without
    # destroy_process_group() first) and under DDP (1 of 14 runs). The harness must not fail on that.
    state.wait_for_everyone()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    import faulthandler

    faulthandler.enable()  # a native abort prints every thread's Python stack
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
