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

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DataError, require
from .config import SHAPES_DATASET, Stage1Config, TrainArgs, load_stage1_config
from .recipe import config_to_dict, save_recipe

__all__ = [
    "Stage1Config",
    "Stage1Result",
    "Stage1Trainer",
    "build_datasets",
    "build_model",
    "load_stage1_config",
    "pair_metrics",
    "regression_metrics",
    "train_stage1",
]

logger = logging.getLogger(__name__)


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
    from ..data.shapes import make_shapes_pairs, make_shapes_records

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
    from ..data.rows import load_table
    from .examples import PreferencePairs, ScoredExamples

    d = cfg.data
    root = Path(d.image_root).expanduser() if d.image_root else None
    # 1. Raw tables.
    if train_data is None:
        if not d.dataset:
            raise ConfigError("data.dataset is not set (and no train_data was passed)")
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
            raise DataError(f"train data has {len(train_data)} row(s): too few to hold out eval_fraction")
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
def build_model(cfg: Stage1Config, device):
    """The model to train, with exactly the parameters the recipe trains requiring grad."""
    from ..model import MultiTapModel
    from ..scoring import EngineConfig
    from .lora import apply_lora

    m, t = cfg.model, cfg.train
    # Training runs every sample as one full sequence (the sharing path is for inference).
    common = dict(device=device, dtype=m.dtype, image_size=m.image_size, max_length=m.max_length,
                  backbone_options=m.backbone_options or None,
                  engine=EngineConfig(share_images=False, share_prefix=False))
    if m.checkpoint:
        model = MultiTapModel.from_pretrained(m.checkpoint, base_model=m.base_model, rope=m.rope, **common)
    else:
        model = MultiTapModel.from_base_model(m.base_model, rope=m.rope, seed=m.head_seed, **common)
    module = model.backbone.model
    if t.finetune == "full":
        module.requires_grad_(True)
        if t.freeze_vision:
            model.backbone.vision_module().requires_grad_(False)
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
    require("accelerate", "train", "stage-1 training")


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    found = []
    for p in out.glob("checkpoint-*"):
        tail = p.name[len("checkpoint-") :]
        if p.is_dir() and tail.isdigit() and (p / "trainer_state.json").is_file():
            found.append((int(tail), p))
    return sorted(found)


# Recipe keys that do not change what is trained: where outputs go and how often to log, evaluate and save.
_NOT_TRAINING = {"train.output_dir", "train.resume", "train.progress", "train.log_every", "train.eval_every",
                 "train.save_every", "train.save_total_limit", "train.report_to", "train.save_layouts",
                 "train.eval_batch_size", "data.num_workers"}
_LENGTH = ("train.max_steps", "train.num_epochs")  # change the schedule unless lr is constant without warm-up


def resume_fingerprint(config: dict, data_digest: str | None = None) -> dict:
    """Everything that changes training, flattened to ``{"section.key": value}``: every recipe key
    except :data:`_NOT_TRAINING` (and the run length when the learning rate is constant without
    warm-up, so a finished run can be continued), plus the training data's content digest."""
    flat = {f"{section}.{k}": v for section, values in config.items() if isinstance(values, dict)
            for k, v in values.items()}
    train = config.get("train", {})
    constant = train.get("lr_scheduler") == "constant" and not train.get("warmup_ratio")
    out = {k: v for k, v in flat.items() if k not in _NOT_TRAINING and not (constant and k in _LENGTH)}
    if data_digest is not None:
        out["data.content"] = data_digest
    return out


def _example_digest(examples) -> str:
    """The content digest of an example set's rows (a ``datasets`` fingerprint, or rows by content)."""
    from ..data.rows import digest_rows

    table = examples.table
    if table.hf is not None and getattr(table.hf, "_fingerprint", None):
        return f"datasets:{table.hf._fingerprint}"
    return digest_rows(table.rows)


class Stage1Trainer:
    """One stage-1 run: data, model, optimiser and schedule under accelerate; resumable checkpoints;
    evaluation; the final model. :func:`train_stage1` drives it (``setup``, ``train``, ``evaluate``,
    ``save_final``)."""

    def __init__(self, cfg: Stage1Config, train_data, eval_data, *, overwrite: bool = False):
        _require_accelerate()
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed

        self.cfg, t = cfg, cfg.train
        kwargs, handlers = {}, []
        if t.find_unused_parameters:
            handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
        deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")
        if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            if deepspeed:  # DeepSpeed on CPU processes: accelerate must join them over gloo, or it counts one
                handlers.append(InitProcessGroupKwargs(backend="gloo"))
            else:
                kwargs["cpu"] = True  # torchrun / accelerate launch without GPUs: CPU processes over gloo
        if handlers:
            kwargs["kwargs_handlers"] = handlers
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
        self.fingerprint = resume_fingerprint(config_to_dict(cfg), _example_digest(self.train_set))
        # 2. Start again (overwrite), or check that a checkpoint to resume is of this very run.
        if overwrite and self.main:
            for _, old in _checkpoints(self.out):
                shutil.rmtree(old)
            (self.out / "log.jsonl").unlink(missing_ok=True)
        self.acc.wait_for_everyone()
        self.resume_path = self.find_resume()
        if self.resume_path is not None:
            self.check_resume(self.resume_path)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            logger.info("train: %d %s; eval: %s", len(self.train_set), "samples" if self.mse else "pairs",
                        len(self.eval_set) if self.eval_set is not None else "none")

    # -- setup --------------------------------------------------------------------------------
    def setup(self) -> None:
        from .examples import collate_examples, collate_pairs

        cfg, t, acc = self.cfg, self.cfg.train, self.acc
        # 2. Model and what it trains. Built whole by the strict loader (never under ZeRO-3's
        #    zero.Init, which would hand it empty partitions); DeepSpeed partitions it in prepare().
        self.model = build_model(cfg, acc.device)
        fresh_head = not cfg.model.checkpoint
        if fresh_head and self.mse and t.init_bias_from_data:
            p = min(max(self.train_mean, 0.01), 0.99)
            with torch.no_grad():
                self.model.reward_head.bias.fill_(math.log(p / (1 - p)))
        self.model.train()
        self.net = self.model  # its forward returns the reward logits, under its own matmul precision
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
                 "config": config_to_dict(self.cfg), "fingerprint": self.fingerprint,
                 "world_size": self.acc.num_processes}
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
            raise ConfigError(f"train.resume: {path} is not a checkpoint directory (no trainer_state.json)")
        return path

    def check_resume(self, path: Path) -> None:
        """Refuse to resume ``path`` unless it is a checkpoint of this very run: the same training
        fingerprint (:func:`resume_fingerprint`) and number of processes. The error lists every
        difference."""
        try:
            state = json.loads((path / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot resume from {path}: unreadable trainer_state.json ({exc})") from None
        old = state.get("fingerprint") or resume_fingerprint(state.get("config", {}))
        diff = [f"{k}: {old.get(k)!r} -> {self.fingerprint.get(k)!r}"
                for k in sorted(set(old) | set(self.fingerprint))
                if k in old and old.get(k) != self.fingerprint.get(k)]
        if state.get("world_size", self.acc.num_processes) != self.acc.num_processes:
            diff.append(f"number of processes: {state['world_size']} -> {self.acc.num_processes}")
        if diff:
            raise ConfigError(f"cannot resume from {path}: the run changed ({'; '.join(diff)}); pass --overwrite "
                              "(train_stage1(..., overwrite=True)) to start again, or use another train.output_dir")

    def load_checkpoint(self, path: Path) -> dict:
        from safetensors.torch import load_file

        state = json.loads((path / "trainer_state.json").read_text())  # checked by check_resume
        if self.is_deepspeed:
            self.acc.load_state(str(path))
        else:
            weights = load_file(str(path / "trainable.safetensors"))
            params = self._trainable()
            if set(weights) != set(params):
                extra, missing = sorted(set(weights) - set(params)), sorted(set(params) - set(weights))
                raise DataError(f"checkpoint {path} does not fit the model: missing {missing[:5]}, "
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
        path = self.resume_path
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

        # gathers ZeRO-3 shards (every rank takes part; only rank 0 receives them, the others get None);
        # keys are the MultiTapModel's own
        state = self.acc.get_state_dict(self.net) or {}
        if self.cfg.train.finetune == "lora" and self.main:
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
                 overrides: list[str] | tuple[str, ...] = (), overwrite: bool = False) -> Stage1Result:
    """Run stage-1 training; see the module docstring for the steps and the output directory.

    Args:
        config: a :class:`Stage1Config`, a recipe dict, or a YAML recipe path.
        train_data, eval_data: a ``datasets.Dataset`` or a list of dicts overriding
            ``config.data.dataset`` (columns as named in ``config.data``).
        overrides: ``section.key=value`` strings applied to a dict/path config.
        overwrite: delete the checkpoints already in ``train.output_dir`` and start again (else a
            run resumes its newest checkpoint, and refuses one of a different run).

    Returns a :class:`Stage1Result`. Bad data (empty set, missing column/image, score outside
    ``data.score_range``) raises ``ValueError`` naming the row before the model is loaded.
    """
    cfg = config if isinstance(config, Stage1Config) else load_stage1_config(config, overrides)
    run = Stage1Trainer(cfg, train_data, eval_data, overwrite=overwrite)
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
