"""The kernels' entry points: ``from biodistill.kernels.ops import temperature_kl``.

``biodistill.kernels`` is a namespace package on purpose: kernels/ has no ``__init__.py`` (setup.py says
why), so its entry points live in this module rather than in the package. Each one, with one shared
pure-PyTorch reference (``reference.py``), dispatches on the tensors it is given: CUDA tensors take a
Triton kernel where one exists, CPU tensors the reference. ``BIODISTILL_KERNELS=reference`` forces the
reference everywhere (benchmarks and A/B runs flip it); ``BIODISTILL_KERNELS=triton`` forces the Triton
path even on CPU tensors, which is how the tests run it under ``TRITON_INTERPRET=1``. Nothing in this
package imports the engine.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
from torch import nn

from . import reference
from .attention_blocked import blocked_attention_divergence
from .reference import AttentionKind, Reduction

__all__ = ["TemperatureKL", "attention_divergence", "bottleneck_adapter", "kernel_mode", "temperature_kl", "use_triton"]


def use_triton(x: torch.Tensor) -> bool:
    """Whether ``x`` takes the Triton path (read at every call, so a switch takes effect at once)."""
    mode = os.environ.get("BIODISTILL_KERNELS", "auto")
    if mode not in ("auto", "reference", "triton"):
        raise ValueError(f"BIODISTILL_KERNELS must be auto, reference or triton, got {mode!r}")
    return mode == "triton" or (mode == "auto" and x.is_cuda)


@contextlib.contextmanager
def kernel_mode(mode: str):
    """``BIODISTILL_KERNELS=mode`` for the block (A/B benchmarks), then as it was."""
    previous = os.environ.get("BIODISTILL_KERNELS")
    os.environ["BIODISTILL_KERNELS"] = mode
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("BIODISTILL_KERNELS", None)
        else:
            os.environ["BIODISTILL_KERNELS"] = previous


def bottleneck_adapter(x, down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias, eps=1e-12):
    """``LN(x + Up(GELU(Down(x))))`` over the last dimension; see ``reference.bottleneck_adapter``."""
    if use_triton(x):
        from .adapter import fused_bottleneck_adapter  # imports triton only when used

        return fused_bottleneck_adapter(x, down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias, eps)
    return reference.bottleneck_adapter(x, down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias, eps)


def temperature_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    reduction: Reduction = "batchmean",
    scale_t2: bool = True,
    *,
    mask: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    inplace: bool = False,
) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)) over the rows of ``[..., V]`` logits, fp32 whatever the
    input dtypes; see ``reference.temperature_kl`` for rows and reductions. ``inplace`` lets the kernel
    write the gradient into ``student_logits`` (their values are gone after the call; the reference
    ignores it). The fused kernel treats the teacher as a constant target."""
    kwargs = dict(mask=mask, labels=labels, ignore_index=ignore_index)
    if use_triton(student_logits):
        from .kl import fused_temperature_kl  # imports triton only when used

        return fused_temperature_kl(
            student_logits, teacher_logits, temperature, reduction, scale_t2, inplace=inplace, **kwargs
        )
    return reference.temperature_kl(student_logits, teacher_logits, temperature, reduction, scale_t2, **kwargs)


class TemperatureKL(nn.Module):
    """The loss as a module: ``TemperatureKL(2.0)(student_logits, teacher_logits, mask=...)``, dispatching
    like :func:`temperature_kl` (CUDA tensors take the kernel, CPU tensors the reference)."""

    def __init__(
        self,
        temperature: float = 1.0,
        reduction: Reduction = "batchmean",
        scale_t2: bool = True,
        ignore_index: int = -100,
        inplace: bool = False,
    ):
        super().__init__()
        self.temperature, self.reduction, self.scale_t2 = temperature, reduction, scale_t2
        self.ignore_index, self.inplace = ignore_index, inplace

    def forward(self, student_logits, teacher_logits, mask=None, labels=None):
        return temperature_kl(
            student_logits, teacher_logits, self.temperature, self.reduction, self.scale_t2,
            mask=mask, labels=labels, ignore_index=self.ignore_index, inplace=self.inplace,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}, scale_t2={self.scale_t2}"


def attention_divergence(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    kind: AttentionKind = "kl",
    *,
    key_mask: Optional[torch.Tensor] = None,
    rows: Optional[torch.Tensor] = None,
    window: Optional[int] = None,
    scale_s: Optional[float] = None,
    scale_t: Optional[float] = None,
) -> torch.Tensor:
    """Per query row ``[B, H, T]`` (fp32), the divergence ``kind`` (kl, mse, score_mse) between the student's
    attention from its queries and keys ``[B, H, T, d_s]`` and the teacher's ``[B, H, T, d_t]``, without a T x T
    tensor: the Triton kernel (kernels/attention.py) on CUDA tensors, the blocked PyTorch path
    (kernels/attention_blocked.py) elsewhere; both bound the extra memory to O(B H T). See
    ``reference.attention_divergence`` for the arguments. The teacher is a constant (no gradient)."""
    kwargs = dict(key_mask=key_mask, rows=rows, window=window, scale_s=scale_s, scale_t=scale_t)
    if use_triton(q_s):
        from .attention import fused_attention_divergence  # imports triton only when used

        return fused_attention_divergence(q_s, k_s, q_t, k_t, kind, **kwargs)
    return blocked_attention_divergence(q_s, k_s, q_t, k_t, kind, **kwargs)
