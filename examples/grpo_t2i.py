"""Text-to-image GRPO (the score-function path of flow_grpo / verl-omni) against MULTI-TAP, in one file.

Each epoch draws ``--prompts-per-epoch`` prompts and samples a **group** of ``--group-size``
images per prompt with DDIM at ``eta`` > 0 (a stochastic sampler: every denoising step is a
Gaussian action whose log-probability is recorded). The reward is
``reward_fns.flow_grpo.multitap_score`` -- the flow_grpo scorer contract, called exactly as
flow_grpo calls its scorers: ``fn(images NCHW float in [0, 1], prompts, metadata) -> (scores, meta)``.
Advantages are per group, ``(r - mean_group) / (std_group + eps)``: the prompt's own baseline.
The UNet (LoRA, or the whole UNet with ``--full-unet``, the ``--tiny`` default) is then trained
with the PPO-clipped policy-gradient loss over every denoising step of every sample, plus an
optional KL penalty to the initial policy (``--kl-beta``).

Needs only the ``diffusers`` extra (no TRL trainer). Real models (hub + GPU)::

    python examples/grpo_t2i.py --pretrained-model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --checkpoint brl-xfact/Multi-TAP-Qwen2-VL-2B --weights "overall=1" --prompts prompts.txt

Offline, on CPU (``--tiny``): the colour world of ``multitap_rl.world.t2i`` (a tiny seeded SD
pipeline pretrained on captioned colour scenes, ``--policy pretrained``; a tiny MULTI-TAP judge
trained here; a pixel oracle on held-out prompt templates and fixed seeds). ``--output-dir D``
gets ``D/report.json`` (oracle before/after, reward first/last, the diagnostics below),
``D/grid.png`` and ``D/reward_curve.png``. What it learns there, and what it does not, is
measured in docs/rl.md ("Score-function RL")::

    OMP_NUM_THREADS=1 python examples/grpo_t2i.py --tiny --output-dir runs/grpo-tiny
    OMP_NUM_THREADS=1 python examples/grpo_t2i.py --tiny --epochs 2       # smoke run

Diagnostics (``report["diagnostics"]``, logged every epoch): how much of the samples' mean-colour
variance the prompt explains (``prompt_r2``; the policy must make colour depend on the prompt),
the within-group reward spread the advantages see (``group_reward_std``) against the spread
between prompts (``prompt_reward_std``), and how far the policy moved in each update
(``ratio_dev``: mean |ratio - 1| over the last minibatch pass; ``clip_frac``; ``approx_kl``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddpo_t2i import add_model_arguments, read_prompts, tiny_world, windowed, write_report  # noqa: E402

logger = logging.getLogger("grpo_t2i")

DEFAULTS = {"epochs": 100, "prompts_per_epoch": 8, "group_size": 8, "sample_steps": 10, "learning_rate": 1e-4,
            "train_batch_size": 16, "kl_beta": 0.0, "full_unet": False}
# --tiny: the settings measured in the colour world (docs/rl.md): 1024 samples per update; at 128 the
# gradient estimate is noise there.
TINY_DEFAULTS = {"epochs": 20, "prompts_per_epoch": 32, "group_size": 32, "sample_steps": 4, "learning_rate": 3e-4,
                 "train_batch_size": 1024, "kl_beta": 0.0, "full_unet": True}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def dflt(key):
        return f"default {DEFAULTS[key]}; --tiny {TINY_DEFAULTS[key]}"

    add_model_arguments(p, policy="pretrained")
    p.add_argument("--prompts", default=None, help="a text file, one prompt per line (default: --tiny's templates)")
    p.add_argument("--epochs", type=int, default=None, help=dflt("epochs"))
    p.add_argument("--prompts-per-epoch", type=int, default=None, help=dflt("prompts_per_epoch"))
    p.add_argument("--group-size", type=int, default=None, help=f"images per prompt ({dflt('group_size')})")
    p.add_argument("--sample-steps", type=int, default=None, help=f"DDIM steps ({dflt('sample_steps')})")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta: the policy's noise (> 0)")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--same-initial-noise", action=argparse.BooleanOptionalAction, default=True,
                   help="a prompt's group starts from one x_T (default; --no-same-initial-noise: one each)")
    p.add_argument("--learning-rate", type=float, default=None, help=dflt("learning_rate"))
    p.add_argument("--train-batch-size", type=int, default=None, help=dflt("train_batch_size"))
    p.add_argument("--inner-epochs", type=int, default=1, help="passes over each epoch's samples")
    p.add_argument("--clip-range", type=float, default=0.2, help="PPO clip range of the probability ratio")
    p.add_argument("--adv-clip", type=float, default=5.0, help="advantages are clipped to [-c, c]")
    p.add_argument("--adv-scale", default="group", choices=["group", "batch"],
                   help="divide the group-centred rewards by each group's std (GRPO) or the batch's")
    p.add_argument("--kl-beta", type=float, default=None,
                   help=f"weight of the KL divergence to the initial policy ({dflt('kl_beta')})")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--full-unet", action=argparse.BooleanOptionalAction, default=None,
                   help=f"train the whole UNet instead of LoRA ({dflt('full_unet')})")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=None,
                   help="save the trained UNet here; --tiny: also report.json and the plots")
    args = p.parse_args(argv)
    for key, value in (TINY_DEFAULTS if args.tiny else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.eta <= 0:
        p.error("--eta must be > 0: at eta 0 DDIM is deterministic and has no log-probability")
    if args.group_size < 2:
        p.error("--group-size must be >= 2: the advantage is relative to the prompt's group")
    return args


# -- the policy: DDIM with eta > 0 as a chain of Gaussian actions -------------------------------------
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """(2 N, L, D) text embeddings, unconditional half first (classifier-free guidance)."""
    cond, uncond = pipe.encode_prompt(prompts, pipe.unet.device, 1, True)
    return torch.cat([uncond, cond])


def predict_noise(unet, latents, t, embeddings, guidance: float) -> torch.Tensor:
    out = unet(torch.cat([latents, latents]), t, encoder_hidden_states=embeddings).sample
    uncond, cond = out.chunk(2)
    return uncond + guidance * (cond - uncond)


def ddim_step(scheduler, noise_pred, t, latents, eta: float):
    """(mean, std) of DDIM's next latent: diffusers' own step with the noise set to zero gives the
    mean; the standard deviation is eta * sqrt(variance), DDIM's posterior variance."""
    mean = scheduler.step(noise_pred, t, latents, eta=eta, variance_noise=torch.zeros_like(latents)).prev_sample
    prev_t = int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_t = scheduler.alphas_cumprod[int(t)]
    a_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    return mean, std.to(mean.dtype)


def log_prob(sample, mean, std) -> torch.Tensor:
    """Per-sample Gaussian log-density, averaged over the latent's elements (as DDPO and flow_grpo do)."""
    return (-((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)).mean(
        dim=tuple(range(1, sample.ndim)))


@torch.no_grad()
def sample(pipe, prompts: list[str], generators, *, steps: int, guidance: float, eta: float,
           latents: torch.Tensor | None = None) -> dict:
    """Sample as ``pipe(prompts, eta=eta, generator=generators, latents=latents, output_type="pt")``
    does (the same random draws, so the same images) and keep the trajectory: ``latents`` (T+1, N, ...),
    ``log_probs`` (T, N), ``timesteps`` (T,), ``images`` (N, 3, H, W) in [0, 1]."""
    from diffusers.utils.torch_utils import randn_tensor

    unet, scheduler = pipe.unet, pipe.scheduler
    scheduler.set_timesteps(steps, device=unet.device)
    emb = encode_prompts(pipe, prompts)
    shape = (len(prompts), unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    if latents is None:
        latents = randn_tensor(shape, generator=generators, device=unet.device, dtype=emb.dtype)
    x = latents.to(device=unet.device, dtype=emb.dtype) * scheduler.init_noise_sigma
    path, logps = [x], []
    for t in scheduler.timesteps:
        mean, std = ddim_step(scheduler, predict_noise(unet, x, t, emb, guidance), t, x, eta)
        x = mean + std * randn_tensor(shape, generator=generators, device=unet.device, dtype=emb.dtype)
        path.append(x)
        logps.append(log_prob(x, mean, std))
    images = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    return {"latents": torch.stack(path), "log_probs": torch.stack(logps), "timesteps": scheduler.timesteps.clone(),
            "embeddings": emb, "images": (images / 2 + 0.5).clamp(0, 1).float()}


def initial_noise(pipe, generators, share: int) -> torch.Tensor:
    """x_T for each sample, drawn from its own generator; with ``share`` > 1 each consecutive block of
    ``share`` samples (a prompt's group) starts from its first member's x_T, so the group's rewards
    differ only through the policy's own denoising actions (common random numbers)."""
    from diffusers.utils.torch_utils import randn_tensor

    unet = pipe.unet
    shape = (len(generators), unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x = randn_tensor(shape, generator=generators, device=unet.device, dtype=unet.dtype)
    return x[::share].repeat_interleave(share, dim=0)


def group_advantages(rewards: np.ndarray, group_size: int, clip: float, scale: str = "group") -> np.ndarray:
    """``r - mean`` within each consecutive group of ``group_size``, divided by the group's std
    (``scale="group"``, GRPO's) or by the std of the whole batch (``"batch"``: a group whose rewards
    barely differ then carries little weight instead of unit-size noise), clipped to +-clip."""
    r = rewards.reshape(-1, group_size)
    centred = r - r.mean(1, keepdims=True)
    std = r.std(1, keepdims=True) if scale == "group" else r.std()
    return np.clip(centred / (std + 1e-4), -clip, clip).reshape(-1)


def reference_mean(pipe, reference, x, t, emb, args):
    """The reference policy's DDIM mean: ``reference`` is a frozen UNet, or None for LoRA, whose
    reference is the UNet with its adapters disabled."""
    with torch.no_grad():
        if reference is None:
            pipe.unet.disable_adapters()
            try:
                noise = predict_noise(pipe.unet, x, t, emb, args.guidance_scale)
            finally:
                pipe.unet.enable_adapters()
        else:
            noise = predict_noise(reference, x, t, emb, args.guidance_scale)
        return ddim_step(pipe.scheduler, noise, t, x, args.eta)[0]


def train_step(pipe, optimizer, params, batch: dict, idx: torch.Tensor, advantages: torch.Tensor, args,
               reference=None) -> dict:
    """One PPO-clipped policy-gradient update on samples ``idx`` over every denoising step
    (gradients accumulated over the steps, one optimiser step), plus ``args.kl_beta`` times the KL
    divergence to the reference policy (per step, two Gaussians of one std: |mean - mean_ref|^2 /
    (2 std^2), averaged over the latent). Returns ratio and KL statistics."""
    unet, scheduler = pipe.unet, pipe.scheduler
    n = len(batch["images"])
    emb = batch["embeddings"]
    emb_idx = torch.cat([emb[:n][idx], emb[n:][idx]])
    adv = advantages[idx]
    steps = len(batch["timesteps"])
    optimizer.zero_grad()
    dev, clipped, kl, kl_refs = [], [], [], []
    for j, t in enumerate(batch["timesteps"]):
        x, x_next = batch["latents"][j][idx], batch["latents"][j + 1][idx]
        mean, std = ddim_step(scheduler, predict_noise(unet, x, t, emb_idx, args.guidance_scale), t, x, args.eta)
        logp = log_prob(x_next, mean, std)
        old = batch["log_probs"][j][idx]
        ratio = torch.exp(logp - old)
        loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - args.clip_range, 1 + args.clip_range)).mean()
        if args.kl_beta > 0:
            ref = reference_mean(pipe, reference, x, t, emb_idx, args)
            kl_ref = (((mean - ref) ** 2) / (2 * std**2)).mean()
            loss = loss + args.kl_beta * kl_ref
            kl_refs.append(float(kl_ref.detach()))
        (loss / steps).backward()
        with torch.no_grad():
            dev.append(float((ratio - 1).abs().mean()))
            clipped.append(float(((ratio - 1).abs() > args.clip_range).float().mean()))
            kl.append(float(0.5 * ((logp - old) ** 2).mean()))
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    out = {"ratio_dev": float(np.mean(dev)), "clip_frac": float(np.mean(clipped)), "approx_kl": float(np.mean(kl))}
    if kl_refs:
        out["kl_ref"] = float(np.mean(kl_refs))
    return out


# -- diagnostics -----------------------------------------------------------------------------------
def colour_diagnostics(images: torch.Tensor, prompts: list[str], rewards: np.ndarray, group_size: int) -> dict:
    """How the prompt shapes the samples' colour and the reward (see the module docstring)."""
    mean_rgb = images.mean(dim=(2, 3)).numpy()  # (N, 3)
    groups = mean_rgb.reshape(-1, group_size, 3)
    total = float(((mean_rgb - mean_rgb.mean(0)) ** 2).sum(1).mean())
    within = float(((groups - groups.mean(1, keepdims=True)) ** 2).sum(2).mean())
    r = rewards.reshape(-1, group_size)
    out = {"prompt_r2": 1 - within / total if total > 0 else 0.0,
           "colour_std_within_group": math.sqrt(within / 3),
           "group_reward_std": float(r.std(1).mean()),
           "prompt_reward_std": float(r.mean(1).std()),
           "reward_mean": float(rewards.mean())}
    try:
        from multitap_rl.world import t2i

        share = t2i.colour_share(images, [t2i.prompt_color(p) for p in prompts])
        s = share.numpy().reshape(-1, group_size)
        # Does the reward rank a group's samples by how much of the prompt's colour they show?
        rs = [np.corrcoef(a, b)[0, 1] for a, b in zip(r, s) if a.std() > 0 and b.std() > 0]
        out["prompt_colour_share"] = float(share.mean())
        out["reward_share_corr_within_group"] = float(np.mean(rs)) if rs else float("nan")
    except ValueError:  # prompts outside the colour world
        pass
    return out


# -- the loop --------------------------------------------------------------------------------------
def _prompt_list(args) -> list[str]:
    if args.tiny and not args.prompts:
        from multitap_rl.world import t2i

        return [p for p, _ in t2i.prompts(t2i.TRAIN_TEMPLATES)]
    if not args.prompts:
        raise ValueError("give --prompts (a text file, one prompt per line) or --tiny")
    return read_prompts(args)


def load_policy(args, sd_model: str, device: str):
    """The diffusers pipeline (frozen) and the trainable parameters: LoRA on the UNet's attention
    (peft, through diffusers' ``add_adapter``) or the whole UNet."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.requires_grad_(False)
    if args.full_unet:
        pipe.unet.requires_grad_(True)
    else:
        from peft import LoraConfig

        pipe.unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                                         target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    return pipe, params


def run(args, workdir: str | Path | None = None, reward_fn=None) -> dict:
    """Train; return a summary (per-epoch reward means and diagnostics; --tiny: the oracle
    before/after, and with --output-dir the report and plots). ``reward_fn`` (flow_grpo's
    contract) replaces the MULTI-TAP scorer."""
    from reward_fns.flow_grpo import multitap_score

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="grpo_t2i_") as tmp:
        t0 = time.perf_counter()
        if args.tiny:
            args.world = tiny_world(args, Path(workdir or tmp))
            sd_model, checkpoint, base_model = args.world["sd"], args.world["judge"], None
            seconds.update(args.world["seconds"])
        else:
            sd_model, checkpoint, base_model = args.pretrained_model, args.checkpoint, args.base_model
        pipe, params = load_policy(args, sd_model, device)
        if reward_fn is None:
            reward_fn = multitap_score(device, model_or_path=checkpoint, base_model=base_model, heads=args.heads,
                                       weights=args.weights, normalize=args.normalize, gates=args.gate)
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
        reference = None
        if args.kl_beta > 0 and args.full_unet:  # LoRA's reference: the UNet with adapters disabled
            import copy

            reference = copy.deepcopy(pipe.unet).eval().requires_grad_(False)
        prompt_list = _prompt_list(args)
        seconds["build"] = time.perf_counter() - t0

        evals = {}
        if args.tiny:
            t = time.perf_counter()
            evals["before"] = _evaluate(pipe, args)
            seconds["eval_before"] = time.perf_counter() - t
        history, t_train, t_reward = [], time.perf_counter(), 0.0
        for epoch in range(args.epochs):
            # 1. Sample: a group of G images for each of P prompts (each image its own generator).
            chosen = rng.sample(prompt_list, min(args.prompts_per_epoch, len(prompt_list)))
            prompts = [p for p in chosen for _ in range(args.group_size)]
            gens = [torch.Generator().manual_seed(rng.randrange(2**62)) for _ in prompts]
            start = initial_noise(pipe, gens, args.group_size if args.same_initial_noise else 1)
            pipe.unet.eval()
            batch = sample(pipe, prompts, gens, steps=args.sample_steps, guidance=args.guidance_scale, eta=args.eta,
                           latents=start)
            # 2. Reward, through the flow_grpo scorer contract.
            t = time.perf_counter()
            scores, _meta = reward_fn(batch["images"], prompts, [{} for _ in prompts])
            t_reward += time.perf_counter() - t
            rewards = np.asarray(scores, dtype=np.float64)
            if not np.isfinite(rewards).all():
                raise ValueError(f"epoch {epoch}: the reward returned non-finite values: {rewards}")
            # 3. Per-group advantages, then PPO-clipped updates over shuffled minibatches.
            adv = group_advantages(rewards, args.group_size, args.adv_clip, args.adv_scale)
            adv = torch.as_tensor(adv, dtype=torch.float32, device=device)
            pipe.unet.train()
            stats = {}
            for _ in range(args.inner_epochs):
                order = torch.randperm(len(prompts))
                for i in range(0, len(prompts), args.train_batch_size):
                    stats = train_step(pipe, optimizer, params, batch, order[i:i + args.train_batch_size], adv, args,
                                       reference)
            record = {"epoch": epoch, **colour_diagnostics(batch["images"].cpu(), prompts, rewards, args.group_size),
                      **stats}
            history.append(record)
            logger.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
        pipe.unet.eval()
        seconds["train"] = time.perf_counter() - t_train
        seconds["train_reward_calls"] = t_reward
        summary = {"reward_means": [h["reward_mean"] for h in history], "history": history}
        if args.tiny:
            t = time.perf_counter()
            evals["after"] = _evaluate(pipe, args)
            seconds["eval_after"] = time.perf_counter() - t
            summary["oracle"] = {"before": evals["before"]["accuracy"], "after": evals["after"]["accuracy"]}
            summary["oracle_strict"] = {k: evals[k]["strict"] for k in ("before", "after")}
            summary["prompt_dependence"] = {k: evals[k]["prompt_dependence"] for k in ("before", "after")}
        if args.output_dir:
            out = Path(args.output_dir)
            if args.full_unet:
                pipe.unet.save_pretrained(out / "unet")
            else:
                pipe.save_lora_weights(out, unet_lora_layers=_lora_state(pipe.unet))
            if args.tiny:
                report = write_report(args, out, "grpo_t2i", evals["before"], evals["after"],
                                      _Calls(summary["reward_means"]), seconds)
                report["prompt_dependence"] = summary["prompt_dependence"]
                report["diagnostics"] = {"first": history[0], "last": history[-1], "per_epoch": history}
                (out / "report.json").write_text(json.dumps(report, indent=1))
                summary["report"] = str(out / "report.json")
    summary["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    return summary


def _evaluate(pipe, args) -> dict:
    """--tiny: the held-out oracle (``t2i.evaluate``) and ``prompt_dependence``, sampled as in training."""
    from multitap_rl.world import t2i

    res = t2i.evaluate(pipe, steps=args.sample_steps, guidance=args.guidance_scale, eta=args.eta)
    res["prompt_dependence"] = t2i.prompt_dependence(pipe, steps=args.sample_steps, guidance=args.guidance_scale,
                                                     eta=args.eta)
    return res


def _lora_state(unet) -> dict:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


class _Calls:
    """The per-epoch reward means in the shape ``write_report`` reads."""

    def __init__(self, means):
        self.calls = [{"reward_mean": m} for m in means]


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.tiny:
        torch.set_num_threads(1)
    summary = run(args)
    short = {k: v for k, v in summary.items() if k not in ("reward_means", "history")}
    short["reward"] = windowed(summary["reward_means"])
    short["diagnostics"] = {"first": summary["history"][0], "last": summary["history"][-1]}
    print(json.dumps(short))
    return summary


if __name__ == "__main__":
    main()
