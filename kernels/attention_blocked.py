"""Attention divergence in blocks of query rows, in plain PyTorch: what CPUs (and any device without Triton)
run instead of the fused kernel in attention.py, with the same memory bound and the same algorithm.

The materialised definition (``reference.attention_rows``) holds ``[B, H, T, T]`` scores, probabilities and
their gradients for both models: at T = 4,096, four heads and a batch of two that is 512 MiB per tensor and
layer, and autograd keeps several per layer. Here the query rows are taken a block at a time, each block
against only the keys it can see (all of them, or its local window), and nothing of a block outlives it.
The forward keeps, per row, the loss and the statistics the kernel keeps (lse_s, lse_t, and c for mse and
kl_floor); the backward recomputes each block's s and t from them and forms dS by the formulas in
attention.py's docstring (no autograd graph of the block: the block's own temporaries only), then
dq = scale_s dS k and dk += scale_s dS^T q, accumulated in fp32.
Extra memory: a few ``[B, H, rows, keys]`` fp32 temporaries of one block, each within ``BLOCK_BYTES``, plus
``O(B H T d)`` for the gradients: linear in T.
"""

from __future__ import annotations

from typing import Optional

import torch

from .reference import KL_FLOOR, AttentionKind, attention_args, valid_keys

# One block's [B, H, rows, keys] fp32 tensor. Small enough that a block's temporaries stay in a CPU's L3 (the
# elementwise passes, not the matmuls, are most of the time): 4 MiB ran a 4,096-token pair 2.5x faster than 32.
BLOCK_BYTES = 4 * 2**20
_MASKED = -1e30  # finite: its exp() is 0, and t - s at a masked entry is 0, never -inf - -inf


def blocks(batch_heads: int, T: int, window: Optional[int], block_bytes: int = BLOCK_BYTES):
    """``(queries, keys)`` ranges covering every query row: as many rows a block as keep one fp32
    ``[B*H, rows, keys]`` tensor within ``block_bytes`` (at least one row), each with the keys it can see."""
    span = T if window is None else min(T, 2 * window + 1)
    rows = max(1, min(T, block_bytes // (4 * batch_heads * span)))
    for i0 in range(0, T, rows):
        i1 = min(T, i0 + rows)
        keys = range(0, T) if window is None else range(max(0, i0 - window), min(T, i1 + window))
        yield range(i0, i1), keys


def _accumulator(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32  # fp32 statistics for 16-bit inputs


def _scores(q, k, scale, invalid, acc):
    s = torch.matmul(q.to(acc) * scale, k.to(acc).transpose(-1, -2))
    return s.masked_fill_(invalid, _MASKED) if invalid is not None else s


def _softmax_(x):
    """``(p, lse)``: the softmax of ``x`` over its last dimension, computed in ``x``'s storage, and its
    log-sum-exp. A row with no valid key is uniform over masked keys here; callers zero such rows."""
    m = x.amax(-1, keepdim=True)
    p = x.sub_(m).exp_()
    total = p.sum(-1, keepdim=True)
    return p.div_(total), (m + total.log()).squeeze(-1)


def _block(q_s, k_s, q_t, k_t, kind, invalid, scale_s, scale_t, acc):
    """``(loss, lse_s, lse_t, c)`` of one block of rows, each ``[B, H, rows]`` (c None unless mse / kl_floor)."""
    s, t = _scores(q_s, k_s, scale_s, invalid, acc), _scores(q_t, k_t, scale_t, invalid, acc)
    if kind == "score_mse":
        d = s.sub_(t).pow_(2)
        return (d.masked_fill_(invalid, 0) if invalid is not None else d).sum(-1), None, None, None
    if kind == "kl":  # sum_j pi_j (t_j - s_j) - lse_t + lse_s; masked entries have pi = 0 and t - s = 0
        gap = t - s
        pi, lse_t = _softmax_(t)
        _, lse_s = _softmax_(s)
        return gap.mul_(pi).sum(-1) - lse_t + lse_s, lse_s, lse_t, None
    (p, lse_s), (pi, lse_t) = _softmax_(s), _softmax_(t)
    if kind == "mse":
        c = (p * (p - pi)).sum(-1)
        return p.sub_(pi).pow_(2).sum(-1), lse_s, lse_t, c
    # kl_floor: sum_j pi_j log((pi_j + f) / (p_j + f)); c = sum_j pi_j p_j / (p_j + f) = sum_j pi_j - f sum_j w_j
    shifted = p.add_(KL_FLOOR)
    c = pi.sum(-1) - KL_FLOOR * (pi / shifted).sum(-1)
    loss = (pi + KL_FLOOR).log_().mul_(pi).sum(-1) - shifted.log_().mul_(pi).sum(-1)
    return loss, lse_s, lse_t, c


def _dscores(q_s, k_s, q_t, k_t, kind, invalid, scale_s, scale_t, lse_s, lse_t, c, g, acc):
    """g_i dS_ij for one block, recomputed from the saved row statistics (attention.py's docstring has dS)."""
    s, t = _scores(q_s, k_s, scale_s, invalid, acc), _scores(q_t, k_t, scale_t, invalid, acc)
    if kind == "score_mse":
        ds = s.sub_(t).mul_(2)
        ds = ds.masked_fill_(invalid, 0) if invalid is not None else ds
    else:
        p, pi = s.sub_(lse_s[..., None]).exp_(), t.sub_(lse_t[..., None]).exp_()
        if kind == "kl":
            ds = p.sub_(pi)
        elif kind == "mse":
            ds = (p - pi).sub_(c[..., None]).mul_(p).mul_(2)
        else:  # kl_floor: p (c - pi / (p + f))
            ds = pi.div_(p + KL_FLOOR).neg_().add_(c[..., None]).mul_(p)
    return ds.mul_(g[..., None])


class BlockedAttentionDivergence(torch.autograd.Function):
    """``apply(q_s, k_s, q_t, k_t, key_mask, rows, kind, window, scale_s, scale_t, block_bytes) -> [B, H, T]``
    fp32 (float64 for float64 inputs); gradients for the student's queries and keys only (the teacher is a
    constant)."""

    @staticmethod
    def forward(ctx, q_s, k_s, q_t, k_t, key_mask, rows, kind, window, scale_s, scale_t, block_bytes):
        B, H, T, _ = q_s.shape
        acc = _accumulator(q_s)
        if key_mask is not None and bool(key_mask.all()):  # nothing padded: no mask to apply (a CPU read)
            key_mask = None
        out, lse_s, lse_t, c = (torch.zeros(B, H, T, dtype=acc, device=q_s.device) for _ in range(4))
        # the rows that count: selected, and seeing at least one key (a padded row in a window may see none)
        counted = torch.ones(B, 1, T, dtype=torch.bool, device=q_s.device) if rows is None else rows[:, None].clone()
        for queries, keys in blocks(B * H, T, window, block_bytes):
            q, k = slice(queries.start, queries.stop), slice(keys.start, keys.stop)
            invalid = _invalid(key_mask, window, queries, keys, q_s.device)
            stats = _block(q_s[:, :, q], k_s[:, :, k], q_t[:, :, q], k_t[:, :, k], kind, invalid, scale_s, scale_t, acc)
            for where, value in zip((out, lse_s, lse_t, c), stats):
                if value is not None:
                    where[:, :, q] = value
            if invalid is not None:
                counted[:, :, q] &= ~invalid.all(-1)
        ctx.save_for_backward(q_s, k_s, q_t, k_t, key_mask, counted, lse_s, lse_t, c)
        ctx.args = (kind, window, scale_s, scale_t, block_bytes)
        return out.masked_fill_(~counted, 0)

    @staticmethod
    def backward(ctx, grad):
        q_s, k_s, q_t, k_t, key_mask, counted, lse_s, lse_t, c = ctx.saved_tensors
        kind, window, scale_s, scale_t, block_bytes = ctx.args
        B, H, T, _ = q_s.shape
        acc = _accumulator(q_s)
        grad = grad.to(acc).masked_fill(~counted, 0)  # a row that does not count has no gradient
        dq = torch.zeros(q_s.shape, dtype=acc, device=q_s.device)
        dk = torch.zeros(k_s.shape, dtype=acc, device=k_s.device)
        for queries, keys in blocks(B * H, T, window, block_bytes):
            q, k = slice(queries.start, queries.stop), slice(keys.start, keys.stop)
            invalid = _invalid(key_mask, window, queries, keys, q_s.device)
            qb, kb = q_s[:, :, q].to(acc), k_s[:, :, k].to(acc)
            ds = _dscores(qb, kb, q_t[:, :, q], k_t[:, :, k], kind, invalid, scale_s, scale_t,
                          lse_s[:, :, q], lse_t[:, :, q], c[:, :, q], grad[:, :, q], acc)  # fmt: skip
            dq[:, :, q] += torch.matmul(ds, kb).mul_(scale_s)
            dk[:, :, k] += torch.matmul(ds.transpose(-1, -2), qb).mul_(scale_s)
        return dq.to(q_s.dtype), dk.to(k_s.dtype), *([None] * 9)


def _invalid(key_mask, window, queries: range, keys: range, device) -> Optional[torch.Tensor]:
    """The keys each row of a block may not see (``[B or 1, 1, rows, keys]`` bool), or None when it sees all."""
    if key_mask is None and window is None:
        return None
    return ~valid_keys(key_mask, window, queries, keys, device)


def blocked_attention_divergence(
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
    block_bytes: int = BLOCK_BYTES,
) -> torch.Tensor:
    """The blocked path of :func:`biodistill.kernels.ops.attention_divergence` (same arguments and result)."""
    scale_s, scale_t = attention_args(q_s, k_s, q_t, k_t, kind, key_mask, rows, window, scale_s, scale_t)
    q_t, k_t = q_t.detach(), k_t.detach()
    return BlockedAttentionDivergence.apply(
        q_s, k_s, q_t, k_t, key_mask, rows, kind, window, scale_s, scale_t, block_bytes
    )
