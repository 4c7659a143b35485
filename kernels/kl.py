"""Fused softmax-temperature KL distillation loss in Triton: loss and student gradient in one kernel.

Per row r of student logits s and teacher logits t (both scaled by 1/T), p = softmax(t), q = softmax(s):
    loss_r = c * KL(p || q) = c * (sum_v p_v (t_v - s_v) + lse(s) - lse(t)),   c = T^2 (or 1)
    d loss_r / d s_v = (c / T) * (q_v - p_v)
Eager PyTorch materialises several N x V fp32 temporaries (two log-softmaxes, their difference, the
product); this kernel reads s and t once and writes only the gradient and one float per row.

One program owns one row and keeps fp32 running statistics whatever the input dtypes (fp16 teacher,
bf16 student, ...):
  - a row of at most ON_CHIP_MAX = 16,384 entries is loaded once and the loss and the gradient come
    out of registers: 4V bytes read, 2V written (16-bit inputs), the traffic floor;
  - a longer row (every BERT vocabulary, 28,996-30,522, and 50k, 128k, 256k) is streamed in
    CHUNK-wide blocks with online softmax for both distributions (running maxima and sums, rescaled as
    a maximum moves). The gradient needs the final normalisers, so a second pass re-reads the row,
    last block first, and that re-read is meant to come from L2, not HBM.
Why not keep a 30k row on chip: a 32,768-wide block over 32 warps holds s, t and their exponentials
in fp32, 128 values a thread against the 64 registers a thread a 1,024-thread CTA may have, so it spills
to local memory (392-688 B a thread measured on sm_90: ``python -m biodistill.kernels.inspect``), and
spilled registers travel through L1/L2/HBM, which is exactly the traffic the one pass meant to avoid.
Staging the row in shared memory in its input dtype (4V = 122 KB at 30,522, one CTA per SM on Hopper's
227 KB or an A100's 163 KB) would also work, but Triton exposes no indexable shared buffer for it, and
L2 does the same job below.
The byte model of the streamed path at CHUNK = 8,192 over 16 warps: 86-94 registers a thread, no spill
(sm_80 and sm_90), so one 512-thread CTA per SM holds one row at a time: 132 rows in flight on an
H100/H200 (108 on an A100), 132 x 4V = 16 MB at V = 30,522, a third of the 50 MB L2 (40 MB on an
A100). Pass one loads with evict_last, pass two reads the same lines back (newest first) with
evict_first and the gradient stores stream out with evict_first, so the second read hits L2 and HBM
sees 4V read + 2V written: the 6V floor. Each thread keeps 2 x 16 16-bit loads in flight per block,
32 KB a SM, above the ~25 KB Little's law asks at 4.3 TB/s. At 128k / 256k vocabularies the rows in
flight (67 / 135 MB) exceed L2 and the second pass is partly served by HBM: up to 10V there.
The loss uses sum_v e^(t_v - m_t) (t_v - s_v) accumulated online, never log p - log q of two large
numbers, and q - p is formed in fp32 and rounded once into the student's dtype.

The gradient is computed in the forward pass (when the student requires grad), already multiplied by
the reduction's 1/rows; the row count is read on the device, so nothing syncs with the host. Backward
only multiplies by grad_output, with a kernel whose loads and stores are masked off when grad_output
is exactly 1 (the common ``loss.backward()``), so it moves no memory then. Ignored rows (mask /
ignore_index) issue no loads at all and write zero loss and zero gradient. Memory beyond the inputs
and the gradient: the [N] per-row loss and the [N] row selection.

``inplace=True`` writes the gradient into the student-logits buffer (saving one N x V allocation):
its values are gone after the call, and autograd is told (the version counter moves), so any other
use of those logits that saved them for backward fails loudly instead of reading the gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .reference import Reduction, kl_rows

ON_CHIP_MAX = 16384  # widest row kept in registers; 32,768 spills (see the module docstring)
CHUNK, CHUNK_WARPS = 8192, 16  # a streamed row's block width and warps: one CTA per SM (module docstring)
SCALE_BLOCK, SCALE_WARPS = 8192, 16  # backward's grad_output multiply


@triton.jit
def _shift(m):
    # A running maximum that is still -inf (a block of padded vocabulary) shifts by 0 instead: keeps
    # exp(-inf - -inf) = NaN out of the sums.
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _contribution(et, t, s):
    # e^(t - m_t) (t - s) with the p = 0 entries (teacher -inf, where t - s may be NaN) contributing 0.
    return tl.where(et > 0, et * (t - s), 0.0)


@triton.jit
def _kl_fwd(S, T, LOSS, G, KEEP, ROWS, s_row, s_col, t_row, t_col, g_row, g_col, V, inv_temp, loss_coef,
            grad_coef, HAS_KEEP: tl.constexpr, ROWS_ON_DEVICE: tl.constexpr, WRITE_GRAD: tl.constexpr,
            ONE_PASS: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    keep = True
    if HAS_KEEP:
        keep = tl.load(KEEP + row) != 0
    n_live = tl.where(keep, V, 0)  # columns to load: none for an ignored row
    S += row * s_row
    T += row * t_row
    G += row * g_row
    offs = tl.arange(0, BLOCK_V)
    if ONE_PASS:
        live = offs < n_live
        s = tl.load(S + offs * s_col, mask=live, other=float("-inf")).to(tl.float32) * inv_temp
        t = tl.load(T + offs * t_col, mask=live, other=float("-inf")).to(tl.float32) * inv_temp
        m_s = _shift(tl.max(s, 0))
        m_t = _shift(tl.max(t, 0))
        e_s = tl.exp(s - m_s)
        e_t = tl.exp(t - m_t)
        z_s = tl.sum(e_s, 0)
        z_t = tl.sum(e_t, 0)
        a = tl.sum(_contribution(e_t, t, s), 0)
    else:
        m_s = float("-inf")
        m_t = float("-inf")
        z_s = 0.0
        z_t = 0.0
        a = 0.0
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            live = cols < n_live
            # evict_last: these lines are read again by the gradient pass; keep them in L2 until then.
            s = tl.load(S + cols * s_col, mask=live, other=float("-inf"), eviction_policy="evict_last")
            t = tl.load(T + cols * t_col, mask=live, other=float("-inf"), eviction_policy="evict_last")
            s = s.to(tl.float32) * inv_temp
            t = t.to(tl.float32) * inv_temp
            new_s = tl.maximum(m_s, tl.max(s, 0))
            new_t = tl.maximum(m_t, tl.max(t, 0))
            e_t = tl.exp(t - _shift(new_t))
            alpha_t = tl.exp(m_t - _shift(new_t))
            z_s = z_s * tl.exp(m_s - _shift(new_s)) + tl.sum(tl.exp(s - _shift(new_s)), 0)
            z_t = z_t * alpha_t + tl.sum(e_t, 0)
            a = a * alpha_t + tl.sum(_contribution(e_t, t, s), 0)
            m_s = new_s
            m_t = new_t
        m_s = _shift(m_s)
        m_t = _shift(m_t)
    log_z_s = tl.log(z_s)
    log_z_t = tl.log(z_t)
    # E_p[t - s] + lse(s) - lse(t), grouped so that equal distributions cancel at the scale of t - s.
    loss = a / z_t + (m_s - m_t) + (log_z_s - log_z_t)
    tl.store(LOSS + row, tl.where(keep, loss * loss_coef, 0.0))
    if WRITE_GRAD:
        if ROWS_ON_DEVICE:  # batchmean / mean over the selected rows: their count never visits the host
            grad_coef = grad_coef / tl.maximum(tl.load(ROWS).to(tl.float32), 1.0)
        lse_s = m_s + log_z_s
        lse_t = m_t + log_z_t
        if ONE_PASS:
            grad = grad_coef * (e_s / z_s - e_t / z_t)
            tl.store(G + offs * g_col, tl.where(keep, grad, 0.0).to(G.dtype.element_ty), mask=offs < V)
        else:
            n_blocks = tl.cdiv(V, BLOCK_V)
            for i in range(0, n_blocks):
                cols = (n_blocks - 1 - i) * BLOCK_V + offs  # last block first: it is the one in L2
                live = cols < n_live
                # evict_first: the second and last read of these lines (served from L2 when the byte model holds).
                s = tl.load(S + cols * s_col, mask=live, other=float("-inf"), eviction_policy="evict_first")
                t = tl.load(T + cols * t_col, mask=live, other=float("-inf"), eviction_policy="evict_first")
                s = s.to(tl.float32) * inv_temp
                t = t.to(tl.float32) * inv_temp
                grad = grad_coef * (tl.exp(s - lse_s) - tl.exp(t - lse_t))
                g = tl.where(keep, grad, 0.0).to(G.dtype.element_ty)
                tl.store(G + cols * g_col, g, mask=cols < V, eviction_policy="evict_first")  # never re-read here


@triton.jit
def _scale_grad(G, GO, g_row, g_col, V, PER_ROW: tl.constexpr, BLOCK_V: tl.constexpr):
    """G[r, :] *= grad_output (a scalar, or one value per row); moves no memory where it is exactly 1."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    go = tl.load(GO + row) if PER_ROW else tl.load(GO)
    live = cols < tl.where(go != 1.0, V, 0)
    ptr = G + row * g_row + cols * g_col
    g = tl.load(ptr, mask=live, other=0.0).to(tl.float32)
    tl.store(ptr, (g * go).to(G.dtype.element_ty), mask=live)


def row_config(V: int) -> dict:
    """How a row of width V is processed: the kernel's ONE_PASS / BLOCK_V and the launch's num_warps."""
    block = triton.next_power_of_2(V)
    if block <= ON_CHIP_MAX:
        return {"ONE_PASS": True, "BLOCK_V": block, "num_warps": 16 if block >= 8192 else 8 if block >= 2048 else 4}
    return {"ONE_PASS": False, "BLOCK_V": CHUNK, "num_warps": CHUNK_WARPS}


def forward_launch(student, teacher, loss_rows, grad, keep, rows, temperature, reduction, scale_t2, write_grad):
    """``(grid, args, options)`` of the ``_kl_fwd`` launch for these tensors. The autograd function launches
    it; ``kernels.inspect`` compiles the same launch for sm_80 / sm_90 to read its resource usage."""
    N, V = student.shape
    c = temperature * temperature if scale_t2 else 1.0
    grad_coef = c / temperature / (V if reduction == "mean" else 1)
    if reduction in ("batchmean", "mean") and rows is None:
        grad_coef /= max(N, 1)
    g_strides = grad.stride() if write_grad else (0, 0)
    args = (
        student, teacher, loss_rows, grad, keep if keep is not None else loss_rows,
        rows if rows is not None else loss_rows,
        student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1), g_strides[0], g_strides[1],
        V, 1.0 / temperature, c, grad_coef,
    )  # fmt: skip
    options = dict(HAS_KEEP=keep is not None, ROWS_ON_DEVICE=rows is not None, WRITE_GRAD=write_grad, **row_config(V))
    return (N,), args, options


def scale_launch(grad, go, per_row: bool):
    """``(grid, args, options)`` of the ``_scale_grad`` launch (backward's grad_output multiply)."""
    N, V = grad.shape
    block = min(triton.next_power_of_2(V), SCALE_BLOCK)
    options = dict(PER_ROW=per_row, BLOCK_V=block, num_warps=SCALE_WARPS if block == SCALE_BLOCK else 4)
    return (N, triton.cdiv(V, block)), (grad, go, grad.stride(0), grad.stride(1), V), options


class TemperatureKLFunction(torch.autograd.Function):
    """``apply(student [N, V], teacher [N, V], keep [N] bool or None, temperature, reduction, scale_t2,
    inplace)``; the teacher is a constant target (no gradient)."""

    @staticmethod
    def forward(ctx, student, teacher, keep, temperature, reduction, scale_t2, inplace):
        N, V = student.shape
        write_grad = ctx.needs_input_grad[0]
        loss_rows = torch.empty(N, dtype=torch.float32, device=student.device)
        grad = loss_rows  # a placeholder pointer when no gradient is written
        if write_grad:
            grad = student if inplace else torch.empty_like(student, memory_format=torch.contiguous_format)
        rows = None  # batchmean / mean over a selection: the count of selected rows, on the device
        if reduction in ("batchmean", "mean") and keep is not None:
            rows = keep.sum()
        if N:
            grid, args, options = forward_launch(
                student, teacher, loss_rows, grad, keep, rows, temperature, reduction, scale_t2, write_grad
            )
            _kl_fwd[grid](*args, **options)
        if write_grad:
            ctx.grad = grad  # not save_for_backward: in place it *is* the input, whose version moves
            if inplace:
                torch.autograd.graph.increment_version(student)
        ctx.reduction = reduction
        if reduction == "none":
            return loss_rows
        total = loss_rows.sum()
        if reduction == "sum":
            return total
        count = rows.clamp(min=1) if rows is not None else max(N, 1)  # on the device: no host sync
        return total / count / (V if reduction == "mean" else 1)

    @staticmethod
    def backward(ctx, grad_output):
        grad = getattr(ctx, "grad", None)
        if grad is None:
            raise RuntimeError(
                "the fused temperature-KL gradient was already handed to autograd: a second backward "
                "through the same loss (retain_graph) is not supported; compute the loss again"
            )
        del ctx.grad  # let autograd take the buffer without a copy
        N, V = grad.shape
        per_row = ctx.reduction == "none"
        go = grad_output.float().contiguous() if per_row else grad_output.float().reshape(1)
        if N:
            grid, args, options = scale_launch(grad, go, per_row)
            _scale_grad[grid](*args, **options)
        return grad, None, None, None, None, None, None


def fused_temperature_kl(
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
    """The Triton path of :func:`biodistill.kernels.ops.temperature_kl` (same arguments and results), for
    any device Triton runs on (CUDA; CPU under ``TRITON_INTERPRET=1``)."""
    if teacher_logits.requires_grad:
        raise ValueError(
            "the fused temperature-KL kernel treats the teacher as a constant target and computes no "
            "gradient for it: pass teacher_logits.detach() (or use BIODISTILL_KERNELS=reference)"
        )
    s, t, keep = kl_rows(student_logits, teacher_logits, temperature, reduction, mask, labels, ignore_index)
    if not torch.is_grad_enabled():
        s = s.detach()  # evaluation: the kernel then writes no gradient (and never touches the buffer)
    elif inplace and s.requires_grad and (student_logits.is_leaf or s.data_ptr() != student_logits.data_ptr()):
        raise ValueError(
            "inplace=True needs student logits computed by the model (not a leaf) whose [N, V] rows are a view "
            f"(shape {tuple(student_logits.shape)}, strides {student_logits.stride()})"
        )
    loss = TemperatureKLFunction.apply(s, t, keep, float(temperature), reduction, scale_t2, inplace)
    return loss.reshape(student_logits.shape[:-1]) if reduction == "none" else loss
