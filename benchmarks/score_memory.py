"""Peak memory of one ``score()`` call over N distinct images: streamed by chunk (the default,
``EngineConfig.max_images_per_chunk=64``) against preparing every image first (a chunk as large as
N, what the engine did before). Each measurement runs in a fresh process (peak RSS above its
baseline); the scores must be equal.

    OMP_NUM_THREADS=1 python benchmarks/score_memory.py [--n 128] [--size tiny|small]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _child(model_dir: str, n: int, chunk: int) -> None:
    import torch
    from PIL import Image

    from multitap_rl import EngineConfig, MultiTapModel

    torch.set_num_threads(1)
    model = MultiTapModel.from_pretrained(f"{model_dir}/reward", base_model=f"{model_dir}/base", device="cpu",
                                          engine=EngineConfig(max_images_per_chunk=chunk))
    images = [Image.new("RGB", (96, 72), ((7 * i) % 256, (13 * i) % 256, (29 * i) % 256)) for i in range(n)]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scores = model.score(images, ["a shape"] * n).overall
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mb": (peak - base) / 1024, "scores": scores.tolist()}))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=128, help="distinct images in the one call")
    p.add_argument("--size", default="tiny", choices=["tiny", "small"])
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    from multitap_rl.testing import build_tiny_multitap

    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_multitap(tmp, seed=0, size=args.size)
        runs = {}
        for label, chunk in (("streamed (chunk 64)", 64), (f"all at once (chunk {args.n})", args.n)):
            out = subprocess.run([sys.executable, __file__, "--child", tmp, str(args.n), str(chunk)],
                                 capture_output=True, text=True, check=True).stdout
            runs[label] = json.loads(out.strip().splitlines()[-1])
    (a_label, a), (b_label, b) = runs.items()
    same = max(abs(x - y) for x, y in zip(a["scores"], b["scores"]))
    print(f"{args.size} model, {args.n} distinct 560x560 images in one call (peak RSS above the loaded model):")
    print(f"  {a_label:<26} {a['peak_mb']:8.0f} MB")
    print(f"  {b_label:<26} {b['peak_mb']:8.0f} MB")
    print(f"  ratio {b['peak_mb'] / max(a['peak_mb'], 1):.1f}x; max |score difference| {same:.2g}")


if __name__ == "__main__":
    main()
