"""Sharded (DeepSpeed ZeRO-3) reward models vs unsharded ones, launched by the slow tests with
``torchrun`` (2 CPU processes, gloo) -- or run in one process by the default suite.

For each tiny backbone given: score rank-dependent inputs with the unsharded model, then through
``multitap_objective_rewards(..., shard="zero3")``. The ranks' batches differ in content and size
(the scoring engine runs different numbers of micro-batches on each), and in the second round
one rank repeats its batch (a local cache hit) while the other does not: the ranks must agree to
recompute, or the gather would deadlock. In the third round one rank has nothing to score (empty
completions) and must still take part in the gather. Writes ``<out>/rank-<r>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--models", required=True, help="JSON list of [family, base_dir, reward_dir]")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from multitap_rl import ModelSpec, MultiTapModel
    from multitap_rl.sharding import local_numel
    from multitap_rl.testing import make_image
    from reward_fns import core, multitap_objective_rewards

    texts = ["A red circle.", "Two dogs on the grass near a tree.", "A tree.", "Blue square, top left.", "Sky."]
    report = {"rank": rank, "world": world, "models": {}}
    for family, base, reward in json.loads(args.models):
        n = 3 + 2 * rank  # rank 0: 3 samples over 2 images; rank 1: 5 samples over 3 images
        images = [make_image(10 * rank + i // 2) for i in range(n)]
        batch = (images, texts[:n])
        other = ([make_image(99)] * 2, ["Something else.", "Another caption."])
        plain = MultiTapModel.from_pretrained(reward, base_model=base, device="cpu")
        expected = {"first": plain.score(*batch).overall.tolist()}
        # round 2: rank 0 repeats its batch, rank 1 scores another one
        second = batch if rank == 0 else other
        expected["second"] = plain.score(*second).overall.tolist()
        del plain

        core.forget_scorers()
        # empty completions set aside (empty_reward=None): round 3 gives rank 1 nothing to score
        fn = multitap_objective_rewards(ModelSpec(checkpoint=reward, base_model=base, shard="zero3", device="cpu"),
                                        empty_reward=None)[0]
        prompts = lambda b: ["Describe this image."] * len(b[1])  # noqa: E731
        got = {"first": fn(prompts(batch), batch[1], image=batch[0]),
               "second": fn(prompts(second), second[1], image=second[0])}
        # round 3: rank 1 has nothing to score (its completions are empty); it must still take part
        third = batch if rank == 0 else ([make_image(5)] * 2, ["", "  "])
        expected["third"] = expected["first"] if rank == 0 else []
        out = fn(prompts(third), third[1], image=third[0])
        got["third"] = [v for v in out if v is not None]
        report.setdefault("empty_rank_rewards", out if rank == 1 else None)
        model = fn.scorer.model
        report["models"][family] = {
            "max_diff": max(abs(a - b) for k in got for a, b in zip(got[k], expected[k])),
            "lengths_match": all(len(got[k]) == len(expected[k]) for k in expected),
            "numel_here": local_numel(model),
            "numel_full": sum(int(q.ds_numel) for q in model.parameters()),
            "tensors": len(list(model.parameters())),
            "data_numel_between_calls": sum(q.data.numel() for q in model.parameters()),
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{rank}.json").write_text(json.dumps(report))
    dist.barrier()  # every rank has written its report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
    # Launched as a rank (not imported by a test): leave without the interpreter's native teardown,
    # which on CPU (gloo, DeepSpeed) now and then aborts a rank after all the work ("terminate called
    # without an active exception"), as tests/distributed/trl_run.py does.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
