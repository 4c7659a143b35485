"""Pure-PyTorch references for every fused kernel. Tests and benchmarks import these; so does the
engine wherever a Triton path does not apply (CPU tensors).

Softmax-temperature KL (see shared/reference/kernels.md):
    p = softmax(t / T), q = softmax(s / T)
    loss_r = T^2 * sum_v p_v (log p_v - log q_v)
    d loss_r / d s_v = T * (q_v - p_v)
Computed in fp32 whatever the input dtypes, so a bf16 student and an fp16 teacher give the same
answer as fp32 inputs up to the inputs' own rounding.

Bottleneck adapter (miniALBERT's, post-LN):
    y = LayerNorm(x + W_up GELU(W_down x + b_down) + b_up) * gamma + beta,   GELU the exact erf form
with x of width H and the bottleneck r = H / reduction_factor.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F

Reduction = Literal["batchmean", "sum", "mean", "none"]
REDUCTIONS = ("batchmean", "sum", "mean", "none")


def kl_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    reduction: str,
    mask: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Check the arguments every temperature-KL implementation takes and bring them to rows.

    Returns ``[N, V]`` views (copies only where a view is impossible) of both logits and the row
    selection as a bool ``[N]`` tensor, or None when every row counts. Each error names the argument.
    """
    s, t = student_logits, teacher_logits
    if s.shape != t.shape:
        raise ValueError(f"logit shapes differ: student {tuple(s.shape)}, teacher {tuple(t.shape)}")
    if s.dim() < 1 or s.shape[-1] == 0:
        raise ValueError(f"logits need a non-empty vocabulary dimension, got shape {tuple(s.shape)}")
    for name, x in (("student_logits", s), ("teacher_logits", t)):
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if s.device != t.device:
        raise ValueError(f"student_logits on {s.device}, teacher_logits on {t.device}: put both on one device")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected batchmean, sum, mean or none")
    if mask is not None and labels is not None:
        raise ValueError("give the rows either as mask or as labels (with ignore_index), not both")
    keep = mask if labels is None else labels != ignore_index
    if keep is not None:
        name = "mask" if labels is None else "labels"
        if keep.shape != s.shape[:-1]:
            raise ValueError(f"{name} has shape {tuple(keep.shape)}; the logits' rows are {tuple(s.shape[:-1])}")
        if keep.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = the row counts), got {keep.dtype}")
        keep = keep.reshape(-1).to(s.device)
    V = s.shape[-1]
    return s.reshape(-1, V), t.reshape(-1, V), keep


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
) -> torch.Tensor:
    """T^2-scaled KL(softmax(t/T) || softmax(s/T)) over the rows of ``[..., V]`` logits.

    Rows are selected by ``mask`` (bool over the leading dims, True = counts) or by ``labels`` (rows
    whose label is ``ignore_index`` are ignored); ignored rows give zero loss and zero gradient.
    ``batchmean`` divides the sum over rows by the number of selected rows, ``mean`` by that times V
    (no selected row gives 0, not NaN); ``none`` returns the per-row loss shaped like the leading dims.
    """
    s, t, keep = kl_rows(student_logits, teacher_logits, temperature, reduction, mask, labels, ignore_index)
    log_q = F.log_softmax(s.float() / temperature, dim=-1)
    log_p = F.log_softmax(t.float() / temperature, dim=-1)
    # xlogy-style guard: p = 0 entries (a -inf teacher logit) contribute 0, not 0 * -inf = NaN.
    p = log_p.exp()
    per_row = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
    if scale_t2:
        per_row = per_row * (temperature * temperature)
    if keep is not None:
        # where, not multiply: an ignored row's inf or NaN must not leak into the sum or the gradient.
        per_row = torch.where(keep, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row.reshape(student_logits.shape[:-1])
    total = per_row.sum()
    if reduction == "sum":
        return total
    # Divide on the device (no host sync); no selected row gives 0, not NaN.
    rows = keep.sum().clamp(min=1) if keep is not None else max(per_row.shape[0], 1)
    return total / rows if reduction == "batchmean" else total / (rows * s.shape[-1])


def bottleneck_adapter(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float = 1e-12,
) -> torch.Tensor:
    """``[..., H] -> [..., H]``: ``LN(x + Up(GELU(Down(x))))``; ``down_weight`` is ``[r, H]``, ``up_weight``
    ``[H, r]`` (``nn.Linear`` layout). Autograd gives every gradient."""
    h = F.linear(F.gelu(F.linear(x, down_weight, down_bias)), up_weight, up_bias)
    return F.layer_norm(x + h, (x.shape[-1],), norm_weight, norm_bias, eps)
