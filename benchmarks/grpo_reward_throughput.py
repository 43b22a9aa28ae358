"""GRPO reward throughput: reward calls/s of ``reward_fns.multitap_reward`` as TRL calls it.

One call = one GRPO step's reward batch: P prompts (images) x G completions, each image passed G
times as separate decoded copies (what TRL's repeat sampler yields). Compared in one run, same
model and inputs:

* reference -- the kaist-cvml/MULTI-TAP path: one sample at a time, padded to 1024, full model
  with logits;
* no sharing -- our batched engine with image and prefix sharing turned off;
* sharing -- the default: each image through the vision tower once, its prompt prefix once.

    OMP_NUM_THREADS=1 python benchmarks/grpo_reward_throughput.py [--sizes tiny small] [--prompts 4]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from _timing import median_seconds  # noqa: E402

from multitap_rl import EngineConfig, MultiTapModel  # noqa: E402
from multitap_rl.testing import ReferenceScorer, build_tiny_multitap, make_image  # noqa: E402
from reward_fns import multitap_reward  # noqa: E402

PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
WORDS = "a red blue small large circle square tree dog near the left top of picture with grass house".split()


def grpo_batch(n_prompts: int, g: int, seed: int):
    import random

    rng = random.Random(seed)
    originals = [make_image(i, (640, 480)) for i in range(n_prompts)]
    images = [copy.deepcopy(originals[i // g]) for i in range(n_prompts * g)]  # separate copies
    completions = [[{"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30)))}]
                   for _ in images]
    return [PROMPT] * len(images), completions, images


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    p.add_argument("--prompts", type=int, default=4, help="images per reward call")
    p.add_argument("--groups", type=int, nargs="+", default=[4, 8], help="G: completions per image")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, {args.prompts} images per call")
    head = (f"{'model':6} {'G':>3} {'ref calls/s':>12} {'no-share calls/s':>17} {'share calls/s':>14} "
            f"{'share/ref':>10} {'share/no-share':>15}")
    print(head)
    print("-" * len(head))
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            base, ckpt = build_tiny_multitap(tmp, seed=0, size=size)
            shared = multitap_reward(MultiTapModel.from_pretrained(ckpt, base_model=base, device="cpu"))
            unshared = multitap_reward(MultiTapModel.from_pretrained(
                ckpt, base_model=base, device="cpu", engine=EngineConfig(share_images=False, share_prefix=False)))
            ref = ReferenceScorer(base, ckpt, os.path.join(tmp, "ref"))
            for g in args.groups:
                prompts, completions, images = grpo_batch(args.prompts, g, seed=g)
                texts = [c[0]["content"] for c in completions]

                def call(fn):  # fresh list objects each call: no cross-call caching
                    return lambda: fn(prompts=list(prompts), completions=list(completions), image=list(images))

                t_share = median_seconds(call(shared), args.repeats)
                t_plain = median_seconds(call(unshared), args.repeats)
                t_ref = median_seconds(lambda: [ref.score(im, t) for im, t in zip(images, texts)], 1)
                a = torch.tensor(call(shared)())
                b = torch.tensor([ref.score(im, t) for im, t in zip(images[:g], texts[:g])])
                assert torch.allclose(a[:g], b, atol=1e-5), (a[:g], b)
                print(f"{size:6} {g:>3} {1 / t_ref:12.3f} {1 / t_plain:17.3f} {1 / t_share:14.3f} "
                      f"{t_ref / t_share:9.1f}x {t_plain / t_share:14.1f}x")
    print("\nOne call = one GRPO reward batch. Rewards of the sharing path equal the reference's (checked, 1e-5).")


if __name__ == "__main__":
    main()
