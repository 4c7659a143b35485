"""Attention-map distillation without the maps: per-row attention KL (exact, or with the published scripts' floor),
probability MSE and score MSE between a student's and a teacher's attention, tile by tile, never forming a T x T
tensor. Forward and backward in Triton.

One layer pair, one head, query row i; valid keys j (padding and a local window masked):
    s_ij = q_i . k_j * scale_s          (student, head dim d_s)
    t_ij = q'_i . k'_j * scale_t        (teacher, head dim d_t: the two may differ)
    p_i = softmax_j(s_i.),  pi_i = softmax_j(t_i.)
    kl:        KL_i(pi || p) = sum_j pi_ij (t_ij - s_ij) - lse_t(i) + lse_s(i)
    kl_floor:  F_i = sum_j pi_ij (log(pi_ij + f) - log(p_ij + f)),  f = 1e-12     (CompactBioBERT's attention KL)
    mse:       M_i = sum_j (p_ij - pi_ij)^2
    score_mse: S_i = sum_j (s_ij - t_ij)^2                       (TinyBERT's pre-softmax MSE)
Online over key tiles (flash attention's recurrence, for two distributions at once): running maxima m_s, m_t,
sums l_s = sum_j e^(s - m_s), l_t = sum_j e^(t - m_t) and A = sum_j e^(t - m_t) (t - s), each rescaled when its
maximum moves; then KL_i = A / l_t + (m_s - m_t) + (log l_s - log l_t), grouped so that equal distributions
cancel at the scale of t - s rather than of the log-sums. kl_floor and MSE need both normalisers first, so they
take a second pass over the key tiles; score MSE needs no softmax and takes one.

Gradients (the teacher is a constant), with g_i the upstream weight of row i and dS_ij = d loss_i / d s_ij:
    kl:        dS_ij = p_ij - pi_ij
    kl_floor:  dS_ij = p_ij (c_i - w_ij),   w_ij = pi_ij / (p_ij + f),  c_i = sum_k w_ik p_ik   (saved by the forward)
    mse:       dS_ij = 2 p_ij ((p_ij - pi_ij) - c_i),   c_i = sum_k p_ik (p_ik - pi_ik)   (saved by the forward)
    score_mse: dS_ij = 2 (s_ij - t_ij)
    dq_i = scale_s sum_j g_i dS_ij k_j,    dk_j = scale_s sum_i g_i dS_ij q_i
The forward saves lse_s(i), lse_t(i) (and c_i): O(B H T). The backward recomputes each tile's s and t from
them, as flash attention's does: one kernel walks the key tiles of a query block for dq, one walks the
query tiles of a key block for dk (no atomics, each output written once).

Statistics are fp32 whatever the inputs (bf16/fp16/fp32; the two models may differ); the QK^T products
accumulate in fp32 on tensor cores (fp32 inputs in TF32: tile_config says why). dS is rounded once into the
student's dtype for the gradient matmuls, as flash attention rounds its dP.

Byte model, per (batch, head), T tokens: the forward reads each query tile once and every key tile once per
query block, 2 x T^2 / BLOCK_M x (d_s + d_t) x 2 bytes of L2-resident K traffic at 16 bits, and writes 12 B a
row (loss, lse_s, lse_t); FLOPs are 2 T^2 (d_s + d_t) per pass (x2 for kl_floor and mse), and the backward
recomputes both products and adds two more (4 T^2 (d_s + d_t) + 4 T^2 d_s). Against that, the materialised
path writes and re-reads [T, T] scores, probabilities and logs per model in fp32: at T = 4,096 that is 64 MiB
a tensor per head and layer. Extra memory here: O(B H T) (three or four floats a row), none quadratic. With a
local window (ModernBERT's sliding layers) only the key tiles within the window are visited.
Rows outside ``rows`` give 0 and no gradient; a tile of query rows none of which counts visits no key.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .reference import KL_FLOOR, AttentionKind, attention_args

KINDS = {"kl": 0, "mse": 1, "score_mse": 2, "kl_floor": 3}


@triton.jit
def _shift(m):
    # A running maximum still -inf (no valid key yet) shifts by 0: keeps exp(-inf - -inf) = NaN out of the sums.
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _valid(offs_m, offs_n, KM, T, window, HAS_KMASK: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """[BLOCK_M, BLOCK_N]: the key exists (inside T, not padding) and lies in row i's window."""
    valid = (offs_m[:, None] >= 0) & (offs_n < T)[None, :]
    if HAS_KMASK:
        valid = valid & (tl.load(KM + offs_n, mask=offs_n < T, other=0) != 0)[None, :]
    if HAS_WINDOW:
        gap = offs_m[:, None] - offs_n[None, :]
        valid = valid & (gap <= window) & (gap >= -window)
    return valid


@triton.jit
def _tile(Q, offs, stride_t, stride_d, T, D, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """Rows ``offs`` of a [T, D] matrix as a [len(offs), BLOCK_D] tile, zero beyond T and D. ``UPCAST`` (the
    interpreter only) makes it fp32: Triton 3.9's interpreter multiplies bf16 dot operands as raw bits."""
    d = tl.arange(0, BLOCK_D)
    x = tl.load(Q + offs[:, None] * stride_t + d[None, :] * stride_d, mask=(offs < T)[:, None] & (d < D)[None, :],
                other=0.0)  # fmt: skip
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _key_range(start_m, T, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """The key tiles a query block [start_m, start_m + BLOCK_M) can see: all, or those its window reaches."""
    lo = 0
    hi = T
    if HAS_WINDOW:
        lo = tl.maximum(start_m - window, 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(start_m + BLOCK_M + window, T)
    return lo, hi


@triton.jit
def _head(QS, KS, QT, KT, KM, ROWS, qs_b, qs_h, ks_b, ks_h, qt_b, qt_h, kt_b, kt_h, H, T):
    """This program's (batch, head) index ``bh`` and its pointers: the four inputs at its head, and its
    sequence's key mask and row selection."""
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    return (bh, QS + b * qs_b + h * qs_h, KS + b * ks_b + h * ks_h, QT + b * qt_b + h * qt_h, KT + b * kt_b + h * kt_h,
            KM + b * T, ROWS + b * T)  # fmt: skip


@triton.jit
def _live(ROWS, offs_m, T, HAS_ROWS: tl.constexpr):
    """Which of the rows ``offs_m`` count: inside T and selected."""
    live = offs_m < T
    if HAS_ROWS:
        live = live & (tl.load(ROWS + offs_m, mask=offs_m < T, other=0) != 0)
    return live


@triton.jit
def _row_stats(G, LSE_S, LSE_T, CROW, bh, offs_m, T, live, KIND: tl.constexpr):
    """What the backward reads of rows ``offs_m``: the upstream gradient (0 where a row does not count) and the
    forward's statistics (c only for the kinds that keep it)."""
    at = bh * T + offs_m
    g = tl.where(live, tl.load(G + at, mask=offs_m < T, other=0.0), 0.0)
    lse_s = tl.load(LSE_S + at, mask=offs_m < T, other=0.0)
    lse_t = tl.load(LSE_T + at, mask=offs_m < T, other=0.0)
    c = lse_s
    if KIND == 1 or KIND == 3:
        c = tl.load(CROW + at, mask=offs_m < T, other=0.0)
    return g, lse_s, lse_t, c


@triton.jit
def _attn_fwd(QS, KS, QT, KT, KM, ROWS, OUT, LSE_S, LSE_T, CROW,
              qs_b, qs_h, qs_t, qs_d, ks_b, ks_h, ks_t, ks_d, qt_b, qt_h, qt_t, qt_d, kt_b, kt_h, kt_t, kt_d,
              H, T, D_S, D_T, scale_s, scale_t, window, floor,
              KIND: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_WINDOW: tl.constexpr,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr):  # fmt: skip
    start_m = tl.program_id(0) * BLOCK_M
    bh, QS, KS, QT, KT, KM, ROWS = _head(QS, KS, QT, KT, KM, ROWS, qs_b, qs_h, ks_b, ks_h, qt_b, qt_h, kt_b, kt_h, H, T)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    live = _live(ROWS, offs_m, T, HAS_ROWS)
    q_s = _tile(QS, offs_m, qs_t, qs_d, T, D_S, BLOCK_DS, UPCAST)
    q_t = _tile(QT, offs_m, qt_t, qt_d, T, D_T, BLOCK_DT, UPCAST)
    lo, hi = _key_range(start_m, T, window, BLOCK_M, BLOCK_N, HAS_WINDOW)
    hi = tl.where(tl.max(live.to(tl.int32), 0) > 0, hi, lo)  # no row of this block counts: visit no key
    m_s = tl.full([BLOCK_M], float("-inf"), tl.float32)
    m_t = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M], tl.float32)  # kl: A; score_mse: the sum of squares
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        valid = _valid(offs_m, offs_n, KM, T, window, HAS_KMASK, HAS_WINDOW)
        s = tl.dot(q_s, tl.trans(_tile(KS, offs_n, ks_t, ks_d, T, D_S, BLOCK_DS, UPCAST)), input_precision=PRECISION)
        t = tl.dot(q_t, tl.trans(_tile(KT, offs_n, kt_t, kt_d, T, D_T, BLOCK_DT, UPCAST)), input_precision=PRECISION)
        s = s * scale_s
        t = t * scale_t
        if KIND == 2:
            acc += tl.sum(tl.where(valid, (s - t) * (s - t), 0.0), 1)
        else:
            s = tl.where(valid, s, float("-inf"))
            t = tl.where(valid, t, float("-inf"))
            new_s = _shift(tl.maximum(m_s, tl.max(s, 1)))
            new_t = _shift(tl.maximum(m_t, tl.max(t, 1)))
            e_t = tl.exp(t - new_t[:, None])
            alpha_t = tl.exp(m_t - new_t)
            l_s = l_s * tl.exp(m_s - new_s) + tl.sum(tl.exp(s - new_s[:, None]), 1)
            l_t = l_t * alpha_t + tl.sum(e_t, 1)
            if KIND == 0:  # e^(t - m_t)(t - s) where the key is valid (elsewhere t - s is -inf - -inf)
                acc = acc * alpha_t + tl.sum(tl.where(e_t > 0, e_t * (t - s), 0.0), 1)
            m_s = new_s
            m_t = new_t
    loss = acc
    if KIND != 2:
        seen = l_t > 0  # a row with at least one valid key
        log_l_s = tl.log(tl.where(seen, l_s, 1.0))
        log_l_t = tl.log(tl.where(seen, l_t, 1.0))
        lse_s = tl.where(seen, m_s + log_l_s, 0.0)
        lse_t = tl.where(seen, m_t + log_l_t, 0.0)
        tl.store(LSE_S + bh * T + offs_m, lse_s, mask=offs_m < T)
        tl.store(LSE_T + bh * T + offs_m, lse_t, mask=offs_m < T)
        if KIND == 0:
            loss = tl.where(seen, acc / tl.where(seen, l_t, 1.0) + (m_s - m_t) + (log_l_s - log_l_t), 0.0)
        else:  # mse, kl_floor: a second pass, with both normalisers known
            c = tl.zeros([BLOCK_M], tl.float32)
            for start_n in range(lo, hi, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                valid = _valid(offs_m, offs_n, KM, T, window, HAS_KMASK, HAS_WINDOW)
                s = tl.dot(
                    q_s, tl.trans(_tile(KS, offs_n, ks_t, ks_d, T, D_S, BLOCK_DS, UPCAST)), input_precision=PRECISION
                )
                t = tl.dot(
                    q_t, tl.trans(_tile(KT, offs_n, kt_t, kt_d, T, D_T, BLOCK_DT, UPCAST)), input_precision=PRECISION
                )
                p = tl.where(valid, tl.exp(s * scale_s - lse_s[:, None]), 0.0)
                pi = tl.where(valid, tl.exp(t * scale_t - lse_t[:, None]), 0.0)
                if KIND == 1:
                    acc += tl.sum((p - pi) * (p - pi), 1)
                    c += tl.sum(p * (p - pi), 1)
                else:  # masked entries have pi = p = 0: they add 0 to both sums
                    w = pi / (p + floor)  # one division for both sums: fewer live values (sm_80 spilled)
                    acc += tl.sum(pi * tl.log((pi + floor) / (p + floor)), 1)
                    c += tl.sum(w * p, 1)
            loss = acc
            tl.store(CROW + bh * T + offs_m, c, mask=offs_m < T)
    tl.store(OUT + bh * T + offs_m, tl.where(live, loss, 0.0), mask=offs_m < T)


@triton.jit
def _dscores(q_s, q_t, k_s, k_t, valid, lse_s, lse_t, c, g, scale_s, scale_t, floor,
             KIND: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """g_i dS_ij for one [BLOCK_M, BLOCK_N] tile, recomputed from the queries, keys and saved row statistics."""
    s = tl.dot(q_s, tl.trans(k_s), input_precision=PRECISION) * scale_s
    t = tl.dot(q_t, tl.trans(k_t), input_precision=PRECISION) * scale_t
    if KIND == 2:
        ds = tl.where(valid, 2.0 * (s - t), 0.0)
    else:
        p = tl.where(valid, tl.exp(s - lse_s[:, None]), 0.0)
        pi = tl.where(valid, tl.exp(t - lse_t[:, None]), 0.0)
        if KIND == 0:
            ds = p - pi
        elif KIND == 1:
            ds = 2.0 * p * ((p - pi) - c[:, None])
        else:
            ds = p * (c[:, None] - pi / (p + floor))
    return ds * g[:, None]


@triton.jit
def _attn_bwd_dq(QS, KS, QT, KT, KM, ROWS, G, LSE_S, LSE_T, CROW, DQ,
                 qs_b, qs_h, qs_t, qs_d, ks_b, ks_h, ks_t, ks_d, qt_b, qt_h, qt_t, qt_d, kt_b, kt_h, kt_t, kt_d,
                 H, T, D_S, D_T, scale_s, scale_t, window, floor,
                 KIND: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr):  # fmt: skip
    start_m = tl.program_id(0) * BLOCK_M
    bh, QS, KS, QT, KT, KM, ROWS = _head(QS, KS, QT, KT, KM, ROWS, qs_b, qs_h, ks_b, ks_h, qt_b, qt_h, kt_b, kt_h, H, T)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    live = _live(ROWS, offs_m, T, HAS_ROWS)
    g, lse_s, lse_t, c = _row_stats(G, LSE_S, LSE_T, CROW, bh, offs_m, T, live, KIND)
    q_s = _tile(QS, offs_m, qs_t, qs_d, T, D_S, BLOCK_DS, UPCAST)
    q_t = _tile(QT, offs_m, qt_t, qt_d, T, D_T, BLOCK_DT, UPCAST)
    dq = tl.zeros([BLOCK_M, BLOCK_DS], tl.float32)
    lo, hi = _key_range(start_m, T, window, BLOCK_M, BLOCK_N, HAS_WINDOW)
    hi = tl.where(tl.max(live.to(tl.int32), 0) > 0, hi, lo)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        valid = _valid(offs_m, offs_n, KM, T, window, HAS_KMASK, HAS_WINDOW)
        k_s = _tile(KS, offs_n, ks_t, ks_d, T, D_S, BLOCK_DS, UPCAST)
        k_t = _tile(KT, offs_n, kt_t, kt_d, T, D_T, BLOCK_DT, UPCAST)
        ds = _dscores(q_s, q_t, k_s, k_t, valid, lse_s, lse_t, c, g, scale_s, scale_t, floor, KIND, PRECISION)
        dq = tl.dot(ds.to(k_s.dtype), k_s, dq, input_precision=PRECISION)
    d = tl.arange(0, BLOCK_DS)
    DQ += bh * T * D_S
    tl.store(DQ + offs_m[:, None] * D_S + d[None, :], dq * scale_s, mask=(offs_m < T)[:, None] & (d < D_S)[None, :])


@triton.jit
def _attn_bwd_dk(QS, KS, QT, KT, KM, ROWS, G, LSE_S, LSE_T, CROW, DK,
                 qs_b, qs_h, qs_t, qs_d, ks_b, ks_h, ks_t, ks_d, qt_b, qt_h, qt_t, qt_d, kt_b, kt_h, kt_t, kt_d,
                 H, T, D_S, D_T, scale_s, scale_t, window, floor,
                 KIND: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr):  # fmt: skip
    start_n = tl.program_id(0) * BLOCK_N
    bh, QS, KS, QT, KT, KM, ROWS = _head(QS, KS, QT, KT, KM, ROWS, qs_b, qs_h, ks_b, ks_h, qt_b, qt_h, kt_b, kt_h, H, T)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_s = _tile(KS, offs_n, ks_t, ks_d, T, D_S, BLOCK_DS, UPCAST)
    k_t = _tile(KT, offs_n, kt_t, kt_d, T, D_T, BLOCK_DT, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
    # the query tiles whose window reaches this key block (the key range of a query block, mirrored)
    lo = 0
    hi = T
    if HAS_WINDOW:
        lo = tl.maximum(start_n - window, 0) // BLOCK_M * BLOCK_M
        hi = tl.minimum(start_n + BLOCK_N + window, T)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        live = _live(ROWS, offs_m, T, HAS_ROWS)
        g, lse_s, lse_t, c = _row_stats(G, LSE_S, LSE_T, CROW, bh, offs_m, T, live, KIND)
        q_s = _tile(QS, offs_m, qs_t, qs_d, T, D_S, BLOCK_DS, UPCAST)
        q_t = _tile(QT, offs_m, qt_t, qt_d, T, D_T, BLOCK_DT, UPCAST)
        valid = _valid(offs_m, offs_n, KM, T, window, HAS_KMASK, HAS_WINDOW)
        ds = _dscores(q_s, q_t, k_s, k_t, valid, lse_s, lse_t, c, g, scale_s, scale_t, floor, KIND, PRECISION)
        dk = tl.dot(tl.trans(ds.to(q_s.dtype)), q_s, dk, input_precision=PRECISION)
    d = tl.arange(0, BLOCK_DS)
    DK += bh * T * D_S
    tl.store(DK + offs_n[:, None] * D_S + d[None, :], dk * scale_s, mask=(offs_n < T)[:, None] & (d < D_S)[None, :])


# (BLOCK_M query rows, BLOCK_N keys, warps) for each launch, by input precision and the widest head tile. Found by
# compiling every kind and window variant for sm_80 and sm_90 and keeping the largest tiles with no spill at any;
# the three launches differ, since each holds different tiles across its loop (see tile_config).
_TILES = {
    ("16-bit", 64): {"fwd": (64, 32, 4), "dq": (32, 32, 4), "dk": (64, 32, 8)},
    ("16-bit", 128): {"fwd": (32, 64, 8), "dq": (32, 64, 8), "dk": (32, 64, 8)},
    ("fp32", 64): {"fwd": (32, 16, 8), "dq": (32, 16, 4), "dk": (32, 16, 8)},
    ("fp32", 128): {"fwd": (32, 16, 8), "dq": (32, 16, 4), "dk": (16, 32, 8)},
}


def tile_config(kernel: str, d_s: int, d_t: int, fp32: bool) -> dict:
    """Tile sizes and warps of launch ``kernel`` ("fwd", "dq", "dk") for head dims ``d_s``, ``d_t``.

    A program holds both models' query tiles (fwd, dq) or key tiles (dk) for its whole loop, the other side's
    tiles per iteration, and in backward an fp32 [tile, d] accumulator: two models' worth of what one flash
    attention kernel holds, so tiles are smaller than flash attention's. ``python -m biodistill.kernels.inspect
    --only attention`` compiles every kind, window and head dim (26 to 128) for sm_80 and sm_90: no spill. fp32
    inputs multiply in TF32 (IEEE fp32 and TF32x3 dots hold each operand twice over and spill at any useful
    tile); the statistics stay fp32, and scores carry TF32's ~1e-3 relative error, as any fp32 GPU matmul with
    TF32 enabled does. The engine trains in bf16 on GPUs (train.precision auto)."""
    block_ds, block_dt = (max(16, triton.next_power_of_2(d)) for d in (d_s, d_t))
    widest = 64 if max(block_ds, block_dt) <= 64 else 128
    block_m, block_n, warps = _TILES["fp32" if fp32 else "16-bit", widest][kernel]
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_DS": block_ds, "BLOCK_DT": block_dt, "num_warps": warps}


def _interpreted_bf16(*xs) -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" and any(x.dtype == torch.bfloat16 for x in xs)


def launch(kernel: str, q_s, k_s, q_t, k_t, key_mask, rows, out, lse_s, lse_t, crow, kind, window, scale_s, scale_t,
           grad=None):  # fmt: skip
    """``(grid, args, options)`` of one of this module's launches ("fwd", "dq", "dk") for these tensors. The
    autograd function launches them; ``kernels.inspect`` compiles the same launches for sm_80 / sm_90."""
    B, H, T, d_s = q_s.shape
    d_t = q_t.shape[-1]
    upcast = _interpreted_bf16(q_s, q_t)
    # The interpreter multiplies in numpy (exact fp32); on a GPU fp32 tiles take TF32 (tile_config says why) and
    # 16-bit tiles ignore the setting (tensor cores, fp32 accumulation).
    precision = "ieee" if os.environ.get("TRITON_INTERPRET") == "1" else "tf32"
    config = tile_config(kernel, d_s, d_t, fp32=torch.float32 in (q_s.dtype, q_t.dtype))
    placeholder = lse_s
    head = (key_mask if key_mask is not None else placeholder, rows if rows is not None else placeholder)
    strides = (*q_s.stride(), *k_s.stride(), *q_t.stride(), *k_t.stride())
    sizes = (H, T, d_s, d_t, scale_s, scale_t, window if window is not None else 0, KL_FLOOR)
    options = dict(
        KIND=KINDS[kind], HAS_KMASK=key_mask is not None, HAS_ROWS=rows is not None, HAS_WINDOW=window is not None,
        PRECISION=precision, UPCAST=upcast, **config,
    )  # fmt: skip
    if kernel == "fwd":
        args = (q_s, k_s, q_t, k_t, *head, out, lse_s, lse_t, crow, *strides, *sizes)
        return (triton.cdiv(T, config["BLOCK_M"]), B * H), args, options
    args = (q_s, k_s, q_t, k_t, *head, grad, lse_s, lse_t, crow, out, *strides, *sizes)
    block = config["BLOCK_M"] if kernel == "dq" else config["BLOCK_N"]
    return (triton.cdiv(T, block), B * H), args, options


_KERNELS = {"fwd": _attn_fwd, "dq": _attn_bwd_dq, "dk": _attn_bwd_dk}


class AttentionDivergenceFunction(torch.autograd.Function):
    """``apply(q_s, k_s, q_t, k_t, key_mask, rows, kind, window, scale_s, scale_t) -> [B, H, T]`` fp32; gradients
    for the student's queries and keys (the teacher's are constants)."""

    @staticmethod
    def forward(ctx, q_s, k_s, q_t, k_t, key_mask, rows, kind, window, scale_s, scale_t):
        B, H, T, _ = q_s.shape
        rows_f32 = dict(dtype=torch.float32, device=q_s.device)
        out, lse_s, lse_t = (torch.empty(B, H, T, **rows_f32) for _ in range(3))
        crow = torch.empty(B, H, T, **rows_f32) if kind in ("mse", "kl_floor") else lse_s
        if B * H * T:
            grid, args, options = launch(
                "fwd", q_s, k_s, q_t, k_t, key_mask, rows, out, lse_s, lse_t, crow, kind, window, scale_s, scale_t
            )
            _attn_fwd[grid](*args, **options)
        ctx.save_for_backward(q_s, k_s, q_t, k_t, key_mask, rows, lse_s, lse_t, crow)
        ctx.args = (kind, window, scale_s, scale_t)
        return out

    @staticmethod
    def backward(ctx, grad):
        q_s, k_s, q_t, k_t, key_mask, rows, lse_s, lse_t, crow = ctx.saved_tensors
        kind, window, scale_s, scale_t = ctx.args
        grad = grad.float().contiguous()
        outs = []
        for kernel, x, needed in (("dq", q_s, ctx.needs_input_grad[0]), ("dk", k_s, ctx.needs_input_grad[1])):
            if not needed:
                outs.append(None)
                continue
            d = torch.empty(x.shape, dtype=torch.float32, device=x.device)
            if d.numel():
                grid, args, options = launch(
                    kernel, q_s, k_s, q_t, k_t, key_mask, rows, d, lse_s, lse_t, crow, kind, window, scale_s,
                    scale_t, grad,
                )  # fmt: skip
                _KERNELS[kernel][grid](*args, **options)
            outs.append(d.to(x.dtype))
        return (*outs, *([None] * 8))


def fused_attention_divergence(
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
    """The Triton path of :func:`biodistill.kernels.ops.attention_divergence` (same arguments and result), for
    any device Triton runs on (CUDA; CPU under ``TRITON_INTERPRET=1``)."""
    scale_s, scale_t = attention_args(q_s, k_s, q_t, k_t, kind, key_mask, rows, window, scale_s, scale_t)
    if q_s.dtype == torch.float64 or q_t.dtype == torch.float64:
        raise TypeError(
            "the fused attention kernel takes fp32, fp16 or bf16 inputs (the float64 path is the reference)"
        )
    key_mask, rows = (m.contiguous() if m is not None else None for m in (key_mask, rows))  # read as [B, T] rows
    return AttentionDivergenceFunction.apply(
        q_s, k_s, q_t.detach(), k_t.detach(), key_mask, rows, kind, window, float(scale_s), float(scale_t)
    )
