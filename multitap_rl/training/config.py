"""Stage-1 recipes: the ``model``, ``data``, ``lora`` and ``train`` sections as dataclasses (each
field carries its help text). A YAML recipe is an instance of :class:`Stage1Config`
(:func:`load_stage1_config`; ``section.key=value`` overrides)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ..errors import ConfigError
from .recipe import load_recipe

__all__ = [
    "SHAPES_DATASET",
    "DataArgs",
    "LoraArgs",
    "ModelArgs",
    "Stage1Config",
    "TrainArgs",
    "load_stage1_config",
]

SHAPES_DATASET = "shapes"  # data.dataset value for the built-in offline shapes task


def _f(default=None, help: str = "", factory=None):  # noqa: A002 - dataclass field with help text
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class ModelArgs:
    base_model: str | None = _f(None, "base LVLM (hub id or directory): its own weights + a fresh reward head")
    checkpoint: str | None = _f(None, "start from this MULTI-TAP checkpoint instead (its head included)")
    rope: Literal["reference", "mrope"] = _f("reference", "position scheme (reference = as the released models)")
    image_size: int | None = _f(560, "images resized to this square before the processor (reference: 560)")
    max_length: int | None = _f(1024, "prompts truncated to this many tokens (reference: 1024)")
    dtype: str = _f("float32", "parameter dtype: float32 | bfloat16 (bf16 suits DeepSpeed on GPUs) | tf32 (float32 "
                                "weights, TF32 matmuls on CUDA: trained and scored in that context)")
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
