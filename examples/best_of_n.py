"""Best-of-N captioning: sample N captions per image from a policy VLM, keep the best by MULTI-TAP.

    python examples/best_of_n.py --policy Qwen/Qwen2-VL-2B-Instruct \
        --checkpoint brl-xfact/Multi-TAP-Qwen2-VL-2B --images a.jpg b.jpg -n 8 --weights overall=1

Offline on tiny random models (captions are gibberish; the pipeline is the real one):

    OMP_NUM_THREADS=1 python examples/best_of_n.py --tiny -n 4
"""

from __future__ import annotations

import argparse
import logging
import tempfile

PROMPT = "Describe this image."


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--policy", default="Qwen/Qwen2-VL-2B-Instruct")
    p.add_argument("--checkpoint", default="brl-xfact/Multi-TAP-Qwen2-VL-2B")
    p.add_argument("--base-model", default=None)
    p.add_argument("--heads", default=None)
    p.add_argument("--weights", default=None)
    p.add_argument("--images", nargs="*", default=None)
    p.add_argument("-n", "--num-candidates", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def sample_captions(policy, processor, images, n: int, max_new_tokens: int, temperature: float) -> list[list[str]]:
    """N sampled captions per image (one generate call per image, N return sequences)."""
    import torch

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    out = []
    for image in images:
        inputs = processor(text=[prompt], images=[image], return_tensors="pt").to(policy.device)
        with torch.inference_mode():
            ids = policy.generate(**inputs, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                  num_return_sequences=n, max_new_tokens=max_new_tokens)
        texts = processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        out.append([t.strip() or "(empty)" for t in texts])
    return out


def main(argv=None):
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from multitap_rl import MultiTapModel
    from multitap_rl.backbones.qwen2_vl import image_only_processor
    from multitap_rl.images import load_image
    from reward_fns import rerank

    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    tmp = tempfile.TemporaryDirectory(prefix="best-of-n-")
    if args.tiny:
        from multitap_rl.testing import build_tiny_multitap, make_image

        base, ckpt = build_tiny_multitap(tmp.name, seed=0)
        args.policy, args.checkpoint, args.base_model = str(base), str(ckpt), str(base)
        images = [make_image(i, size=(96, 72)) for i in range(2)]
    else:
        images = [load_image(p, i) for i, p in enumerate(args.images or [])]
        if not images:
            raise SystemExit("pass --images (or --tiny)")
    policy = Qwen2VLForConditionalGeneration.from_pretrained(args.policy).eval()
    processor = image_only_processor(args.policy)
    candidates = sample_captions(policy, processor, images, args.num_candidates, args.max_new_tokens,
                                 args.temperature)
    reward_model = MultiTapModel.from_pretrained(args.checkpoint, base_model=args.base_model, heads=args.heads)
    ranked = rerank(reward_model, images, candidates, weights=args.weights)
    for i, lst in enumerate(ranked):
        print(f"image {i}: best of {len(lst)}: {lst[0].text!r} (reward {lst[0].reward:.4f})")
        for c in lst[1:]:
            print(f"    {c.reward:.4f}  {c.text!r}")
    tmp.cleanup()
    return ranked


if __name__ == "__main__":
    main()
