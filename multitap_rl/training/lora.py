"""LoRA for stage-1 training: inject adapters in place, merge them into plain weights on save.

Design: adapters are injected into the backbone's own ``nn.Module`` (``peft.inject_adapter_in_model``,
no ``PeftModel`` wrapper), so the scoring code path is unchanged during training. A finished run
is saved *merged* (``W + scaling * B @ A``): an ordinary MULTI-TAP checkpoint that
``MultiTapModel.from_pretrained`` loads without peft and scores without adapter overhead.
Resumable training checkpoints hold the adapter weights themselves (see ``stage1``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

__all__ = ["apply_lora", "lora_scalings", "merge_lora_state_dict"]

logger = logging.getLogger(__name__)

ADAPTER = "default"


def apply_lora(module: nn.Module, *, r: int, alpha: float, dropout: float, target_modules: list[str],
               use_rslora: bool = False) -> int:
    """Inject LoRA adapters into ``module``'s linear layers named in ``target_modules``; freeze
    everything else in ``module``. Returns the number of trainable adapter parameters."""
    from ..errors import require

    peft = require("peft", "train", "LoRA training")
    LoraConfig, inject_adapter_in_model = peft.LoraConfig, peft.inject_adapter_in_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        use_rslora=use_rslora, bias="none")
    module.requires_grad_(False)
    try:
        inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"LoRA target_modules {list(target_modules)}: {exc}") from None
    n = 0
    for name, p in module.named_parameters():
        if ".lora_" in name:
            p.requires_grad_(True)
            n += p.numel()
    if n == 0:
        raise ValueError(f"LoRA target_modules {list(target_modules)} matched no layer of the backbone")
    return n


def lora_scalings(module: nn.Module, prefix: str = "") -> dict[str, float]:
    """``{module name: scaling}`` for every LoRA layer in ``module`` (names prefixed)."""
    out = {}
    for name, sub in module.named_modules():
        scaling = getattr(sub, "scaling", None)
        if isinstance(scaling, dict) and ADAPTER in scaling and hasattr(sub, "lora_A"):
            out[prefix + name] = float(scaling[ADAPTER])
    return out


def merge_lora_state_dict(state: dict[str, torch.Tensor], scalings: dict[str, float]) -> dict[str, torch.Tensor]:
    """A state dict with every LoRA layer folded into a plain weight.

    ``X.base_layer.weight`` + ``X.lora_A.default.weight`` (r, in) + ``X.lora_B.default.weight``
    (out, r) become ``X.weight = W + scalings[X] * B @ A`` (computed in float32, stored in W's
    dtype); ``X.base_layer.bias`` becomes ``X.bias``. Works on gathered (e.g. ZeRO-3) state dicts,
    since it needs only tensors."""
    out: dict[str, torch.Tensor] = {}
    seen = set()
    for key, value in state.items():
        if ".lora_" in key:
            if not (key.endswith(f".lora_A.{ADAPTER}.weight") or key.endswith(f".lora_B.{ADAPTER}.weight")):
                raise ValueError(f"cannot merge LoRA weight {key!r} (only plain linear LoRA is supported)")
            continue
        if ".base_layer." not in key:
            out[key] = value
            continue
        mod, name = key.split(".base_layer.", 1)
        if name == "weight":
            try:
                a = state[f"{mod}.lora_A.{ADAPTER}.weight"]
                b = state[f"{mod}.lora_B.{ADAPTER}.weight"]
            except KeyError:
                raise ValueError(f"{mod}: base layer without LoRA A/B weights") from None
            if mod not in scalings:
                raise ValueError(f"{mod}: no LoRA scaling known")
            value = (value.float() + scalings[mod] * (b.float() @ a.float())).to(value.dtype)
            seen.add(mod)
        out[f"{mod}.{name}"] = value
    missing = set(scalings) - seen
    if missing:
        raise ValueError(f"LoRA layers missing from the state dict: {sorted(missing)[:5]}")
    return out
