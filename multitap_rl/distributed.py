"""Small helpers for running under ``torch.distributed`` (``accelerate launch``, ``torchrun``,
DeepSpeed), shared by the reward adapters, the running statistics and stage-2 extraction.

Everything here is a no-op in a single process without a process group, so library code can call
it unconditionally.

* :func:`rank_and_world` -- ``(rank, world_size)``; ``(0, 1)`` outside torch.distributed.
* :func:`collective_device` -- where a collective's tensors must live for the group's backend.
* :func:`all_true` -- one boolean agreed by every rank (an ``all_reduce`` of a 1-element tensor).
* :func:`barrier` -- wait for every rank.
* :func:`init_from_launcher` / :func:`launcher_group` -- join the process group ``accelerate
  launch``/``torchrun`` announced (the context manager also leaves it at the end).
* :func:`whole_modules` -- build modules whole even when transformers has been told about ZeRO-3
  (a TRL/Trainer run under DeepSpeed ZeRO-3 makes ``from_config`` construct empty ``zero.Init``
  partitions; a reward model built that way would not load).
"""

from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["all_true", "barrier", "collective_device", "distributed_group", "exit_launched_process",
           "init_from_launcher", "is_distributed", "launched_world_size", "launcher_group", "rank_and_world",
           "whole_modules"]


def is_distributed() -> bool:
    """True when a default ``torch.distributed`` process group exists in this process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def distributed_group(group=None):
    """The process group to use (``None``/``True``: the default group), or None outside
    torch.distributed or when ``group is False`` (stay per process)."""
    import torch.distributed as dist

    if group is False or not is_distributed():
        return None
    return group if group not in (None, True) else dist.group.WORLD


def rank_and_world(group=None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group`` (default: all ranks); ``(0, 1)`` outside torch.distributed."""
    import torch.distributed as dist

    g = distributed_group(group)
    if g is None:
        return 0, 1
    return dist.get_rank(g), dist.get_world_size(g)


def collective_device(group=None) -> torch.device:
    """The device a collective's tensors must be on for ``group``'s backend: CPU for gloo/MPI
    (also for a mixed ``"cuda:nccl,cpu:gloo"`` group), else this process's current accelerator."""
    import torch.distributed as dist

    g = distributed_group(group)
    backend = str(dist.get_backend(g)) if g is not None else "gloo"
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    acc = getattr(torch, "accelerator", None)
    if acc is not None and acc.is_available():
        return acc.current_accelerator()
    return torch.device("cpu")


def all_true(flag: bool, group=None) -> bool:
    """``flag`` on every rank of ``group`` combined with AND (a collective: every rank must call
    it); ``flag`` itself outside torch.distributed."""
    import torch.distributed as dist

    g = distributed_group(group)
    if g is None:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=collective_device(g))
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=g)
    return bool(int(t.item()))


def barrier(group=None) -> None:
    """Wait until every rank of ``group`` gets here (nothing outside torch.distributed)."""
    import torch.distributed as dist

    g = distributed_group(group)
    if g is not None:
        dist.barrier(group=g)


@contextlib.contextmanager
def whole_modules():
    """Within this context, transformers builds modules whole even when a DeepSpeed ZeRO-3 config
    has been announced to it (``TrainingArguments`` under a ZeRO-3 ``accelerate`` config does so,
    and ``from_config`` would then construct empty ``zero.Init`` partitions). Restored on exit."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref  # no public getter; restored below
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def init_from_launcher(timeout_s: float = 4 * 3600) -> bool:
    """Join the process group a launcher (``accelerate launch``, ``torchrun``) announced through
    ``WORLD_SIZE``/``RANK``/``MASTER_ADDR``, if there is one and it is not joined yet: NCCL on GPUs
    (each rank on GPU ``LOCAL_RANK``), gloo on CPUs. ``timeout_s`` bounds how long a rank waits
    for the others at a barrier (long extractions finish at different times). True if joined."""
    import datetime

    import torch.distributed as dist

    if is_distributed():
        return True
    if launched_world_size() <= 1 or "MASTER_ADDR" not in os.environ:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


@contextlib.contextmanager
def launcher_group(timeout_s: float = 4 * 3600):
    """:func:`init_from_launcher` for the block; a process group joined here is destroyed on exit
    (a process that exits with a live group can abort in its teardown). Yields ``(rank, world)``."""
    import torch.distributed as dist

    existed = is_distributed()
    joined = init_from_launcher(timeout_s)
    try:
        yield rank_and_world()
    finally:
        if joined and not existed and dist.is_initialized():
            dist.destroy_process_group()


def launched_world_size() -> int:
    """The world size a launcher announced (``WORLD_SIZE``), before any process group exists."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def exit_launched_process(code: int) -> None:
    """End a process a launcher started, after its work is done: wait for the other ranks, leave
    the process group, flush, and exit without the interpreter's native teardown, which on CPU
    sometimes aborts ("terminate called without an active exception") after every rank finished
    (seen in 2 of 14 DeepSpeed ZeRO-3 runs here) and would turn a finished run into a failed one."""
    import logging
    import sys

    import torch.distributed as dist

    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
