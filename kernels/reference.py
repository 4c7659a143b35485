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

Attention divergence, one value per query row i of one head (see kernels/attention.py for the math):
    s_ij = q_i . k_j * scale_s,   t_ij = q'_i . k'_j * scale_t,   j over the valid keys of row i
    kl:        KL(softmax_j t || softmax_j s)
    kl_floor:  the same with the published scripts' 1e-12 inside both logs (see KL_FLOOR)
    mse:       sum_j (softmax_j s - softmax_j t)^2
    score_mse: sum_j (s_ij - t_ij)^2
Here the T x T scores are materialised: this is the definition the kernel and the blocked CPU path are
tested against, and each block of the blocked path.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F

Reduction = Literal["batchmean", "sum", "mean", "none"]
REDUCTIONS = ("batchmean", "sum", "mean", "none")
AttentionKind = Literal["kl", "kl_floor", "mse", "score_mse"]
ATTENTION_KINDS = ("kl", "kl_floor", "mse", "score_mse")
# The published attention-KL scripts' floor inside both logs: sum_j pi_j (log(pi_j + 1e-12) - log(p_j + 1e-12)).
KL_FLOOR = 1e-12


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


def attention_args(q_s, k_s, q_t, k_t, kind, key_mask, rows, window, scale_s, scale_t) -> tuple[float, float]:
    """Check the arguments every attention-divergence implementation takes; return the two score scales
    (``d ** -0.5`` of each model's head dim unless given). Each error names the argument."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"unknown attention divergence {kind!r}; expected {', '.join(ATTENTION_KINDS)}")
    for name, x in (("q_s", q_s), ("k_s", k_s), ("q_t", q_t), ("k_t", k_t)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be [batch, heads, tokens, head_dim], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
        if x.device != q_s.device:
            raise ValueError(f"{name} is on {x.device}, q_s on {q_s.device}: put all four on one device")
    if q_s.shape != k_s.shape:
        raise ValueError(f"student queries {tuple(q_s.shape)} and keys {tuple(k_s.shape)} differ in shape")
    if q_t.shape != k_t.shape:
        raise ValueError(f"teacher queries {tuple(q_t.shape)} and keys {tuple(k_t.shape)} differ in shape")
    if q_s.shape[:3] != q_t.shape[:3]:
        raise ValueError(
            f"student [batch, heads, tokens] {tuple(q_s.shape[:3])} != teacher {tuple(q_t.shape[:3])}: "
            "the two maps must cover the same rows (head dims may differ)"
        )
    B, _, T, _ = q_s.shape
    for name, m in (("key_mask", key_mask), ("rows", rows)):
        if m is not None and (m.shape != (B, T) or m.dtype != torch.bool):
            raise ValueError(
                f"{name} must be a bool [batch, tokens] = [{B}, {T}] tensor, got {m.dtype} {tuple(m.shape)}"
            )
    if window is not None and window < 0:
        raise ValueError(f"window must be >= 0 keys either side (or None for all keys), got {window}")
    return (scale_s or q_s.shape[-1] ** -0.5), (scale_t or q_t.shape[-1] ** -0.5)


def valid_keys(key_mask, window, queries: range, keys: range, device) -> torch.Tensor:
    """Which keys each query row of ``queries`` sees among ``keys`` (absolute positions): ``[B or 1, 1, Q, K]``
    bool, from the padding mask (``[B, T]``, True = a real token) and a local window of ``window`` keys either
    side (``|i - j| <= window``, ModernBERT's local layers)."""
    i = torch.arange(queries.start, queries.stop, device=device)
    j = torch.arange(keys.start, keys.stop, device=device)
    valid = torch.ones(1, 1, len(i), len(j), dtype=torch.bool, device=device)
    if window is not None:
        valid = valid & ((i[:, None] - j[None, :]).abs() <= window)
    if key_mask is not None:
        valid = valid & key_mask[:, None, None, keys.start : keys.stop]
    return valid


def attention_rows(q_s, k_s, q_t, k_t, kind: str, valid: torch.Tensor, scale_s: float, scale_t: float) -> torch.Tensor:
    """The per-row divergence ``[B, H, Q]`` of query rows ``q_* [B, H, Q, d]`` against keys ``k_* [B, H, K, d]``,
    with the T x T (here Q x K) scores materialised, in float64 for float64 inputs and float32 otherwise. A row
    with no valid key gives 0."""
    dtype = torch.float64 if q_s.dtype == torch.float64 else torch.float32
    s = torch.matmul(q_s.to(dtype), k_s.to(dtype).transpose(-1, -2)) * scale_s
    t = torch.matmul(q_t.to(dtype), k_t.to(dtype).transpose(-1, -2)) * scale_t
    if kind == "score_mse":
        return torch.where(valid, (s - t).pow(2), 0).sum(-1)
    seen = valid.any(-1, keepdim=True)  # a row with no valid key: any finite scores, zeroed below
    log_p = torch.log_softmax(torch.where(valid, s, float("-inf")).masked_fill(~seen, 0), dim=-1)
    log_pi = torch.log_softmax(torch.where(valid, t, float("-inf")).masked_fill(~seen, 0), dim=-1)
    p, pi = log_p.exp(), log_pi.exp()
    if kind == "kl":  # xlogy-style: masked entries (pi = 0, both logs -inf) contribute 0, not NaN
        per = torch.where(valid, pi * (log_pi - log_p), 0)
    elif kind == "kl_floor":
        per = torch.where(valid, pi * (torch.log(pi + KL_FLOOR) - torch.log(p + KL_FLOOR)), 0)
    else:
        per = torch.where(valid, p - pi, 0).pow(2)
    return torch.where(seen[..., 0], per.sum(-1), 0)


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
    """Per query row, the divergence between the student's attention (``q_s``, ``k_s``: ``[B, H, T, d_s]``) and
    the teacher's (``q_t``, ``k_t``: ``[B, H, T, d_t]``): ``[B, H, T]``, fp32 (float64 for float64 inputs).

    ``key_mask`` ``[B, T]`` bool: the keys that exist (padding False); ``rows`` ``[B, T]`` bool: the query rows
    that count (others give 0); ``window``: keys within this many positions either side only; scales default to
    ``d ** -0.5``. The materialised definition: ``[B, H, T, T]`` per model."""
    scale_s, scale_t = attention_args(q_s, k_s, q_t, k_t, kind, key_mask, rows, window, scale_s, scale_t)
    T = q_s.shape[2]
    valid = valid_keys(key_mask, window, range(T), range(T), q_s.device)
    out = attention_rows(q_s, k_s, q_t, k_t, kind, valid, scale_s, scale_t)
    return out if rows is None else torch.where(rows[:, None, :], out, 0)
