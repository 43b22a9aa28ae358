"""Shard a loaded :class:`~multitap_rl.model.MultiTapModel` over the ranks with DeepSpeed ZeRO-3.

For a reward model that does not fit next to the policy: between calls each rank holds only its
``1 / world_size`` slice of every parameter (``param.ds_tensor``; ``param.data`` is empty); for a
call, :func:`gathered` all-gathers the full weights, the call runs exactly as on an unsharded model
(the gathered tensors are bit-for-bit the loaded ones, so the scores are equal), and the full
weights are freed again on exit.

Why the whole model is gathered per call and not layer by layer as DeepSpeed's own ZeRO-3 engine
does (TRL's ``prepare_deepspeed`` for Hugging Face reward models): the engine fetches a layer's
weights when that layer runs, a collective that every rank must reach in the same order. The
scoring engine's calls depend on the content of each rank's batch (distinct images, prompt-prefix
groups, token-budgeted micro-batches), so ranks run different numbers of layer calls and would
deadlock. Gathering once per reward call needs only that every rank calls the reward equally
often, which TRL's trainers do (one call per generation batch on every rank) -- the same contract
as ``normalize="running"``. The memory saved is the reward's weights outside its calls (during
the policy's forward/backward and optimizer step); during a call the full weights are present, as
TRL's ``ds3_gather_for_generation`` does for the policy itself.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from .errors import ConfigError, require

__all__ = ["SHARDINGS", "gathered", "is_sharded", "local_numel", "shard_zero3"]

logger = logging.getLogger(__name__)

SHARDINGS = (None, "zero3")


def check_shard(shard) -> str | None:
    """``shard`` if it is a known option (None or "zero3"), else a ConfigError."""
    if shard not in SHARDINGS:
        raise ConfigError(f"shard must be one of {list(SHARDINGS)}, got {shard!r}")
    return shard


def _deepspeed():
    return require("deepspeed", "train", "shard='zero3'")


def is_sharded(module: torch.nn.Module) -> bool:
    """True when ``module``'s parameters are ZeRO-3 partitioned."""
    return any(hasattr(p, "ds_tensor") for p in module.parameters())


def local_numel(module: torch.nn.Module) -> int:
    """Parameter elements this rank holds between calls: its ZeRO-3 slices (plus any parameter
    DeepSpeed keeps whole), or every element of an unsharded module."""
    n = 0
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):
            n += p.ds_tensor.numel() + (p.data.numel() if getattr(p, "ds_persist", False) else 0)
        else:
            n += p.numel()
    return n


def shard_zero3(model: torch.nn.Module, group=None) -> torch.nn.Module:
    """Partition ``model``'s parameters over ``group`` (default: all ranks) in place; returns it.

    Needs torch.distributed (``accelerate launch``, ``torchrun``, ``deepspeed``) and DeepSpeed.
    Every rank must load the same weights and call this together. The partitions stay on the
    device the parameters are on (this rank's device); dtypes are kept (the float32 reward head
    stays float32)."""
    from .distributed import is_distributed

    ds = _deepspeed()
    if not is_distributed():
        raise ConfigError("shard='zero3' partitions the reward model over the ranks of a distributed run: launch with "
                          "`accelerate launch`, `torchrun` or `deepspeed` (torch.distributed is not initialised here)")
    if "LOCAL_RANK" not in os.environ:
        raise ConfigError("shard='zero3': LOCAL_RANK is not set (DeepSpeed reads it to place the partitions); launch "
                          "with `accelerate launch`, `torchrun` or `deepspeed`, which set it")
    if is_sharded(model):
        return model
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:
        raise ConfigError(f"shard='zero3': the model's parameters are on several devices {sorted(map(str, devices))}")
    dev = devices.pop()
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)  # zero.Init places partitions on the current device
    # mem_efficient_linear=False: otherwise DeepSpeed replaces torch.nn.functional.linear process-wide.
    # Only the device is overridden: a dtype override would cast the float32 head to the backbone's dtype.
    from deepspeed.runtime.zero.partition_parameters import DeepSpeedTensorOverride

    ds.zero.Init(module=model, data_parallel_group=group, mem_efficient_linear=False,
                 tensor_overrides=[DeepSpeedTensorOverride.device])
    logger.info("reward model sharded with ZeRO-3: this rank holds %d of %d parameter elements",
                local_numel(model), sum(int(p.ds_numel) for p in model.parameters()))
    return model


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Full weights of a :func:`shard_zero3` model for the duration of the block (a collective:
    every rank enters together); nothing for an unsharded model. The weights are not written back
    (``modifier_rank=None``): the block must not change them."""
    if not is_sharded(model):
        yield model
        return
    ds = _deepspeed()
    with ds.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield model
