"""verl reward throughput: a GRPO-shaped batch scored by ``reward_fns.verl.MultiTapRewardManager``
(the reward loop's concurrent ``run_single`` calls merged into one engine call) vs verl's per-sample
custom reward function ``reward_fns.verl.compute_score`` (one engine call per trajectory), same
model and inputs, in one run. Needs verl (``pip install 'multitap-rl[verl]'``).

    OMP_NUM_THREADS=1 python benchmarks/verl_manager_throughput.py [--images 8] [--g 8] [--size tiny]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pickle
import sys
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _timing import median_seconds  # noqa: E402

from multitap_rl.testing import build_tiny_multitap, make_image  # noqa: E402
from reward_fns import core  # noqa: E402

WORDS = "a red blue small large circle square tree dog near the left top of picture with grass house".split()


def trajectories(tokenizer, images, g: int, seed: int) -> tuple[list, list[str]]:
    """verl DataProto trajectories (as its agent loop makes them, pickled as Ray sends them) and texts."""
    import random

    from tensordict import TensorDict
    from verl import DataProto

    rng = random.Random(seed)
    data, texts = [], []
    prompt = torch.tensor(tokenizer("<|im_start|>user\nDescribe this image.<|im_end|>\n")["input_ids"])
    for image in images:
        messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                  {"type": "text", "text": "Describe this image."}]}]
        for _ in range(g):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))).capitalize() + "."
            resp = torch.tensor(tokenizer(text)["input_ids"])
            ids = torch.cat([prompt, resp])
            batch = TensorDict({"prompts": prompt[None], "responses": resp[None], "input_ids": ids[None],
                                "attention_mask": torch.ones_like(ids)[None]}, batch_size=1)
            non_tensor = {"raw_prompt": np.array([messages]), "data_source": np.array(["bench"]),
                          "extra_info": np.array([{}])}
            data.append(pickle.loads(pickle.dumps(DataProto(batch=batch, non_tensor_batch=non_tensor))))
            texts.append(text)
    return data, texts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--g", type=int, default=8, help="responses per image (the GRPO group)")
    p.add_argument("--size", default="tiny", choices=["tiny", "small"])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.trainer.ppo.reward import load_reward_manager

    from reward_fns.verl import compute_score

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        base, ckpt = build_tiny_multitap(tmp, seed=0, size=args.size)
        kwargs = {"model_or_path": str(ckpt), "base_model": str(base), "device": "cpu"}
        cfg = OmegaConf.create({"reward": {"reward_manager": {
            "source": "importlib", "name": "MultiTapRewardManager",
            "module": {"path": "pkg://reward_fns.verl", "name": "custom_reward_manager"}},
            "custom_reward_function": {"path": None, "name": "compute_score", "reward_kwargs": kwargs}}})
        tokenizer = AutoTokenizer.from_pretrained(base)
        mgr = load_reward_manager(cfg, tokenizer, reward_router_address=None, reward_model_tokenizer=None)
        images = [make_image(i, (640, 480)) for i in range(args.images)]
        data, texts = trajectories(tokenizer, images, args.g, seed=0)

        def manager():
            return mgr.loop.run_until_complete(asyncio.gather(*[mgr.run_single(d) for d in data]))

        def per_sample():
            return [compute_score("bench", t, "", {"image": images[i // args.g]}, **kwargs)
                    for i, t in enumerate(texts)]

        batched, single = manager(), per_sample()
        diff = max(abs(a["reward_score"] - b["score"]) for a, b in zip(batched, single))
        t_mgr = median_seconds(manager, args.repeats)
        t_one = median_seconds(per_sample, args.repeats)
    n = len(data)
    print(f"{'model':6} {'batch':>9} {'per-sample s':>13} {'manager s':>10} {'manager/per-sample':>19} {'max |diff|':>11}")
    print(f"{args.size:6} {f'{args.images}x{args.g}':>9} {t_one:13.3f} {t_mgr:10.3f} {t_one / t_mgr:18.1f}x "
          f"{diff:11.2g}")
    print(f"({n} trajectories; the manager made {mgr.batcher.calls} engine call(s) over "
          f"{2 + args.repeats} rounds)", file=sys.stderr)
    core.forget_scorers()


if __name__ == "__main__":
    main()
