"""The colour world for tiny text-to-image RL, checked by the pixels alone.

Prompts name one of four colours (``COLORS``) in a template; the policy is a tiny seeded Stable
Diffusion pipeline; the reward is a tiny MULTI-TAP judge trained with stage 1 on synthetic colour /
caption rows; the oracle is the fraction of held-out generations (``HELDOUT_TEMPLATES`` x
``COLORS`` x ``EVAL_SEEDS``, one fixed generator per image) whose dominant nearest-palette pixel
colour is the prompt's colour. The learning loop sees prompts from ``TRAIN_TEMPLATES`` and the
judge's scores only; the oracle is evaluation.

* :func:`build_world` -- the tiny SD pipeline (:func:`build_tiny_sd`) and the judge
  (:func:`train_judge`) in a directory, reused when already there (every build is seeded);
* :func:`prompt_fn` -- a TRL DDPO/AlignProp ``prompt_fn`` over the training templates;
* :func:`evaluate` / :func:`oracle` -- the fixed-seed held-out evaluation and the pixel oracle;
* :func:`save_grid` / :func:`save_curve` -- before/after image grid, reward curve (matplotlib).

The tiny SD's VAE is not the random one of :mod:`multitap_rl.testing.diffusion`: that decoder
(one channel per GroupNorm group) cannot output a spatially constant colour. Here the decoder has 4
channels per group and is fitted to Stable Diffusion v1's approximately linear latent -> RGB map,
so small latent offsets move the image's colour, as with a real SD VAE.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..data.shapes import SHAPE_COLORS

__all__ = [
    "COLORS", "EVAL_SEEDS", "HELDOUT_TEMPLATES", "PALETTE", "TRAIN_TEMPLATES", "build_tiny_sd", "build_world",
    "colour_share", "dominant_colors", "evaluate", "generate", "judge_rows", "oracle", "pretrain_policy",
    "prompt_color", "prompt_dependence", "prompt_fn", "prompts", "save_curve", "save_grid", "scene_latents",
    "solid_images", "tiny_sd", "train_judge",
]

COLORS = ("red", "green", "blue", "yellow")
PALETTE = torch.tensor([SHAPE_COLORS[c] for c in COLORS], dtype=torch.float32) / 255.0  # (K, 3)
NEUTRALS = {"grey": (128, 128, 128), "white": SHAPE_COLORS["white"], "black": SHAPE_COLORS["black"]}
STRICT_PALETTE = torch.cat([PALETTE, torch.tensor(list(NEUTRALS.values()), dtype=torch.float32) / 255.0])

TRAIN_TEMPLATES = (
    "a {c} image",
    "a photo of something {c}",
    "a {c} painting",
    "a {c} circle",
    "a large {c} square",
    "a photo of a {c} triangle",
    "a small {c} cross",
    "a bright {c} background",
)
HELDOUT_TEMPLATES = (
    "a {c} house",
    "a picture of a {c} car",
    "{c}",
    "an image that is {c}",
    "a {c} dog on the grass",
    "a drawing in {c}",
    "the {c} one",
    "a {c} flower in the center",
)
EVAL_SEEDS = (1000, 1001)


def prompts(templates=HELDOUT_TEMPLATES, colors=COLORS) -> list[tuple[str, str]]:
    """[(prompt, colour)] for every template x colour."""
    return [(t.format(c=c), c) for t in templates for c in colors]


def prompt_color(prompt: str) -> str:
    """The palette colour a prompt names (its first word that is one)."""
    for word in prompt.replace(",", " ").split():
        if word in COLORS:
            return word
    raise ValueError(f"{prompt!r} names none of {COLORS}")


def prompt_fn(seed: int, templates=TRAIN_TEMPLATES):
    """A TRL ``prompt_fn`` (no arguments -> ``(prompt, {})``): the colours in turn (balanced
    batches), each with a template drawn by ``random.Random(seed)``."""
    rng = random.Random(seed)
    state = {"n": 0}

    def fn():
        colour = COLORS[state["n"] % len(COLORS)]
        state["n"] += 1
        return rng.choice(templates).format(c=colour), {}

    return fn


# -- the oracle (pixels only) ---------------------------------------------------------------------
def _pixel_labels(images: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, H*W): each pixel's nearest palette colour (RGB distance)."""
    px = images.detach().float().cpu().permute(0, 2, 3, 1).reshape(images.shape[0], -1, 3)
    return torch.cdist(px, palette[None].expand(px.shape[0], -1, -1)).argmin(-1)


def dominant_colors(images: torch.Tensor, strict: bool = False) -> list[str]:
    """The most frequent nearest-palette colour of each image; ``strict`` adds grey, white and black
    to the palette (an image that stays grey then counts as grey)."""
    palette, names = (STRICT_PALETTE, COLORS + tuple(NEUTRALS)) if strict else (PALETTE, COLORS)
    labels = _pixel_labels(images, palette)
    counts = torch.stack([(labels == k).sum(1) for k in range(len(names))], 1)
    return [names[int(i)] for i in counts.argmax(1)]


def oracle(images: torch.Tensor, colors: list[str]) -> dict:
    """``accuracy``: fraction of images whose dominant colour over the four palette colours is the
    prompt's colour (the reported oracle); ``strict``: the same with grey/white/black added;
    ``share``: mean fraction of pixels whose nearest strict-palette colour is the prompt's;
    ``confusion``: ``{prompt colour: {dominant colour: images}}`` (which colours a policy collapses
    onto which)."""
    if len(colors) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images, {len(colors)} colours")
    dom = dominant_colors(images)
    strict = dominant_colors(images, strict=True)
    share = colour_share(images, colors)
    pairs = Counter(zip(colors, dom))
    return {"accuracy": float(np.mean([d == c for d, c in zip(dom, colors)])),
            "strict": float(np.mean([d == c for d, c in zip(strict, colors)])),
            "share": float(share.mean()), "dominant": dom,
            "confusion": {c: {d: pairs[c, d] for d in COLORS} for c in COLORS}}


def colour_share(images: torch.Tensor, colors: list[str]) -> torch.Tensor:
    """(B,): each image's fraction of pixels whose nearest strict-palette colour is its own colour."""
    idx = torch.tensor([COLORS.index(c) for c in colors])
    return (_pixel_labels(images, STRICT_PALETTE) == idx[:, None]).float().mean(1)


def solid_images(n_per_color: int, seed: int, size: int = 32, noise: float = 0.05) -> tuple[torch.Tensor, list[str]]:
    """Solid palette-colour images with Gaussian pixel noise, (4 n, 3, size, size), and their colours."""
    g = torch.Generator().manual_seed(seed)
    ims, cols = [], []
    for k, c in enumerate(COLORS):
        for _ in range(n_per_color):
            ims.append((PALETTE[k].view(3, 1, 1) + noise * torch.randn(3, size, size, generator=g)).clamp(0, 1))
            cols.append(c)
    return torch.stack(ims), cols


# -- the tiny SD pipeline ---------------------------------------------------------------------------
# Stable Diffusion v1's approximately linear latent -> RGB map (its "latent preview" factors), RGB in [-1, 1].
LATENT_RGB = torch.tensor([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721],
                           [-0.2120, -0.2616, -0.7177]])


def _fit_latents(g, n, side):
    z = torch.randn(n, 4, side, side, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 1.5
    smooth = torch.nn.functional.interpolate(torch.randn(n, 4, 2, 2, generator=g), size=(side, side),
                                             mode="bilinear", align_corners=False)
    return z + smooth * torch.rand(n, 1, 1, 1, generator=g) * 2 + torch.randn(n, 4, 1, 1, generator=g) * 1.5


def _fit_decoder(vae, steps: int, seed: int, batch: int = 32, lr: float = 3e-3) -> float:
    """Fit the VAE's decoder (in place) to ``LATENT_RGB`` on random latents; the final MSE. The
    encoder stays random (the trainers only decode)."""
    sf = vae.config.scaling_factor
    opt = torch.optim.Adam(list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters()), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    g = torch.Generator().manual_seed(seed)
    size = vae.config.sample_size
    side = size // 2 ** (len(vae.config.block_out_channels) - 1)
    vae.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        z = _fit_latents(g, batch, side)
        target = torch.nn.functional.interpolate(torch.einsum("bchw,cd->bdhw", z, LATENT_RGB), size=(size, size),
                                                 mode="bilinear", align_corners=False).clamp(-1, 1)
        loss = ((vae.decode(z / sf).sample - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    vae.eval()
    return float(loss.detach())


def tiny_sd(seed: int = 0, image_size: int = 32, fit_steps: int = 200):
    """``multitap_rl.testing.tiny_stable_diffusion_pipeline(seed)`` (random UNet and CLIP text
    encoder, DDIM) with a VAE whose decoder is fitted to ``LATENT_RGB`` for ``fit_steps``."""
    from diffusers import AutoencoderKL

    from ..testing.diffusion import tiny_stable_diffusion_pipeline

    pipe = tiny_stable_diffusion_pipeline(seed, image_size=image_size)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=image_size, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        block_out_channels=(16, 16, 16), norm_num_groups=4)
    _fit_decoder(vae, steps=fit_steps, seed=seed)
    pipe.vae = vae.eval().requires_grad_(False)
    pipe.register_modules(vae=pipe.vae)
    return pipe


def build_tiny_sd(out_dir: str | Path, seed: int = 0, image_size: int = 32, fit_steps: int = 200) -> Path:
    """Write :func:`tiny_sd` to ``out_dir`` (reused when ``model_index.json`` is there)."""
    out = Path(out_dir)
    if not (out / "model_index.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        tiny_sd(seed, image_size, fit_steps).save_pretrained(out, safe_serialization=True)
    return out


# -- the judge ------------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    """(size, size, 3) noise in ~[-1, 1], bilinearly upsampled from a (scale x scale) grid."""
    from PIL import Image

    small = rng.standard_normal((scale, scale, 3)).astype(np.float32)
    im = np.stack([np.asarray(Image.fromarray(small[..., ch]).resize((size, size), Image.BILINEAR))
                   for ch in range(3)], -1)
    return im / (np.abs(im).max() + 1e-6)


def judge_rows(n: int, seed: int, size: int = 32, templates=TRAIN_TEMPLATES, p_right: float = 0.5) -> list[dict]:
    """Stage-1 rows ``{image (PIL), text, score}`` (plus ``color``, ``named``): a palette colour of
    strength ``a`` covers a fraction ``f`` of a grey-ish noisy background (like the untrained
    pipeline's samples); the caption names that colour (score ``a * f``) or another (score 0)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pyr = random.Random(seed)
    rows = []
    for _ in range(n):
        img = 0.5 + rng.uniform(-0.15, 0.15) + 0.15 * _smooth_noise(rng, size, int(rng.integers(2, 17)))
        img = img + rng.normal(0, 0.06, (size, size, 3))
        k = int(rng.integers(len(COLORS)))
        kind = rng.random()
        a = f = 0.0  # kind < 0.15: no colour, every caption scores 0
        if kind >= 0.15:
            a = float(rng.uniform(0.3, 1.0)) if rng.random() < 0.7 else 1.0
            if kind < 0.55:  # the whole image tinted
                mask = np.ones((size, size), np.float32)
            else:  # a blob: a smooth noise field above a random level
                field = _smooth_noise(rng, size, int(rng.integers(2, 7)))[..., 0]
                mask = (field > np.quantile(field, rng.uniform(0.0, 0.9))).astype(np.float32)
            col = PALETTE[k].numpy() + rng.normal(0, 0.04, 3)
            img = img * (1 - a * mask[..., None]) + a * mask[..., None] * col
            if rng.random() < 0.3:  # a second colour in a minority region
                k2 = int(rng.choice([j for j in range(len(COLORS)) if j != k]))
                field = _smooth_noise(rng, size, 3)[..., 0]
                m2 = (field > np.quantile(field, rng.uniform(0.7, 0.95))).astype(np.float32)
                img = img * (1 - m2[..., None]) + m2[..., None] * PALETTE[k2].numpy()
                mask = mask * (1 - m2)
            f = float(mask.mean())
        named = k if rng.random() < p_right else int(rng.choice([j for j in range(len(COLORS)) if j != k]))
        rows.append({"image": Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)),
                     "text": pyr.choice(templates).format(c=COLORS[named]),
                     "score": float(a * f) if named == k else 0.0, "color": COLORS[k], "named": COLORS[named]})
    return rows


JUDGE_STAGE1 = {
    "model": {"image_size": 56, "max_length": 1024, "dtype": "float32"},
    "train": {"finetune": "full", "loss": "mse", "learning_rate": 1e-3, "head_learning_rate": 1e-2,
              "lr_scheduler": "constant", "batch_size": 32, "eval_batch_size": 64, "progress": False,
              "resume": "never", "mixed_precision": "no", "log_every": 50},
}


def train_judge(out_dir: str | Path, seed: int = 0, steps: int = 300, n_train: int = 2048, n_eval: int = 256) -> dict:
    """A tiny random Qwen2-VL (weights std 0.125) trained with stage 1 (``train_stage1``, full
    fine-tune, MSE) on :func:`judge_rows`; returns a summary whose ``model`` is the MULTI-TAP
    checkpoint directory. Reused when ``out_dir/summary.json`` exists."""
    from ..testing.qwen2_vl import build_tiny_qwen2_vl
    from ..training import train_stage1

    out = Path(out_dir)
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    t0 = time.perf_counter()
    base = build_tiny_qwen2_vl(out / "base", seed=seed, initializer_range=0.125)
    keep = ("image", "text", "score")
    train = [{k: r[k] for k in keep} for r in judge_rows(n_train, seed=seed)]
    held = [{k: r[k] for k in keep} for r in judge_rows(n_eval, seed=seed + 10_007)]
    cfg = {k: dict(v) for k, v in JUDGE_STAGE1.items()}
    cfg["model"].update(base_model=str(base), head_seed=seed)
    cfg["train"].update(output_dir=str(out / "stage1"), max_steps=steps, eval_every=steps, seed=seed)
    res = train_stage1(cfg, train_data=train, eval_data=held)
    summary = {"model": str(Path(res.model_dirs["multitap"]).resolve()), "steps": steps, "n_train": n_train,
               "metrics": res.metrics, "seconds": round(time.perf_counter() - t0, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


# -- a pretrained policy: a tiny SD whose samples are colour scenes, whatever the prompt ----------------
def scene_latents(n: int, generator: torch.Generator, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (n, 4, side, side), and each scene's colour index (n,), that the world's VAE decodes
    to colour scenes like :func:`judge_rows`' images: a grey-ish smooth background and one palette
    colour, uniformly drawn, tinting the whole image or a smooth blob (RGB mapped to latents through the
    pseudo-inverse of ``LATENT_RGB``, plus a little latent noise)."""
    g = generator

    def smooth(scale):
        return torch.nn.functional.interpolate(torch.randn(n, 1, scale, scale, generator=g), size=(side, side),
                                               mode="bilinear", align_corners=False)

    rgb = (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.3 + 0.3 * smooth(3).expand(-1, 3, -1, -1)
    k = torch.randint(len(COLORS), (n,), generator=g)
    colour = (PALETTE[k] * 2 - 1)[:, :, None, None]
    strength = torch.rand(n, 1, 1, 1, generator=g) * 0.5 + 0.5
    blob = smooth(2)
    ranked = blob.flatten(1).sort(dim=1).values  # a blob covers 30-100% of the image
    level = ranked.gather(1, (torch.rand(n, 1, generator=g) * 0.7 * ranked.shape[1]).long())[:, 0]
    whole = torch.rand(n, generator=g) < 0.4
    mask = torch.where(whole[:, None, None, None], torch.ones_like(blob), (blob > level[:, None, None, None]).float())
    rgb = rgb * (1 - strength * mask) + strength * mask * colour
    z = torch.einsum("bchw,cd->bdhw", rgb.clamp(-1, 1), torch.linalg.pinv(LATENT_RGB))
    return z + 0.1 * torch.randn(z.shape, generator=g), k


def pretrain_policy(sd_dir: str | Path, out_dir: str | Path, seed: int = 0, steps: int = 1500, batch: int = 64,
                    lr: float = 1e-3, caption_match: float = 1.0) -> Path:
    """Train the tiny SD's UNet as a denoiser (DDPM noise-prediction MSE) on :func:`scene_latents`
    captioned with a training template naming the scene's colour with probability ``caption_match``
    and a uniformly drawn colour otherwise (10% of captions empty), so that, as a pretrained
    text-to-image model's, its samples vary in content and follow the prompt only partly (not at
    all at ``caption_match=0``; at the default 1.0 and 1500 steps, the held-out oracle of 4-step
    samples is about 0.48, chance 0.25). Written to ``out_dir`` (reused when ``model_index.json``
    is there)."""
    from diffusers import StableDiffusionPipeline

    out = Path(out_dir)
    if (out / "model_index.json").is_file():
        return out
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir), safety_checker=None, requires_safety_checker=False)
    unet, scheduler = pipe.unet, pipe.scheduler
    captions = [""] + [p for p, _ in prompts(TRAIN_TEMPLATES)]  # template-major: colour = (i - 1) % 4
    with torch.no_grad():
        emb = pipe.encode_prompt(captions, "cpu", 1, False)[0]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * (1 - s / steps))
    side = unet.config.sample_size
    T = scheduler.config.num_train_timesteps
    unet.train()
    for _ in range(steps):
        z, k = scene_latents(batch, g, side)
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(T, (batch,), generator=g)
        drawn = torch.randint(len(COLORS), (batch,), generator=g)
        named = torch.where(torch.rand(batch, generator=g) < caption_match, k, drawn)
        template = torch.randint(len(TRAIN_TEMPLATES), (batch,), generator=g)
        cap = torch.where(torch.rand(batch, generator=g) < 0.1, 0, 1 + template * len(COLORS) + named)
        pred = unet(scheduler.add_noise(z, noise, t), t, encoder_hidden_states=emb[cap]).sample
        loss = ((pred - noise) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    unet.eval()
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "pretrain.json").write_text(json.dumps({"steps": steps, "batch": batch, "lr": lr, "seed": seed,
                                                   "caption_match": caption_match,
                                                   "final_loss": float(loss.detach())}))
    return out


def build_world(root: str | Path, seed: int = 0, policy: str = "random") -> dict:
    """The tiny SD pipeline and the judge under ``root`` (``sd-s{seed}``, ``judge-s{seed}``; each
    reused when present): ``{"sd": dir, "judge": checkpoint dir, "judge_summary": ..., "seconds": ...}``.
    ``policy="pretrained"``: ``"sd"`` is :func:`pretrain_policy`'s pipeline (``sd-pretrained-s{seed}``)."""
    if policy not in ("random", "pretrained"):
        raise ValueError(f"policy must be 'random' or 'pretrained', got {policy!r}")
    root = Path(root)
    t0 = time.perf_counter()
    sd = build_tiny_sd(root / f"sd-s{seed}", seed=seed)
    if policy == "pretrained":
        sd = pretrain_policy(sd, root / f"sd-pretrained-s{seed}", seed=seed)
    t1 = time.perf_counter()
    judge = train_judge(root / f"judge-s{seed}", seed=seed)
    t2 = time.perf_counter()
    return {"sd": str(sd), "judge": judge["model"], "judge_summary": judge,
            "seconds": {"tiny_sd": round(t1 - t0, 1), "judge": round(t2 - t1, 1)}}


# -- evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def generate(sd_pipe, prompt_list, seeds, *, steps: int, guidance: float, eta: float = 1.0, batch: int = 32):
    """Images (N, 3, H, W) in [0, 1] for every seed x prompt (one fixed generator per image) and
    their (prompt, seed) items."""
    items = [(p, s) for s in seeds for p in prompt_list]
    out = []
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        gens = [torch.Generator().manual_seed(s * 100_003 + j) for j, (_, s) in enumerate(chunk, start=i)]
        res = sd_pipe([p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance, eta=eta,
                      generator=gens, output_type="pt")
        out.append(res.images.float().cpu())
    return torch.cat(out), items


def evaluate(sd_pipe, *, steps: int, guidance: float, eta: float = 1.0, templates=HELDOUT_TEMPLATES,
             seeds=EVAL_SEEDS) -> dict:
    """:func:`oracle` on ``templates`` x ``COLORS`` x ``seeds``, plus ``images``, ``prompts``, ``colors``."""
    was_training = sd_pipe.unet.training
    sd_pipe.unet.eval()
    pc = prompts(templates)
    images, items = generate(sd_pipe, [p for p, _ in pc], seeds, steps=steps, guidance=guidance, eta=eta)
    sd_pipe.unet.train(was_training)
    colors = [prompt_color(p) for p, _ in items]
    res = oracle(images, colors)
    res.update(images=images, prompts=[p for p, _ in items], colors=colors)
    return res


@torch.no_grad()
def prompt_dependence(sd_pipe, *, steps: int, guidance: float, eta: float = 1.0, templates=HELDOUT_TEMPLATES[:4],
                      seeds=EVAL_SEEDS) -> float:
    """The share of the samples' mean-colour variance that the colour word explains when all else is
    held fixed: each template is sampled with the four colours from the same random draws (one seed
    for all four), and the variance across the four is compared with the variance over everything.
    0: the policy ignores the colour in the prompt; 1: only the colour word sets the colour."""
    was_training = sd_pipe.unet.training
    sd_pipe.unet.eval()
    cells = []
    for s in seeds:
        for t in templates:
            res = sd_pipe([t.format(c=c) for c in COLORS], num_inference_steps=steps, guidance_scale=guidance, eta=eta,
                          generator=[torch.Generator().manual_seed(s) for _ in COLORS], output_type="pt")
            cells.append(res.images.float().cpu().mean(dim=(2, 3)))  # (4 colours, RGB)
    sd_pipe.unet.train(was_training)
    rgb = torch.stack(cells)  # (cells, 4, 3)
    total = ((rgb - rgb.mean(dim=(0, 1))) ** 2).sum(-1).mean()
    across = ((rgb - rgb.mean(1, keepdim=True)) ** 2).sum(-1).mean()
    return float(across / total) if total > 0 else 0.0


# -- plots (matplotlib, imported lazily) --------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_grid(path, before: torch.Tensor, after: torch.Tensor, labels: list[str], ncol: int = 16) -> None:
    """Two rows of ``ncol`` images before (top) and after (bottom) training, titled by colour."""
    plt = _pyplot()
    n = min(ncol, len(labels), before.shape[0], after.shape[0])
    fig, axes = plt.subplots(2, n, figsize=(n * 0.9, 2.3), squeeze=False)
    for row, (name, ims) in enumerate((("before", before), ("after", after))):
        for i in range(n):
            ax = axes[row, i]
            ax.imshow(ims[i].permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(labels[i], fontsize=6)
        axes[row, 0].set_ylabel(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_curve(path, rewards: list[float], title: str) -> None:
    """Mean judge reward per reward call, with a moving mean."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(range(1, len(rewards) + 1), rewards, lw=0.8, alpha=0.6)
    if len(rewards) >= 5:
        w = max(2, len(rewards) // 10)
        ax.plot(range(w, len(rewards) + 1), np.convolve(rewards, np.ones(w) / w, mode="valid"), lw=2,
                label=f"moving mean ({w})")
        ax.legend()
    ax.set_xlabel("reward call")
    ax.set_ylabel("mean judge reward")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
