"""TF32 matmuls for a block: what ``dtype="tf32"`` (float32 weights) turns on around a model's own
forward on CUDA. Kept apart from :mod:`multitap_rl.precision` (which loads models) so the model
module can use it without an import cycle."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["tf32_matmuls"]


@contextlib.contextmanager
def tf32_matmuls(enabled: bool = True):
    """Within the block, CUDA float32 matmuls (cuBLAS) and convolutions (cuDNN) may use TF32; the
    previous settings are put back on exit, also after an exception. ``enabled=False``: nothing.

    Uses torch's ``fp32_precision`` settings where they exist (torch >= 2.9; mixing them with the
    legacy ``allow_tf32`` flags makes torch refuse to read the flags), else ``allow_tf32``. Never
    ``torch.set_float32_matmul_precision``, which also switches CPU (oneDNN) matmuls. CPU
    computation is unaffected either way."""
    if not enabled:
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    conv = getattr(cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and conv is not None and hasattr(conv, "fp32_precision"):
        saved = (matmul.fp32_precision, conv.fp32_precision)
        matmul.fp32_precision, conv.fp32_precision = "tf32", "tf32"
        try:
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = saved
    else:  # pragma: no cover - torch < 2.9
        saved = (matmul.allow_tf32, cudnn.allow_tf32)
        matmul.allow_tf32, cudnn.allow_tf32 = True, True
        try:
            yield
        finally:
            matmul.allow_tf32, cudnn.allow_tf32 = saved
