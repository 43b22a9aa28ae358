"""Scoring throughput: the reference path vs the engine, same model and inputs, one run.

Reference path (what kaist-cvml/MULTI-TAP does): one sample at a time, prompt padded to 1024
tokens, the full Qwen2VLForConditionalGeneration with logits, ``hidden_states[-1][:, -1]``.
Engine: ``MultiTapModel.score`` (batched, length-bucketed, image + prefix sharing, no lm_head).

Cases: (a) 16 distinct image-caption pairs; (b) a GRPO-shaped batch of 4 images x 8 captions.
Models: the tiny test model and a random "small" Qwen2-VL with realistic proportions
(text hidden 384, 4 layers; vision depth 4, embed 256), images at 560x560.

    OMP_NUM_THREADS=1 python benchmarks/score_throughput.py [--sizes tiny small] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from _timing import median_seconds  # noqa: E402

from multitap_rl import EngineConfig, MultiTapModel  # noqa: E402
from multitap_rl.testing import ReferenceScorer, build_tiny_multitap, make_image  # noqa: E402

WORDS = ("a red blue green small large circle square tree dog cat person sitting near the left right top "
         "bottom of picture with grass house sky bright dark shape").split()


def captions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))).capitalize() + "." for _ in range(n)]


def run_size(size: str, repeats: int) -> list[tuple]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base, reward = build_tiny_multitap(tmp, seed=0, size=size)
        model = MultiTapModel.from_pretrained(reward, base_model=base, device="cpu")
        plain = MultiTapModel.from_pretrained(reward, base_model=base, device="cpu",
                                              engine=EngineConfig(share_images=False, share_prefix=False))
        ref = ReferenceScorer(base, reward, os.path.join(tmp, "ref"))
        cases = {
            "16 distinct pairs": ([make_image(i, (640, 480)) for i in range(16)], captions(16, 1)),
            "GRPO 4 images x 8": ([make_image(i, (640, 480)) for i in range(4) for _ in range(8)], captions(32, 2)),
        }
        for name, (imgs, texts) in cases.items():
            n = len(texts)
            t_ref = median_seconds(lambda: [ref.score(im, t) for im, t in zip(imgs, texts)], max(1, repeats // 2))
            t_plain = median_seconds(lambda: plain.score(imgs, texts), repeats)
            t_eng = median_seconds(lambda: model.score(imgs, texts), repeats)
            # the engine must agree with the reference on these very inputs
            with torch.inference_mode():
                got = model.score(imgs[:4], texts[:4]).overall
            want = torch.tensor([ref.score(im, t) for im, t in zip(imgs[:4], texts[:4])])
            err = float((got - want).abs().max())
            rows.append((size, name, n / t_ref, n / t_plain, n / t_eng, t_ref / t_eng, t_plain / t_eng, err))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, images 560x560 after resize")
    header = (f"{'model':6} {'case':18} {'ref/s':>8} {'batched/s':>10} {'engine/s':>9} "
              f"{'engine/ref':>11} {'engine/batched':>15} {'max|diff|':>10}")
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        for row in run_size(size, args.repeats):
            size_, name, r, pl, e, x_ref, x_pl, err = row
            print(f"{size_:6} {name:18} {r:8.2f} {pl:10.2f} {e:9.2f} {x_ref:10.1f}x {x_pl:14.2f}x {err:10.1e}")
    print("\nref = reference path (1 sample/call, padded to 1024, full model with logits); batched = engine "
          "without image/prefix sharing; engine = default (sharing on). Ratios are throughput ratios.")


if __name__ == "__main__":
    main()
