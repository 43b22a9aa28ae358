"""Stage-1 training: backbone + linear reward head against human scores (MSE) or preference pairs
(Bradley-Terry), full fine-tune, LoRA or head only, with accelerate (one GPU, DDP, DeepSpeed).

The training forward *is* the scoring forward: ``FeatureEngine.features`` (every sample as one
full sequence: ``EngineConfig(share_images=False, share_prefix=False)``), then the reward head.
A trained model therefore scores at inference exactly what it computed in training.

``train_stage1(config)`` runs these steps:

1. read and validate the data (errors name the row before any model is loaded);
2. build the model: the base LVLM + a fresh head (``model.base_model``) or an existing MULTI-TAP
   checkpoint (``model.checkpoint``); switch on what is trained (full / LoRA / head; optional
   frozen vision tower; gradient checkpointing);
3. AdamW (separate head learning rate), warm-up + cosine/linear/constant schedule, accelerate;
4. resume from the newest ``checkpoint-<step>`` in ``output_dir`` (or a given one);
5. train, logging loss and learning rate, evaluating and saving resumable checkpoints on schedule;
6. evaluate, and save the final model (LoRA merged) in our layout and/or the released layout.

Output directory::

    config.yaml              the resolved recipe
    log.jsonl                one JSON object per log / eval event
    checkpoint-<step>/       resumable state: trainable weights (safetensors), optimizer, scheduler,
                             RNG, trainer_state.json (DeepSpeed: accelerate's save_state)
    model/                   final model, layout "multitap"  (MultiTapModel.from_pretrained)
    model-released/          final model, layout "released" (if asked)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .recipe import config_to_dict, load_recipe, save_recipe

__all__ = [
    "DataArgs",
    "LoraArgs",
    "ModelArgs",
    "RewardLogits",
    "Stage1Config",
    "Stage1Result",
    "TrainArgs",
    "load_stage1_config",
    "train_stage1",
]

logger = logging.getLogger(__name__)

SHAPES_DATASET = "shapes"  # data.dataset value for the built-in offline shapes task


def _f(default=None, help: str = "", factory=None):  # noqa: A002 - dataclass field with help text
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


# -- configuration -------------------------------------------------------------------------------
@dataclass
class ModelArgs:
    base_model: str | None = _f(None, "base LVLM (hub id or directory): its own weights + a fresh reward head")
    checkpoint: str | None = _f(None, "start from this MULTI-TAP checkpoint instead (its head included)")
    rope: Literal["reference", "mrope"] = _f("reference", "position scheme (reference = as the released models)")
    image_size: int | None = _f(560, "images resized to this square before the processor (reference: 560)")
    max_length: int | None = _f(1024, "prompts truncated to this many tokens (reference: 1024)")
    dtype: str = _f("float32", "parameter dtype: float32 | bfloat16 (bf16 suits DeepSpeed on GPUs)")
    head_seed: int = _f(0, "seed of the fresh reward head's initialisation")
    backbone_options: dict = _f(help="backbone adapter options, e.g. {pad_token: '<|eot_id|>'} (Llama-3.2-Vision)",
                                factory=dict)

    def __post_init__(self):
        _check(self.image_size is None or self.image_size >= 28,
               f"model.image_size must be >= 28, got {self.image_size}")
        _check(self.max_length is None or self.max_length > 0, "model.max_length must be positive")


@dataclass
class DataArgs:
    dataset: str = _f("", "hub id, local .json/.jsonl/.csv/.parquet, save_to_disk dir, or 'shapes' (offline task)")
    dataset_config: str | None = _f(None, "dataset configuration name (hub datasets)")
    dataset_kwargs: dict = _f(help="for 'shapes': n_train, n_eval and make_shapes_records arguments", factory=dict)
    train_split: str = _f("train", "split to train on")
    eval_split: str | None = _f(None, "split to evaluate on (none: eval_fraction of the training split)")
    eval_fraction: float = _f(0.0, "hold out this fraction of the training split for evaluation")
    image_column: str = _f("image", "image column (image feature, path, or bytes)")
    text_column: str = _f("text", "text column (caption or response)")
    score_column: str = _f("score", "human score column (MSE loss)")
    question_column: str | None = _f(None, "question column (instruction task); none = caption task")
    chosen_column: str = _f("chosen", "preferred text (or image) column (Bradley-Terry loss)")
    rejected_column: str = _f("rejected", "dispreferred text (or image) column (Bradley-Terry loss)")
    pair_kind: Literal["text", "image"] = _f("text", "pairs differ in their text (one image) or image (one text)")
    score_range: tuple[float, float] = _f((0.0, 1.0), "declared range of the raw scores; mapped to [0, 1]")
    image_root: str | None = _f(None, "directory relative image paths are read from")
    max_train_samples: int | None = _f(None, "use at most this many training rows")
    max_eval_samples: int | None = _f(None, "use at most this many evaluation rows")
    num_workers: int = _f(0, "DataLoader worker processes")

    def __post_init__(self):
        _check(0.0 <= self.eval_fraction < 1.0, f"data.eval_fraction must lie in [0, 1), got {self.eval_fraction}")
        lo, hi = self.score_range
        _check(math.isfinite(lo) and math.isfinite(hi) and lo < hi,
               f"data.score_range must be lo < hi, got {self.score_range}")


@dataclass
class LoraArgs:
    r: int = _f(16, "LoRA rank")
    alpha: float = _f(32.0, "LoRA alpha (scaling = alpha / r)")
    dropout: float = _f(0.05, "LoRA dropout")
    target_modules: list[str] = _f(help="linear layers that get adapters (language model attention by default)",
                                   factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    use_rslora: bool = _f(False, "rank-stabilised scaling alpha / sqrt(r)")

    def __post_init__(self):
        _check(self.r > 0, f"lora.r must be positive, got {self.r}")
        _check(0.0 <= self.dropout < 1.0, f"lora.dropout must lie in [0, 1), got {self.dropout}")
        _check(bool(self.target_modules), "lora.target_modules must not be empty")


@dataclass
class TrainArgs:
    output_dir: str = _f("runs/stage1", "where checkpoints, logs and the final model go")
    finetune: Literal["full", "lora", "head"] = _f("full", "train the whole model, LoRA adapters + head, or the head")
    loss: Literal["mse", "bradley_terry"] = _f("mse", "MSE against scores, or Bradley-Terry on preference pairs")
    freeze_vision: bool = _f(False, "keep the vision tower frozen (full fine-tune)")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward (less memory, ~30% slower)")
    learning_rate: float = _f(2e-6, "peak learning rate of the backbone (or LoRA adapters)")
    head_learning_rate: float | None = _f(None, "peak learning rate of the reward head (default: learning_rate)")
    weight_decay: float = _f(0.0, "AdamW weight decay (matrices only)")
    lr_scheduler: Literal["cosine", "linear", "constant"] = _f("cosine", "decay after warm-up")
    warmup_ratio: float = _f(0.0, "fraction of the steps spent warming up linearly")
    num_epochs: int = _f(1, "passes over the training data (ignored when max_steps is set)")
    max_steps: int | None = _f(None, "stop after this many optimizer steps")
    batch_size: int = _f(1, "samples (or pairs) per device per micro-batch")
    eval_batch_size: int = _f(8, "samples per device per evaluation batch")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    max_grad_norm: float | None = _f(1.0, "clip the gradient norm (none: no clipping)")
    init_bias_from_data: bool = _f(True, "start a fresh head's bias at logit(mean training score) (MSE)")
    log_every: int = _f(10, "log the training loss every this many steps")
    eval_every: int | None = _f(None, "evaluate every this many steps (always at the end)")
    save_every: int | None = _f(None, "write a resumable checkpoint every this many steps")
    save_total_limit: int | None = _f(2, "keep only the newest this many checkpoints")
    save_layouts: list[str] = _f(help="final model layouts: multitap and/or released", factory=lambda: ["multitap"])
    seed: int = _f(42, "seed for data order, LoRA init and dropout")
    resume: str = _f("auto", "'auto' (newest checkpoint in output_dir), 'never', or a checkpoint directory")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = _f("auto", "autocast; auto = accelerate's config")
    report_to: list[str] = _f(help="accelerate trackers (e.g. tensorboard, wandb)", factory=list)
    progress: bool = _f(True, "show a progress bar")
    find_unused_parameters: bool = _f(False, "DDP option, for backbones with parameters a forward skips")

    def __post_init__(self):
        for name in ("learning_rate", "batch_size", "eval_batch_size", "gradient_accumulation_steps", "num_epochs",
                     "log_every"):
            _check(getattr(self, name) > 0, f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every", "save_every", "save_total_limit", "head_learning_rate",
                     "max_grad_norm"):
            v = getattr(self, name)
            _check(v is None or v > 0, f"train.{name} must be positive or null, got {v}")
        _check(0.0 <= self.warmup_ratio < 1.0, f"train.warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")
        bad = [x for x in self.save_layouts if x not in ("multitap", "released")]
        _check(not bad and bool(self.save_layouts),
               f"train.save_layouts: use multitap and/or released, got {self.save_layouts}")


@dataclass
class Stage1Config:
    """A stage-1 recipe: ``model``, ``data``, ``lora``, ``train`` sections (see each field's help)."""

    model: ModelArgs = _f(help="backbone and starting point", factory=ModelArgs)
    data: DataArgs = _f(help="training and evaluation data", factory=DataArgs)
    lora: LoraArgs = _f(help="LoRA settings (train.finetune = lora)", factory=LoraArgs)
    train: TrainArgs = _f(help="optimisation, logging, saving", factory=TrainArgs)

    def __post_init__(self):
        _check(bool(self.model.base_model or self.model.checkpoint),
               "model: set model.base_model (base LVLM + fresh head) or model.checkpoint (continue a MULTI-TAP model)")


def load_stage1_config(source=None, overrides: list[str] | tuple[str, ...] = ()) -> Stage1Config:
    """A :class:`Stage1Config` from a YAML recipe (or dict) plus ``section.key=value`` overrides."""
    return load_recipe(Stage1Config, source, overrides)


@dataclass
class Stage1Result:
    """What a run produced. ``metrics``: the final evaluation (``mse``, ``baseline_mse``,
    ``mse_ratio``, ``pearson`` or ``pair_accuracy``, ``bt_loss``; empty without eval data);
    ``model``: the trained model in memory (eval mode; LoRA unmerged)."""

    output_dir: Path
    model_dirs: dict[str, Path]
    global_step: int
    resumed_from: int | None
    metrics: dict[str, float]
    history: list[dict]
    model: Any = None


# -- the training forward ------------------------------------------------------------------------
class RewardLogits(nn.Module):
    """The training forward of a ``MultiTapModel``: the scoring path (``engine.features``, then the
    reward head) returning the pre-sigmoid logits (N,) float32; ``sigmoid`` of them is the
    model's ``overall`` score. Wrapping keeps the whole forward inside one module call (DDP,
    DeepSpeed)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, texts, questions=None) -> torch.Tensor:
        h = self.model.engine.features(images, texts, questions)
        return self.model.reward_head(h.to(self.model.device, torch.float32)).squeeze(-1)


class _EpochSampler(torch.utils.data.Sampler):
    """A permutation of range(n) fixed by (seed, epoch): resumed runs see the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def _lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return f


# -- data ----------------------------------------------------------------------------------------
def _shapes_tables(cfg: Stage1Config):
    from .._shapes_task import make_shapes_pairs, make_shapes_records

    kw = dict(cfg.data.dataset_kwargs)
    n_train = int(kw.pop("n_train", 512))
    n_eval = int(kw.pop("n_eval", 128))
    seed = int(kw.pop("seed", 0))
    kw.setdefault("image_size", cfg.model.image_size or 112)
    if cfg.train.loss == "bradley_terry":
        for k in ("scoring", "p_correct", "question"):
            kw.pop(k, None)
        make = make_shapes_pairs
    else:
        make = make_shapes_records
    return make(n_train, seed=seed, **kw), (make(n_eval, seed=seed + 10_007, **kw) if n_eval else None)


def _subset(data, n: int | None):
    if n is None or n >= len(data):
        return data
    return data.select(range(n)) if hasattr(data, "select") else list(data)[:n]


def _split(data, fraction: float, seed: int):
    if hasattr(data, "train_test_split"):
        parts = data.train_test_split(test_size=fraction, seed=seed)
        return parts["train"], parts["test"]
    rows = list(data)
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = max(1, int(round(len(rows) * fraction)))
    return [rows[i] for i in perm[n_eval:]], [rows[i] for i in perm[:n_eval]]


def build_datasets(cfg: Stage1Config, train_data=None, eval_data=None):
    """(train, eval or None) example sets, validated. ``train_data``/``eval_data`` (a
    ``datasets.Dataset`` or a list of dicts) override ``cfg.data.dataset``."""
    from .data import PreferencePairs, ScoredExamples, load_table

    d = cfg.data
    root = Path(d.image_root).expanduser() if d.image_root else None
    # 1. Raw tables.
    if train_data is None:
        if not d.dataset:
            raise ValueError("data.dataset is not set (and no train_data was passed)")
        if d.dataset == SHAPES_DATASET:
            train_data, shapes_eval = _shapes_tables(cfg)
            eval_data = eval_data if eval_data is not None else shapes_eval
        else:
            train_data, file_root = load_table(d.dataset, split=d.train_split, config_name=d.dataset_config)
            root = root or file_root
            if eval_data is None and d.eval_split:
                eval_data, _ = load_table(d.dataset, split=d.eval_split, config_name=d.dataset_config)
    if eval_data is None and d.eval_fraction > 0:
        if len(train_data) < 2:
            raise ValueError(f"train data has {len(train_data)} row(s): too few to hold out eval_fraction")
        train_data, eval_data = _split(train_data, d.eval_fraction, cfg.train.seed)
    train_data = _subset(train_data, d.max_train_samples)
    eval_data = _subset(eval_data, d.max_eval_samples) if eval_data is not None else None

    # 2. Validated example sets.
    def make(data, name):
        if cfg.train.loss == "bradley_terry":
            return PreferencePairs(data, name=name, pair_kind=d.pair_kind, image_column=d.image_column,
                                   text_column=d.text_column, chosen_column=d.chosen_column,
                                   rejected_column=d.rejected_column, question_column=d.question_column,
                                   image_root=root)
        return ScoredExamples(data, name=name, image_column=d.image_column, text_column=d.text_column,
                              score_column=d.score_column, question_column=d.question_column,
                              score_range=d.score_range, image_root=root)

    return make(train_data, "train"), (make(eval_data, "eval") if eval_data is not None else None)


# -- model ---------------------------------------------------------------------------------------
def _vision_tower(backbone) -> nn.Module:
    for name in ("visual", "vision_model", "vision_tower"):
        sub = getattr(backbone.model, name, None)
        if isinstance(sub, nn.Module):
            return sub
    raise ValueError(f"freeze_vision: backbone {type(backbone).__name__} has no known vision tower")


@contextlib.contextmanager
def _no_zero3_init():
    """Build modules whole even when accelerate has announced ZeRO-3 to transformers (which would
    otherwise construct them as empty ``zero.Init`` partitions)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref  # no public getter; restored below
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def build_model(cfg: Stage1Config, device):
    """The model to train, with exactly the parameters the recipe trains requiring grad."""
    from ..model import MultiTapModel
    from ..scoring import EngineConfig, FeatureEngine
    from .lora import apply_lora

    m, t = cfg.model, cfg.train
    common = dict(device=device, dtype=m.dtype, image_size=m.image_size, max_length=m.max_length,
                  backbone_options=m.backbone_options or None)
    if m.checkpoint:
        model = MultiTapModel.from_pretrained(m.checkpoint, base_model=m.base_model, rope=m.rope, **common)
    else:
        model = MultiTapModel.from_base_model(m.base_model, rope=m.rope, seed=m.head_seed, **common)
    # Training runs every sample as one full sequence (the sharing path is for inference).
    model.engine = FeatureEngine(model.backbone, EngineConfig(share_images=False, share_prefix=False))
    module = model.backbone.model
    if t.finetune == "full":
        module.requires_grad_(True)
        if t.freeze_vision:
            _vision_tower(model.backbone).requires_grad_(False)
    elif t.finetune == "lora":
        lo = cfg.lora
        n = apply_lora(module, r=lo.r, alpha=lo.alpha, dropout=lo.dropout, target_modules=lo.target_modules,
                       use_rslora=lo.use_rslora)
        logger.info("LoRA: %d adapter parameters", n)
    else:
        module.requires_grad_(False)
    model.reward_head.requires_grad_(True)
    if t.gradient_checkpointing:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _param_groups(model, t: TrainArgs) -> list[dict]:
    head = [p for p in model.reward_head.parameters() if p.requires_grad]
    decay, no_decay = [], []
    for p in model.backbone.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": head, "lr": t.head_learning_rate or t.learning_rate, "weight_decay": 0.0}]
    if decay:
        groups.append({"params": decay, "lr": t.learning_rate, "weight_decay": t.weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "lr": t.learning_rate, "weight_decay": 0.0})
    return groups


# -- metrics -------------------------------------------------------------------------------------
def regression_metrics(pred: torch.Tensor, target: torch.Tensor, train_mean: float) -> dict[str, float]:
    """MSE of ``pred`` (N,) against ``target`` (N,), the constant predictor's MSE (``train_mean``),
    their ratio, and Pearson's r (0 when either side is constant)."""
    pred, target = pred.double(), target.double()
    mse = float(((pred - target) ** 2).mean())
    baseline = float(((target - train_mean) ** 2).mean())
    pc, tc = pred - pred.mean(), target - target.mean()
    denom = float(pc.norm() * tc.norm())
    return {"mse": mse, "baseline_mse": baseline, "mse_ratio": mse / baseline if baseline > 0 else float("nan"),
            "pearson": float((pc * tc).sum()) / denom if denom > 0 else 0.0, "n": int(pred.numel())}


def pair_metrics(margin: torch.Tensor) -> dict[str, float]:
    """``margin`` (N,) = logit(chosen) - logit(rejected): accuracy (ties count half) and BT loss."""
    margin = margin.double()
    acc = float(((margin > 0).double() + 0.5 * (margin == 0).double()).mean())
    return {"pair_accuracy": acc, "bt_loss": float(nn.functional.softplus(-margin).mean()), "n": int(margin.numel())}


# -- the run -------------------------------------------------------------------------------------
def _require_accelerate():
    try:
        import accelerate  # noqa: F401
    except ImportError as exc:
        raise ImportError("stage-1 training needs accelerate: pip install multitap-rl[train]") from exc


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    found = []
    for p in out.glob("checkpoint-*"):
        tail = p.name[len("checkpoint-") :]
        if p.is_dir() and tail.isdigit() and (p / "trainer_state.json").is_file():
            found.append((int(tail), p))
    return sorted(found)


_RESUME_KEYS = ("model", "data", "lora")
_RESUME_TRAIN_KEYS = ("finetune", "loss", "freeze_vision", "batch_size", "gradient_accumulation_steps", "seed")


class _Run:
    def __init__(self, cfg: Stage1Config, train_data, eval_data):
        _require_accelerate()
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        self.cfg, t = cfg, cfg.train
        kwargs = {}
        if t.find_unused_parameters:
            kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=True)]
        deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")
        if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not deepspeed:
            kwargs["cpu"] = True  # torchrun / accelerate launch without GPUs: CPU processes over gloo
        self.acc = Accelerator(
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            mixed_precision=None if t.mixed_precision == "auto" else t.mixed_precision,
            log_with=list(t.report_to) or None,
            project_dir=t.output_dir,
            **kwargs,
        )
        set_seed(t.seed)
        self.out = Path(t.output_dir)
        self.main = self.acc.is_main_process
        self.is_deepspeed = self.acc.distributed_type.name == "DEEPSPEED"
        self.history: list[dict] = []
        # 1. Data, validated before the model loads.
        self.train_set, self.eval_set = build_datasets(cfg, train_data, eval_data)
        self.mse = t.loss == "mse"
        self.train_mean = float(self.train_set.scores.mean()) if self.mse else 0.5
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            logger.info("train: %d %s; eval: %s", len(self.train_set), "samples" if self.mse else "pairs",
                        len(self.eval_set) if self.eval_set is not None else "none")

    # -- setup --------------------------------------------------------------------------------
    def setup(self) -> None:
        from .data import collate_examples, collate_pairs

        cfg, t, acc = self.cfg, self.cfg.train, self.acc
        # 2. Model and what it trains. Built whole by the strict loader (never under ZeRO-3's
        #    zero.Init, which would hand it empty partitions); DeepSpeed partitions it in prepare().
        with _no_zero3_init() if self.is_deepspeed else contextlib.nullcontext():
            self.model = build_model(cfg, acc.device)
        fresh_head = not cfg.model.checkpoint
        if fresh_head and self.mse and t.init_bias_from_data:
            p = min(max(self.train_mean, 0.01), 0.99)
            with torch.no_grad():
                self.model.reward_head.bias.fill_(math.log(p / (1 - p)))
        self.model.train()
        self.net = RewardLogits(self.model)
        n_train = sum(p.numel() for p in self.net.parameters() if p.requires_grad)
        logger.info("training %s: %d trainable parameters", t.finetune, n_train)
        # 3. Optimizer, data loaders, schedule.
        optimizer = torch.optim.AdamW(_param_groups(self.model, t), lr=t.learning_rate)
        collate = collate_examples if self.mse else collate_pairs
        self.sampler = _EpochSampler(len(self.train_set), t.seed)
        train_dl = torch.utils.data.DataLoader(self.train_set, batch_size=t.batch_size, sampler=self.sampler,
                                               collate_fn=collate, num_workers=cfg.data.num_workers)
        eval_dl = None
        if self.eval_set is not None:
            eval_dl = torch.utils.data.DataLoader(self.eval_set, batch_size=t.eval_batch_size, shuffle=False,
                                                  collate_fn=collate, num_workers=cfg.data.num_workers)
        self.net, self.optimizer, self.train_dl = acc.prepare(self.net, optimizer, train_dl)
        self.eval_dl = acc.prepare(eval_dl) if eval_dl is not None else None
        self.steps_per_epoch = max(1, math.ceil(len(self.train_dl) / t.gradient_accumulation_steps))
        self.total_steps = t.max_steps or self.steps_per_epoch * t.num_epochs
        warmup = int(t.warmup_ratio * self.total_steps)
        lambdas = [_lr_lambda(t.lr_scheduler, warmup, self.total_steps)] * len(optimizer.param_groups)
        # on the torch optimizer itself (DeepSpeed's wrapper reads its param groups)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        if t.report_to:
            acc.init_trackers("multitap-stage1", config=config_to_dict(cfg))

    # -- checkpoints -----------------------------------------------------------------------------
    def _trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def save_checkpoint(self, step: int, epoch: int, batches: int) -> Path:
        from safetensors.torch import save_file

        final = self.out / f"checkpoint-{step}"
        tmp = self.out / f".tmp-checkpoint-{step}"
        state = {"global_step": step, "epoch": epoch, "batches_in_epoch": batches, "history": self.history,
                 "config": config_to_dict(self.cfg), "world_size": self.acc.num_processes}
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        if self.is_deepspeed:
            self.acc.save_state(str(tmp))
        else:
            rng = {"cpu": torch.get_rng_state()}  # every process its own (dropout differs per process)
            if torch.cuda.is_available():
                rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
            save_file(rng, str(tmp / f"rng-{self.acc.process_index}.safetensors"))
            if self.main:
                save_file({n: p.detach().cpu().contiguous() for n, p in self._trainable().items()},
                          str(tmp / "trainable.safetensors"), metadata={"format": "pt"})
                torch.save(self.optimizer.optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        self.acc.wait_for_everyone()
        if self.main:
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            limit = self.cfg.train.save_total_limit
            if limit:
                for _, old in _checkpoints(self.out)[:-limit]:
                    shutil.rmtree(old, ignore_errors=True)
            logger.info("saved checkpoint %s", final)
        self.acc.wait_for_everyone()
        return final

    def find_resume(self) -> Path | None:
        r = self.cfg.train.resume
        if r == "never":
            return None
        if r == "auto":
            found = _checkpoints(self.out)
            return found[-1][1] if found else None
        path = Path(r).expanduser()
        if not (path / "trainer_state.json").is_file():
            raise ValueError(f"train.resume: {path} is not a checkpoint directory (no trainer_state.json)")
        return path

    def load_checkpoint(self, path: Path) -> dict:
        from safetensors.torch import load_file

        state = json.loads((path / "trainer_state.json").read_text())
        # The run must be the same run: same model, data, adapters, loss, batch layout.
        old, new = state.get("config", {}), config_to_dict(self.cfg)
        diff = [k for k in _RESUME_KEYS if old.get(k) != new[k]]
        diff += [f"train.{k}" for k in _RESUME_TRAIN_KEYS if old.get("train", {}).get(k) != new["train"][k]]
        if state.get("world_size", self.acc.num_processes) != self.acc.num_processes:
            diff.append(f"number of processes ({state['world_size']} -> {self.acc.num_processes})")
        if diff:
            raise ValueError(f"cannot resume from {path}: the recipe changed in {diff}; use a new "
                             "train.output_dir or train.resume=never")
        if self.is_deepspeed:
            self.acc.load_state(str(path))
        else:
            weights = load_file(str(path / "trainable.safetensors"))
            params = self._trainable()
            if set(weights) != set(params):
                extra, missing = sorted(set(weights) - set(params)), sorted(set(params) - set(weights))
                raise ValueError(f"checkpoint {path} does not fit the model: missing {missing[:5]}, "
                                 f"unexpected {extra[:5]}")
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(weights[name].to(p.device, p.dtype))
            self.optimizer.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
            self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
            rng = load_file(str(path / f"rng-{self.acc.process_index}.safetensors"))
            torch.set_rng_state(rng["cpu"])
            if torch.cuda.is_available():
                cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
                if len(cuda) == torch.cuda.device_count():
                    torch.cuda.set_rng_state_all(cuda)
        self.history = list(state.get("history", []))
        logger.info("resumed from %s (step %d)", path, state["global_step"])
        return state

    # -- evaluation and logging --------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        if self.eval_dl is None:
            return {}
        self.net.eval()
        preds, targets = [], []
        with torch.no_grad():
            for batch in self.eval_dl:
                logits = self.net(batch["images"], batch["texts"], batch["questions"])
                if self.mse:
                    p, y = self.acc.gather_for_metrics((torch.sigmoid(logits), batch["scores"].to(logits.device)))
                    preds.append(p.float().cpu())
                    targets.append(y.float().cpu())
                else:
                    n = len(batch["rows"])
                    preds.append(self.acc.gather_for_metrics(logits[:n] - logits[n:]).float().cpu())
        self.net.train()
        if self.mse:
            return regression_metrics(torch.cat(preds), torch.cat(targets), self.train_mean)
        return pair_metrics(torch.cat(preds))

    def log(self, record: dict) -> None:
        self.history.append(record)
        if self.main:
            with open(self.out / "log.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
            logger.info(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if self.cfg.train.report_to:
            self.acc.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    # -- the loop ----------------------------------------------------------------------------------
    def loss(self, batch) -> torch.Tensor:
        logits = self.net(batch["images"], batch["texts"], batch["questions"])
        if self.mse:
            return nn.functional.mse_loss(torch.sigmoid(logits), batch["scores"].to(logits.device))
        n = len(batch["rows"])
        return nn.functional.softplus(-(logits[:n] - logits[n:])).mean()

    def train(self) -> tuple[int, int | None]:
        from tqdm.auto import tqdm

        t, acc = self.cfg.train, self.acc
        step, epoch, skip, resumed = 0, 0, 0, None
        path = self.find_resume()
        if path is not None:
            state = self.load_checkpoint(path)
            step, epoch, skip = state["global_step"], state["epoch"], state["batches_in_epoch"]
            resumed = step
            if skip >= len(self.train_dl):
                epoch, skip = epoch + 1, 0
        if self.main:
            if resumed is None:  # a fresh run starts a fresh log
                (self.out / "log.jsonl").unlink(missing_ok=True)
            save_recipe(self.cfg, self.out / "config.yaml", header="resolved stage-1 recipe of this run")
        bar = tqdm(total=self.total_steps, initial=step, desc="stage 1",
                   disable=not (t.progress and acc.is_local_main_process))
        running, count, started = 0.0, 0, time.time()
        while step < self.total_steps:
            self.sampler.set_epoch(epoch)
            loader = acc.skip_first_batches(self.train_dl, skip) if skip else self.train_dl
            batches = skip
            for batch in loader:
                with acc.accumulate(self.net):
                    loss = self.loss(batch)
                    acc.backward(loss)
                    if acc.sync_gradients and t.max_grad_norm:
                        acc.clip_grad_norm_(self.net.parameters(), t.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                batches += 1
                running += float(loss.detach())
                count += 1
                if not acc.sync_gradients:
                    continue
                self.scheduler.step()
                step += 1
                bar.update(1)
                if step % t.log_every == 0 or step == self.total_steps:
                    mean = acc.reduce(torch.tensor(running / max(count, 1), device=acc.device), "mean")
                    self.log({"step": step, "epoch": epoch, "loss": float(mean),
                              "lr": self.scheduler.get_last_lr()[-1], "seconds": round(time.time() - started, 2)})
                    bar.set_postfix(loss=f"{float(mean):.4f}")
                    running, count = 0.0, 0
                if t.eval_every and step % t.eval_every == 0 and step < self.total_steps:
                    self.log({"step": step, "eval": True, **self.evaluate()})
                if t.save_every and step % t.save_every == 0:
                    self.save_checkpoint(step, epoch, batches)
                if step >= self.total_steps:
                    break
            epoch, skip = epoch + 1, 0
        bar.close()
        return step, resumed

    def save_final(self, step: int, metrics: dict) -> dict[str, Path]:
        from .lora import lora_scalings, merge_lora_state_dict

        state = self.acc.get_state_dict(self.net)  # gathers ZeRO-3 shards; keys "model.<MultiTapModel key>"
        state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        if self.cfg.train.finetune == "lora":
            state = merge_lora_state_dict(state, lora_scalings(self.model))
        dirs = {}
        meta = {"training": {"stage": 1, "global_step": step, "finetune": self.cfg.train.finetune,
                             "loss": self.cfg.train.loss, "eval": metrics}}
        for layout in self.cfg.train.save_layouts:
            path = self.out / ("model" if layout == "multitap" else f"model-{layout}")
            if self.main:
                self.model.save_pretrained(path, layout, state_dict=state, extra_metadata=meta)
                logger.info("saved %s model to %s", layout, path)
            dirs[layout] = path
        self.acc.wait_for_everyone()
        return dirs


def train_stage1(config: Stage1Config | dict | str | os.PathLike, *, train_data=None, eval_data=None,
                 overrides: list[str] | tuple[str, ...] = ()) -> Stage1Result:
    """Run stage-1 training; see the module docstring for the steps and the output directory.

    Args:
        config: a :class:`Stage1Config`, a recipe dict, or a YAML recipe path.
        train_data, eval_data: a ``datasets.Dataset`` or a list of dicts overriding
            ``config.data.dataset`` (columns as named in ``config.data``).
        overrides: ``section.key=value`` strings applied to a dict/path config.

    Returns a :class:`Stage1Result`. Bad data (empty set, missing column/image, score outside
    ``data.score_range``) raises ``ValueError`` naming the row before the model is loaded.
    """
    cfg = config if isinstance(config, Stage1Config) else load_stage1_config(config, overrides)
    run = _Run(cfg, train_data, eval_data)
    run.setup()
    step, resumed = run.train()
    metrics = run.evaluate()
    if metrics:
        run.log({"step": step, "eval": True, "final": True, **metrics})
    dirs = run.save_final(step, metrics)
    if cfg.train.report_to:
        run.acc.end_training()
    run.model.eval()
    return Stage1Result(output_dir=run.out, model_dirs=dirs, global_step=step, resumed_from=resumed,
                        metrics=metrics, history=run.history, model=run.model)
