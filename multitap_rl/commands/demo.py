"""``multitap-rl demo``: the main job end to end.

Offline (the default) it builds the tiny seeded models in a temporary directory; pass
``--checkpoint``/``--base-model`` (hub ids or directories) for real ones. It scores captions for
a few images and reranks each image's candidates, printing a table.
"""

from __future__ import annotations

import tempfile

CANDIDATES = [
    "A photo.",
    "A red circle on a dark background.",
    "A small bright shape near the top left corner of the picture.",
    "Two dogs sitting on the grass next to a house.",
]


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", default=None, help="MULTI-TAP checkpoint (default: tiny offline model)")
    p.add_argument("--base-model", default=None, help="base LVLM for --checkpoint")
    p.add_argument("--images", nargs="*", default=None, help="image files (default: generated shapes)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)


def run(args) -> int:
    from ..model import MultiTapModel
    from ..testing import build_tiny_multitap, make_image

    with tempfile.TemporaryDirectory(prefix="multitap-demo-") as tmp:
        if args.checkpoint is None:
            base, ckpt = build_tiny_multitap(tmp, seed=0)
            print(f"[demo] offline: tiny random models written to {tmp} (scores are not meaningful)")
        else:
            base, ckpt = args.base_model, args.checkpoint
        model = MultiTapModel.from_pretrained(ckpt, base_model=base, device=args.device, dtype=args.dtype)
        images = args.images or [make_image(i, size=(96, 72)) for i in range(3)]
        flat_images = [im for im in images for _ in CANDIDATES]
        flat_texts = [c for _ in images for c in CANDIDATES]
        scores = model.score(flat_images, flat_texts)
        rows = scores.rows()
        for i, _ in enumerate(images):
            print(f"\nimage {i}: candidates ranked by overall score")
            block = rows[i * len(CANDIDATES) : (i + 1) * len(CANDIDATES)]
            for rank, j in enumerate(sorted(range(len(block)), key=lambda j: -block[j]["overall"]), start=1):
                extra = "  ".join(f"{k}={v:.3f}" for k, v in block[j].items() if k != "overall")
                print(f"  {rank}. {block[j]['overall']:.4f}  {CANDIDATES[j]!r}  {extra}")
    return 0
