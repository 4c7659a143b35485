"""Fused kernels for distillation, each with one shared pure-PyTorch reference (``reference.py``).

The engine calls the functions exported here. Each dispatches on the tensors it is given: CUDA
tensors take a Triton kernel where one exists, CPU tensors the reference. ``BIODISTILL_KERNELS=reference``
forces the reference everywhere (benchmarks and A/B runs flip it); ``BIODISTILL_KERNELS=triton`` forces
the Triton path even on CPU tensors, which is how the tests run it under ``TRITON_INTERPRET=1``.
Nothing in this package imports the engine.
"""

from __future__ import annotations

import os

import torch

from biodistill.kernels.reference import bottleneck_adapter as _adapter_reference
from biodistill.kernels.reference import temperature_kl

__all__ = ["bottleneck_adapter", "temperature_kl", "use_triton"]


def use_triton(x: torch.Tensor) -> bool:
    """Whether ``x`` takes the Triton path (read at every call, so a switch takes effect at once)."""
    mode = os.environ.get("BIODISTILL_KERNELS", "auto")
    if mode not in ("auto", "reference", "triton"):
        raise ValueError(f"BIODISTILL_KERNELS must be auto, reference or triton, got {mode!r}")
    return mode == "triton" or (mode == "auto" and x.is_cuda)


def bottleneck_adapter(x, down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias, eps=1e-12):
    """``LN(x + Up(GELU(Down(x))))`` over the last dimension; see ``reference.bottleneck_adapter``."""
    if use_triton(x):
        from biodistill.kernels.adapter import fused_bottleneck_adapter  # imports triton only when used

        return fused_bottleneck_adapter(x, down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias, eps)
    return _adapter_reference(x, down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias, eps)
