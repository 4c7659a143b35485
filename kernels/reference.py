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

from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["batchmean", "sum", "mean", "none"]


def temperature_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    reduction: Reduction = "batchmean",
    scale_t2: bool = True,
) -> torch.Tensor:
    """T^2-scaled KL(softmax(t/T) || softmax(s/T)) over rows of ``[N, V]`` logits.

    ``batchmean`` divides by the number of rows N (0 rows give 0, not NaN); ``mean`` by N*V;
    ``none`` returns the per-row loss ``[N]``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"logit shapes differ: student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}"
        )
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    log_q = F.log_softmax(s, dim=-1)
    log_p = F.log_softmax(t, dim=-1)
    # xlogy-style guard: p = 0 entries (a -inf teacher logit) contribute 0, not 0 * -inf = NaN.
    p = log_p.exp()
    per_elem = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    per_row = per_elem.sum(-1)
    if scale_t2:
        per_row = per_row * (temperature * temperature)
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if reduction == "batchmean":
        return per_row.sum() / max(per_row.shape[0], 1)
    if reduction == "mean":
        return per_row.sum() / max(per_elem.numel(), 1)
    raise ValueError(f"unknown reduction {reduction!r}; expected batchmean, sum, mean or none")


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
