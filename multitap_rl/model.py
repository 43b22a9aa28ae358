"""``MultiTapModel``: a backbone, the stage-1 reward head and (optionally) stage-2 ridge heads."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .backbones import Backbone, backbone_for, remote_code_backbone
from .backbones.base import FeatureSettings, load_image_processor
from .checkpoint import (
    BASE_MODEL_FILES,
    CHECKPOINT_FILES,
    KNOWN_CHECKPOINTS,
    checkpoint_fingerprint,
    load_strict,
    read_multitap_config,
    read_state_dict,
    resolve_dir,
    split_checkpoint,
)
from .errors import ON_INVALID, CheckpointError, ConfigError, SampleError, check_on_invalid
from .scoring import EngineConfig, FeatureEngine
from .spec import AUTO, ModelSpec

__all__ = ["AUTO", "MultiTapModel", "ScoreOutput", "default_device", "matmul_precision", "resolve_device",
           "resolve_dtype"]

logger = logging.getLogger(__name__)


@dataclass
class ScoreOutput:
    """Scores for N samples. ``scores``: dimension name -> (N,) float32, ``"overall"`` (the stage-1
    score in (0, 1)) first, then each stage-2 head dimension. ``errors``: sample index -> the
    :class:`~multitap_rl.errors.SampleError` that kept it from being scored (only with
    ``on_invalid="skip"``; those samples' values are NaN and :attr:`valid` is False there)."""

    scores: dict[str, torch.Tensor]
    errors: dict[int, SampleError] = field(default_factory=dict)

    @property
    def overall(self) -> torch.Tensor:
        """(N,) the stage-1 score, ``scores["overall"]``."""
        return self.scores["overall"]

    @property
    def dims(self) -> dict[str, torch.Tensor]:
        """The stage-2 dimensions only (``scores`` without ``"overall"``)."""
        return {k: v for k, v in self.scores.items() if k != "overall"}

    def __len__(self) -> int:
        return int(self.overall.shape[0])

    @property
    def valid(self) -> torch.Tensor:
        """(N,) bool: True where the sample was scored."""
        mask = torch.ones(len(self), dtype=torch.bool)
        for i in self.errors:
            mask[i] = False
        return mask

    def rows(self) -> list[dict[str, float | str]]:
        """One ``{"overall": x, <dim>: y, ...}`` dict per sample (``{"error": message}`` for a
        sample that could not be scored)."""
        return [{"error": str(self.errors[i])} if i in self.errors else {k: float(v[i]) for k, v in self.scores.items()}
                for i in range(len(self))]


def default_device() -> torch.device:
    """This process's accelerator if there is one (accelerate's local process device), else CPU."""
    if torch.cuda.is_available():
        try:
            from accelerate import PartialState

            return PartialState().device
        except Exception:  # accelerate not initialised the way we expect: fall back to current GPU
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_device(device) -> torch.device:
    """``None`` -> :func:`default_device`; otherwise the device, checked to exist here."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r}: not a torch device ({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: no CUDA GPU is available here (use 'cpu', or leave it unset)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type not in ("cpu", "meta") and not hasattr(torch, dev.type):
        raise ConfigError(f"device {device!r}: unsupported device type")
    return dev


_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
           "tf32": torch.float32}


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """``None``/"auto" -> bfloat16 on GPU, float32 elsewhere; strings like "bf16" accepted.
    ``"tf32"`` is float32 weights (the model then runs its matmuls in TF32 on CUDA, see
    :func:`matmul_precision`)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def matmul_precision(dtype) -> str | None:
    """``"tf32"`` when ``dtype`` asks for float32 weights with TF32 matmuls, else None."""
    return "tf32" if isinstance(dtype, str) and dtype == "tf32" else None


def _resolve_settings(backbone_cls, meta: dict, where: str, *, rope, image_size, max_length,
                      backbone_options) -> FeatureSettings:
    """The one place requested settings become the backbone's :class:`FeatureSettings`: ``None``
    rope and options and ``"auto"`` sizes take the checkpoint's recorded value (``meta``), else
    the reference's (rope "reference", image size 560, the backbone's reference ``max_length``).
    An explicit size that differs from the recorded one wins, with a warning (scores change)."""
    reference = {"image_size": 560, "max_length": backbone_cls.default_max_length}
    sizes = {}
    for key, value in (("image_size", image_size), ("max_length", max_length)):
        if isinstance(value, str):
            if value != AUTO:
                raise ConfigError(f"{key} must be an int, None or 'auto', got {value!r}")
            value = meta[key] if key in meta else reference[key]
        elif meta.get(key) is not None and meta[key] != value:
            logger.warning("%s was trained with %s=%s but is loaded with %s=%s (scores change)", where, key,
                           meta[key], key, value)
        sizes[key] = value
    options = _backbone_options(meta.get("backbone_options") if backbone_options is None else backbone_options)
    return FeatureSettings(rope or meta.get("rope") or "reference", sizes["image_size"], sizes["max_length"],
                           tuple(sorted(options.items())))


def _chat_template(tokenizer, base_dir: Path) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    for name in ("chat_template.json", "chat_template.jinja"):
        path = base_dir / name
        if path.is_file():
            text = path.read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    raise CheckpointError(f"base model {base_dir}: no chat template (tokenizer_config or chat_template.json)")


def _backbone_options(options) -> dict:
    if options is None:
        return {}
    if isinstance(options, tuple):  # a ModelSpec's sorted pairs
        options = dict(options)
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise TypeError(f"backbone_options must be a dict of keyword arguments, got {type(options).__name__}")
    reserved = {"rope", "image_size", "max_length"} & options.keys()
    if reserved:
        raise ValueError(f"pass {sorted(reserved)} as arguments of their own, not in backbone_options")
    return dict(options)


def _no_base_model_message(ckpt_dir: Path, name: str) -> str:
    """Why a checkpoint has no base model: it may be a base model itself, not a MULTI-TAP checkpoint,
    or the training output folder above one (``DIR`` for ``DIR/model``)."""
    from .checkpoint import INDEX_FILE, SINGLE_FILE, folder_above_hint, holds_weights

    hint = folder_above_hint(ckpt_dir, name)
    if hint is not None:
        return hint
    cfg = ckpt_dir / "config.json"
    try:
        model_type = json.loads(cfg.read_text()).get("model_type") if cfg.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        model_type = None
    if model_type:
        return (f"{name!r} is a base model ({model_type}), not a MULTI-TAP checkpoint: pass it as the base model "
                "(base_model= / --base-model) together with a MULTI-TAP checkpoint, or start a new reward model "
                "from it with MultiTapModel.from_base_model / a stage-1 recipe")
    if not holds_weights(ckpt_dir):
        return f"checkpoint {name!r}: no {SINGLE_FILE} or {INDEX_FILE} there; is it a MULTI-TAP checkpoint folder?"
    return (f"checkpoint {name!r} does not name its base model: pass the base model (base_model= / --base-model, "
            "e.g. Qwen/Qwen2-VL-2B-Instruct)")


def _load_backbone(base_dir: Path, base_name, state: dict[str, torch.Tensor], where: str, dev: torch.device,
                   dt: torch.dtype, *, meta: dict, rope, image_size, max_length,
                   backbone_options) -> tuple[Backbone, dict]:
    """The backbone adapter for ``base_dir``'s config with ``state`` loaded strictly into an
    uninitialised module (frozen, eval), plus the base model's tokenizer, image processor and chat
    template. Returns (backbone, ``state`` with keys remapped onto the module)."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.initialization import no_init_weights

    # 1. The adapter from config.json's model_type. Models whose config names remote code
    #    (auto_map) are read by their adapter itself; nothing from the base model's code runs.
    name = os.fspath(base_name)
    try:
        native = remote_code_backbone(base_dir)
        if native is not None:
            backbone_cls = native
            state, ignored = backbone_cls.remap_state_dict(state)
            config = backbone_cls.read_config(base_dir, state)
        else:
            config = AutoConfig.from_pretrained(base_dir)
            backbone_cls = backbone_for(config)
            state, ignored = backbone_cls.remap_state_dict(state)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"base model {name!r}: cannot read its config.json ({exc})") from None
    if ignored:
        logger.info("ignoring %s (not needed to score)", ", ".join(ignored))
    # 2. The module, uninitialised, then the weights strictly. Built whole even inside a ZeRO-3
    #    run (transformers would otherwise construct empty zero.Init partitions that cannot load).
    from .distributed import whole_modules

    with whole_modules(), no_init_weights(), torch.device(dev):
        module = backbone_cls.build_module(config, dtype=dt)
    load_strict(module, state, where)
    module.eval().requires_grad_(False)
    # 3. Tokenizer, image processor, chat template.
    try:
        if native is not None:
            tokenizer, image_processor, chat_template = backbone_cls.load_processing(base_dir)
        else:
            tokenizer = AutoTokenizer.from_pretrained(base_dir)
            image_processor = load_image_processor(base_dir)
            chat_template = _chat_template(tokenizer, base_dir)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"base model {name!r}: cannot load its tokenizer or image processor ({exc})") from None
    if len(tokenizer) < 16:  # transformers builds an almost empty tokenizer when the files are missing
        raise CheckpointError(f"base model {name!r}: its tokenizer has {len(tokenizer)} token(s); the tokenizer files "
                              "(tokenizer.json / tokenizer_config.json) are missing or broken")
    settings = _resolve_settings(backbone_cls, meta, where, rope=rope, image_size=image_size, max_length=max_length,
                                 backbone_options=backbone_options)
    try:
        backbone = backbone_cls(module, tokenizer, image_processor, chat_template, rope=settings.rope,
                                image_size=settings.image_size, max_length=settings.max_length, **dict(settings.options))
    except ConfigError:
        raise
    except TypeError as exc:  # an option this backbone does not take
        if not settings.options or "unexpected keyword argument" not in str(exc):
            raise
        raise ConfigError(f"backbone_options {dict(settings.options)} do not fit the {backbone_cls.family} backbone "
                          f"({exc}); see its options in multitap_rl/backbones") from None
    except ValueError as exc:
        raise CheckpointError(f"base model {name!r}: {exc}") from None
    return backbone, state


class MultiTapModel(nn.Module):
    """Scores image-text pairs with MULTI-TAP.

    ``score(images, texts, questions=None) -> ScoreOutput``; ``features(...) -> (N, H)``;
    ``forward(...) -> (N,)`` reward logits (what stage 1 trains; ``score`` applies the sigmoid).
    Build with :meth:`from_pretrained`, :meth:`from_spec` or :meth:`from_base_model`; ``spec``
    is the :class:`~multitap_rl.spec.ModelSpec` it was loaded from.
    """

    def __init__(self, backbone: Backbone, reward_head: nn.Linear, *, heads=None,
                 engine: EngineConfig | None = None, info: dict | None = None, spec: ModelSpec | None = None):
        super().__init__()
        self.backbone = backbone
        self.reward_head = reward_head
        self.heads = heads
        self.engine = FeatureEngine(backbone, engine)
        self.info = dict(info or {})
        self.spec = spec if spec is not None else ModelSpec(engine=self.engine.config)
        # "tf32": float32 weights, TF32 matmuls/convolutions around this model's own forward on CUDA
        # (dtype="tf32" at load); None: the matmul precision the process has.
        self.matmul_precision: str | None = matmul_precision(self.spec.dtype)

    # -- loading -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | os.PathLike,
        base_model: str | os.PathLike | None = None,
        *,
        heads: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        rope: str | None = None,
        max_length: int | None | str = AUTO,
        image_size: int | None | str = AUTO,
        engine: EngineConfig | None = None,
        revision: str | None = None,
        trust_legacy_heads: bool = False,
        backbone_options: dict | None = None,
    ) -> MultiTapModel:
        """Load a MULTI-TAP checkpoint onto its backbone.

        Args:
            checkpoint: local directory or hub id of a MULTI-TAP checkpoint (released layout, 4.46
                or 5.x key names, sharded or single file; or our format).
            base_model: local directory or hub id of the base LVLM. Only its config, tokenizer,
                processor and chat template are read (the checkpoint holds every weight).
                Optional for our format and for the released hub checkpoints.
            heads: stage-2 ridge heads directory (see ``multitap_rl.heads``).
            device, dtype: default: this process's GPU in bfloat16, else CPU in float32.
                ``dtype="tf32"``: float32 weights, TF32 matmuls during this model's forward on
                CUDA only (the process's own TF32 settings are restored after each call); on CPU
                it is plain float32.
            rope: "reference" (arange positions, as the released checkpoints were scored) or
                "mrope"; default from our checkpoint metadata, else "reference".
            max_length: truncate prompts to this many tokens as the reference does (None: never);
                "auto": the value our checkpoint recorded, else the backbone's reference value
                (1024 for Qwen2-VL and Llama-3.2-Vision, 16384 for InternLM-XComposer2.5).
            image_size: images are resized to ``image_size`` squared (None: not resized); "auto":
                the value our checkpoint recorded, else the reference's 560. An explicit value that
                differs from the recorded one is used, with a warning.
            engine: batching options (token budget, image/prefix sharing).
            backbone_options: extra keyword arguments of the backbone adapter, e.g.
                ``{"pad_token": "<|eot_id|>"}`` for Llama-3.2-Vision (see ``backbones/mllama.py``);
                default: those saved in our checkpoint metadata (``save_pretrained`` records them).
        """
        # 1. Locate the checkpoint and the base model; settings the checkpoint recorded.
        spec = ModelSpec(checkpoint=checkpoint, base_model=base_model, device=device, dtype=dtype, rope=rope,
                         image_size=image_size, max_length=max_length, engine=engine or EngineConfig(),
                         backbone_options=backbone_options)
        ckpt_dir = resolve_dir(checkpoint, what="checkpoint", allow_patterns=CHECKPOINT_FILES, revision=revision)
        meta = read_multitap_config(ckpt_dir)
        where = f"checkpoint {os.fspath(checkpoint)!r}"
        base = base_model or meta.get("base_model") or KNOWN_CHECKPOINTS.get(os.fspath(checkpoint))
        if base is None:
            raise CheckpointError(_no_base_model_message(ckpt_dir, os.fspath(checkpoint)))
        base_dir = resolve_dir(base, what="base model", allow_patterns=BASE_MODEL_FILES)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)

        # 2. Backbone (class from the base model's config, weights from the checkpoint, strictly),
        #    tokenizer, image processor and chat template from the base model.
        backbone_sd, head_sd = split_checkpoint(read_state_dict(ckpt_dir), where)
        backbone, backbone_sd = _load_backbone(base_dir, base, backbone_sd, where, dev, dt, meta=meta, rope=rope,
                                               image_size=image_size, max_length=max_length,
                                               backbone_options=backbone_options)
        fingerprint = checkpoint_fingerprint(backbone_sd, head_sd)  # cheap: tensors already in memory
        del backbone_sd

        # 3. Reward head (float32: the sigmoid sees full-precision logits).
        hidden = backbone.hidden_size
        if tuple(head_sd["weight"].shape) != (1, hidden) or tuple(head_sd["bias"].shape) != (1,):
            raise CheckpointError(
                f"{where}: reward_head.weight {tuple(head_sd['weight'].shape)} does not fit hidden size {hidden} "
                "of the base model (wrong base model?)"
            )
        head = nn.Linear(hidden, 1, device=dev, dtype=torch.float32)
        head.load_state_dict({k: v.float() for k, v in head_sd.items()})
        head.requires_grad_(False)

        info = {"checkpoint": os.fspath(checkpoint), "base_model": os.fspath(base), "family": backbone.family,
                "checkpoint_dir": str(ckpt_dir), "fingerprint": fingerprint}
        model = cls(backbone, head, engine=spec.engine, info=info, spec=spec).eval()
        if heads is not None:
            model.load_heads(heads, trust_legacy=trust_legacy_heads)
        return model

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> MultiTapModel:
        """Load the model ``spec`` describes (its heads too, also heads attached as an object)."""
        if not isinstance(spec, ModelSpec):
            raise ConfigError(f"expected a ModelSpec, got {type(spec).__name__}")
        if spec.is_remote:
            raise ConfigError(f"{spec.checkpoint} is a served reward: score through it with reward_fns (a URL where a "
                              "checkpoint goes), or load its checkpoint here")
        if spec.checkpoint is None:
            raise ConfigError(
                "this spec comes from an in-memory MultiTapModel that has no checkpoint (e.g. from_base_model, "
                "trained here), and this process cannot see that model; save it with model.save_pretrained(dir) "
                "and use dir"
            )
        model = cls.from_pretrained(spec.checkpoint, spec.base_model, heads=spec.heads, device=spec.device,
                                    dtype=spec.dtype, rope=spec.rope, max_length=spec.max_length,
                                    image_size=spec.image_size, engine=spec.engine,
                                    backbone_options=None if spec.backbone_options is None else
                                    dict(spec.backbone_options))
        if spec.fingerprint is not None and model.info.get("fingerprint") != spec.fingerprint:
            raise CheckpointError(f"checkpoint {spec.checkpoint!r} has fingerprint {model.info.get('fingerprint')}, not "
                                  f"the {spec.fingerprint} the spec asks for (another or a changed checkpoint)")
        if spec.heads_state is not None:
            from .heads import RidgeHeads

            model.load_heads(RidgeHeads.from_bytes(spec.heads_state))
        return model

    @classmethod
    def from_base_model(
        cls,
        base_model: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        rope: str | None = None,
        max_length: int | None | str = AUTO,
        image_size: int | None | str = AUTO,
        engine: EngineConfig | None = None,
        revision: str | None = None,
        seed: int = 0,
        backbone_options: dict | None = None,
    ) -> MultiTapModel:
        """A new MULTI-TAP model to train: the base LVLM's own weights and a fresh reward head.

        The head is initialised as the reference does: weight ~ N(0, 1/(H+1)) (seeded by
        ``seed``), bias 0. Weights are read strictly from the base model's safetensors (4.46 or
        5.x key names; an untied ``lm_head`` is ignored). The model comes back in eval mode with
        every parameter frozen: training turns on what it trains. Other arguments as
        :meth:`from_pretrained`.
        """
        # 1. Base model: its own weights (strictly), tokenizer, image processor, chat template.
        base_dir = resolve_dir(base_model, what="base model", allow_patterns=BASE_MODEL_FILES + ["*.safetensors"],
                               revision=revision)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        backbone, _ = _load_backbone(
            base_dir, base_model, read_state_dict(base_dir), f"base model {os.fspath(base_model)!r}", dev, dt,
            meta={}, rope=rope, image_size=image_size, max_length=max_length, backbone_options=backbone_options,
        )

        # 2. Fresh reward head (float32), seeded.
        hidden = backbone.hidden_size
        gen = torch.Generator().manual_seed(seed)
        head = nn.Linear(hidden, 1, device=dev, dtype=torch.float32)
        with torch.no_grad():
            head.weight.copy_(torch.randn(1, hidden, generator=gen) / (hidden + 1) ** 0.5)
            head.bias.zero_()
        head.requires_grad_(False)
        local = Path(os.fspath(base_model)).expanduser()
        name = str(local.resolve()) if local.is_dir() else os.fspath(base_model)
        info = {"checkpoint": None, "base_model": name, "family": backbone.family, "checkpoint_dir": None}
        spec = ModelSpec(base_model=name, device=device, dtype=dtype, rope=rope, image_size=image_size,
                         max_length=max_length, engine=engine or EngineConfig(), backbone_options=backbone_options)
        return cls(backbone, head, engine=spec.engine, info=info, spec=spec).eval()

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        layout: str = "multitap",
        *,
        state_dict: dict[str, torch.Tensor] | None = None,
        max_shard_size: int | str = "5GB",
        extra_metadata: dict | None = None,
    ) -> Path:
        """Write the backbone and reward head so that :meth:`from_pretrained` loads them back.

        Args:
            save_directory: created if needed; weight files already there are replaced.
            layout: ``"multitap"`` -- ``backbone_model.*`` in current transformers key names; or
                ``"released"`` -- the released MULTI-TAP layout (transformers 4.46 key names, tied
                ``lm_head`` absent, ``config.json`` of ``VLMRewardModel``), loadable by the
                reference code too. Both write ``multitap_config.json`` (base model, backbone
                family, rope, image size, max length, backbone options), so ``base_model=`` is
                optional on load and the loaded model reads the same features.
            state_dict: this module's state dict to write instead of ``self.state_dict()`` (e.g.
                gathered from a distributed run); keys ``backbone.model.*`` and ``reward_head.*``.
            max_shard_size: bytes (or "500MB", "5GB"); more than one shard writes an index.
            extra_metadata: merged into ``multitap_config.json`` (e.g. training summary).

        Returns the directory. Stage-2 heads are not written here.
        """
        from .checkpoint import save_sharded

        # 1. Split this module's state into backbone and head; refuse unmerged adapters.
        if layout not in ("multitap", "released"):
            raise ValueError(f"layout must be 'multitap' or 'released', got {layout!r}")
        state = self.state_dict() if state_dict is None else state_dict
        prefix = "backbone.model."
        backbone_sd = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        head_sd = {k[len("reward_head.") :]: v for k, v in state.items() if k.startswith("reward_head.")}
        if not backbone_sd or set(head_sd) != {"weight", "bias"}:
            raise ValueError("state_dict must hold backbone.model.* and reward_head.{weight,bias}")
        lora = [k for k in backbone_sd if ".lora_" in k or ".base_layer." in k]  # not P-LoRA (Plora_A, plora_*_GN)
        if lora:
            raise ValueError(
                f"state holds unmerged LoRA weights ({lora[0]!r}, ...): merge them first "
                "(multitap_rl.training.merge_lora_state_dict)"
            )
        # 2. Key names of the chosen layout.
        out = {f"backbone_model.{k}": v for k, v in type(self.backbone).export_state_dict(backbone_sd, layout).items()}
        out.update({f"reward_head.{k}": v.float() for k, v in head_sd.items()})
        # 3. Weights (sharded above max_shard_size), then metadata.
        path = Path(os.fspath(save_directory))
        save_sharded(out, path, max_shard_size=max_shard_size)
        meta = {
            "format": "multitap-rl",
            "format_version": 1,
            "layout": layout,
            "family": type(self.backbone).family,
            "base_model": self.info.get("base_model"),
            **self.backbone.settings.as_dict(),
            "hidden_size": self.hidden_size,
            **(extra_metadata or {}),
        }
        (path / "multitap_config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if layout == "released":
            dtype = str(next(iter(backbone_sd.values())).dtype).replace("torch.", "")
            cfg = {"architectures": ["VLMRewardModel"], "torch_dtype": dtype, "transformers_version": "4.46.1"}
            (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        else:
            (path / "config.json").unlink(missing_ok=True)
        return path

    def load_heads(self, path, trust_legacy: bool = False, *, strict: bool = True) -> None:
        """Attach stage-2 heads (a directory from ``fit-heads``, or a :class:`~multitap_rl.heads.RidgeHeads`);
        ``score()`` then fills ``.dims``. Heads fit on another hidden size, or (``strict``) on
        another checkpoint's features, raise ``HeadsError``. A legacy pickle loads only with
        ``trust_legacy=True`` (unpickling runs code from the file)."""
        from .heads import RidgeHeads

        heads = path if isinstance(path, RidgeHeads) else RidgeHeads.load(path, trust_legacy=trust_legacy)
        where = "heads" if isinstance(path, RidgeHeads) else f"heads {os.fspath(path)!r}"
        heads.check_compatible(self.hidden_size, self.info.get("fingerprint"), where=where, strict=strict,
                               settings=self.backbone.settings.as_dict())
        self.heads = heads
        self.spec = self.spec.replace(heads=None if isinstance(path, RidgeHeads) else os.fspath(path))

    # -- scoring ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.reward_head.weight.device

    @property
    def hidden_size(self) -> int:
        return self.backbone.hidden_size

    @property
    def dimension_names(self) -> tuple[str, ...]:
        """``("overall", *head dimensions)``: the names weights and rewards may use."""
        return ("overall", *(self.heads.names if self.heads is not None else ()))

    def _matmuls(self):
        """The context this model's own forward runs in: TF32 matmuls for a ``dtype="tf32"`` model
        on CUDA (settings restored after), nothing otherwise."""
        from .tf32 import tf32_matmuls

        return tf32_matmuls(self.matmul_precision == "tf32" and self.device.type == "cuda")

    def forward(self, images: Sequence, texts: Sequence[str], questions: Sequence | None = None) -> torch.Tensor:
        """Stage-1 reward logits (N,) float32 on the model's device, differentiable when grads are
        enabled: the training forward. ``sigmoid`` of them is ``score(...).overall``; both run
        under this model's matmul precision."""
        with self._matmuls():
            return self.logits_from_features(self.engine.features(images, texts, questions))

    def logits_from_features(self, h: torch.Tensor) -> torch.Tensor:
        """(N, H) features -> (N,) float32 reward logits (the head runs in float32)."""
        return self.reward_head(h.to(self.device, torch.float32)).squeeze(-1)

    def overall_from_features(self, h: torch.Tensor) -> torch.Tensor:
        """(N, H) features -> (N,) stage-1 scores in (0, 1)."""
        return torch.sigmoid(self.logits_from_features(h))

    @torch.inference_mode()
    def features(self, images: Sequence, texts: Sequence[str], questions: Sequence | None = None) -> torch.Tensor:
        """(N, H) float32 CPU: final-layer hidden state at the last position of each sample."""
        with self._matmuls():
            return self.engine.features(images, texts, questions).cpu()

    @torch.inference_mode()
    def score(self, images: Sequence, texts: Sequence[str], questions: Sequence | None = None, *,
              on_invalid: str = "raise") -> ScoreOutput:
        """Score N samples; ``questions=None`` is the caption task, else the instruction task.

        ``on_invalid="raise"`` (default): the first bad sample raises a :class:`SampleError` naming it.
        ``"skip"``: every bad sample is left out and reported in ``ScoreOutput.errors`` (its values
        are NaN, ``valid`` False); the others are scored exactly as alone. A score that is not
        finite is never returned: it is such an error too."""
        check_on_invalid(on_invalid, ON_INVALID, allow_float=False)
        errors: dict[int, SampleError] | None = {} if on_invalid == "skip" else None
        with self._matmuls():
            h = self.engine.features(images, texts, questions, errors=errors)
            return self.score_features(h, errors=errors)

    @torch.inference_mode()
    def score_features(self, h: torch.Tensor, *, errors: dict[int, SampleError] | None = None) -> ScoreOutput:
        """Scores of (N, H) features. Rows listed in ``errors`` are skipped (NaN); a row whose score is
        not finite raises a :class:`SampleError`, or is added to ``errors`` when a dict is given."""
        n = h.shape[0]
        skip = dict(errors or {})

        def fail(i: int, what: str) -> None:
            exc = SampleError(i, "score", f"{what} not finite (numerical overflow in {self.backbone.dtype}?)")
            if errors is None:
                raise exc
            skip[i] = errors[i] = exc

        # 1. Features: a row that is not finite is that sample's error, never a NaN score.
        finite = torch.isfinite(h.detach()).all(dim=1).cpu().tolist() if n else []
        for i in range(n):
            if i not in skip and not finite[i]:
                fail(i, "features")
        # 2. Stage-1 and stage-2 scores of the rows left.
        keep = torch.tensor([i for i in range(n) if i not in skip], dtype=torch.long)
        scores = {name: torch.full((n,), float("nan")) for name in self.dimension_names}
        if keep.numel():
            hk = h[keep.to(h.device)]
            scores["overall"][keep] = self.overall_from_features(hk).float().cpu()
            if self.heads is not None:
                for name, v in self.heads.predict(hk.float().cpu()).items():
                    scores[name][keep] = v
        for i in keep.tolist():
            bad = [k for k, v in scores.items() if not bool(torch.isfinite(v[i]))]
            if bad:
                fail(i, str(bad))
        for v in scores.values():
            v[list(skip)] = float("nan")
        return ScoreOutput(scores=scores, errors=dict(sorted(skip.items())))
