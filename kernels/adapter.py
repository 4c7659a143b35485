"""Fused bottleneck adapter in Triton: y = LN(x + W_up GELU(W_down x + b_down) + b_up) * gamma + beta.

Why fuse: with r = H/16 (768 -> 48) both GEMMs have little arithmetic per byte, so eager PyTorch's 6-8
kernels are bound by their full-width round trips through memory. Here one program owns BLOCK_M rows:
the BLOCK_M x r activation never leaves the chip, and bias, residual and LayerNorm run in the epilogue.

Forward, per block of rows (loops over H in BLOCK_H chunks, so any width fits):
  1. z = x W_d^T + b_d                         [BLOCK_M, r], fp32 accumulation; saved for backward
  2. v = x + GELU(z) W_u^T + b_u, chunk by chunk: per-row mean and M2 merged across chunks (Chan's
     parallel variance: no E[v^2] - E[v]^2 cancellation)
  3. y = (v - mean) * rstd * gamma + beta, recomputing v (cheaper than writing and re-reading it)
Backward saves only x (the caller's), z [M, r] and mean/rstd [M]; GELU(z) and v are recomputed.
With xhat = (v - mean) * rstd and g = dy * gamma (H-vectors per row):
  dv      = rstd * (g - mean_H(g) - xhat * mean_H(g * xhat))          (LayerNorm backward)
  dz      = (dv W_u) * GELU'(z),  GELU'(z) = Phi(z) + z phi(z)
  dx      = dv + dz W_d                                               (residual + down projection)
  dgamma  = sum_rows dy * xhat,  dbeta = sum_rows dy                  (per-program partials, summed after)
  dW_u    = dv^T GELU(z),  db_u = sum_rows dv,  dW_d = dz^T x,  db_d = sum_rows dz
The kernel writes dx, dv and dz; the four weight gradients are M-long reductions, which cuBLAS GEMMs
do better than atomics (and deterministically).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# tl.constexpr: the compiler reads no other module globals inside @triton.jit code (the interpreter does).
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # The CPU interpreter multiplies bf16 tiles wrongly (numpy has no bf16); exact fp32 products of the
    # same bf16 values give what the tensor cores give, so the interpreter takes that route.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _gelu(z):
    return 0.5 * z * (1.0 + tl.math.erf(z * _SQRT1_2))


@triton.jit
def _gelu_grad(z):
    return 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2)) + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI


@triton.jit
def _down(X, WD, BD, rows, rmask, rr, rrmask, H, R, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
          BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """z = x W_d^T + b_d for one block of rows: [BLOCK_M, BLOCK_R] in fp32."""
    z = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        cmask = cols < H
        x = tl.load(X + rows[:, None] * H + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        wd_t = tl.load(WD + rr[None, :] * H + cols[:, None], mask=cmask[:, None] & rrmask[None, :], other=0.0)
        z += _dot(x, wd_t, PRECISION, UPCAST)
    return z + tl.load(BD + rr, mask=rrmask, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _residual(X, WU, BU, a, rows, rmask, cols, cmask, rr, rrmask, H, R, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """v = x + a W_u^T + b_u for one [BLOCK_M, BLOCK_H] chunk, in fp32."""
    x = tl.load(X + rows[:, None] * H + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    wu_t = tl.load(WU + cols[None, :] * R + rr[:, None], mask=rrmask[:, None] & cmask[None, :], other=0.0)
    bu = tl.load(BU + cols, mask=cmask, other=0.0).to(tl.float32)
    return x.to(tl.float32) + _dot(a, wu_t, PRECISION, UPCAST) + bu[None, :]


@triton.jit
def _xhat(X, WU, BU, a, mean, rstd, rows, rmask, cols, cmask, rr, rrmask, H, R, PRECISION: tl.constexpr,
          UPCAST: tl.constexpr):  # fmt: skip
    """The normalised residual (v - mean) * rstd for one chunk, v recomputed from x and GELU(z)."""
    v = _residual(X, WU, BU, a, rows, rmask, cols, cmask, rr, rrmask, H, R, PRECISION, UPCAST)
    return (v - mean[:, None]) * rstd[:, None]


@triton.jit
def _dv(DY, G, xhat, c_g, c_gx, rstd, rows, cols, m2d, cmask, H):
    """LayerNorm's input gradient for one chunk: rstd * (dy*gamma - mean(dy*gamma) - xhat * mean(dy*gamma*xhat))."""
    dy = tl.load(DY + rows[:, None] * H + cols[None, :], mask=m2d, other=0.0).to(tl.float32)
    gamma = tl.load(G + cols, mask=cmask, other=0.0).to(tl.float32)
    return tl.where(m2d, (dy * gamma[None, :] - c_g[:, None] - xhat * c_gx[:, None]) * rstd[:, None], 0.0)


@triton.jit
def _dv_chunk(DY, G, X, WU, BU, a, mean, rstd, c_g, c_gx, rows, rmask, h0, rr, rrmask, H, R,
              BLOCK_H: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """The chunk of columns starting at h0, its masks, and dv there."""
    cols = h0 + tl.arange(0, BLOCK_H)
    cmask = cols < H
    m2d = rmask[:, None] & cmask[None, :]
    xhat = _xhat(X, WU, BU, a, mean, rstd, rows, rmask, cols, cmask, rr, rrmask, H, R, PRECISION, UPCAST)
    return cols, cmask, m2d, _dv(DY, G, xhat, c_g, c_gx, rstd, rows, cols, m2d, cmask, H)


@triton.jit
def _adapter_fwd(X, WD, BD, WU, BU, G, B, Y, Z, MEAN, RSTD, M, H, R, eps, BLOCK_M: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rr = tl.arange(0, BLOCK_R)
    rrmask = rr < R
    z = _down(X, WD, BD, rows, rmask, rr, rrmask, H, R, BLOCK_M, BLOCK_H, BLOCK_R, PRECISION, UPCAST)
    tl.store(Z + rows[:, None] * R + rr[None, :], z, mask=rmask[:, None] & rrmask[None, :])
    a = _gelu(z).to(X.dtype.element_ty)  # the up projection's operand, in the input dtype like eager

    count = tl.zeros((BLOCK_M,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        cmask = cols < H
        v = _residual(X, WU, BU, a, rows, rmask, cols, cmask, rr, rrmask, H, R, PRECISION, UPCAST)
        n_b = tl.sum(cmask.to(tl.float32), 0)
        mean_b = tl.sum(tl.where(cmask[None, :], v, 0.0), 1) / n_b
        d = tl.where(cmask[None, :], v - mean_b[:, None], 0.0)
        m2_b = tl.sum(d * d, 1)
        total = count + n_b
        delta = mean_b - mean
        mean += delta * n_b / total
        m2 += m2_b + delta * delta * count * n_b / total
        count = total
    rstd = 1.0 / tl.sqrt(m2 / H + eps)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)

    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        cmask = cols < H
        v = _residual(X, WU, BU, a, rows, rmask, cols, cmask, rr, rrmask, H, R, PRECISION, UPCAST)
        g = tl.load(G + cols, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
        y = (v - mean[:, None]) * rstd[:, None] * g[None, :] + b[None, :]
        tl.store(Y + rows[:, None] * H + cols[None, :], y, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _adapter_bwd(DY, X, Z, MEAN, RSTD, WD, WU, BU, G, DX, DV, DZ, DG_PART, DB_PART, M, H, R,
                 BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rr = tl.arange(0, BLOCK_R)
    rrmask = rr < R
    zmask = rmask[:, None] & rrmask[None, :]
    z = tl.load(Z + rows[:, None] * R + rr[None, :], mask=zmask, other=0.0)
    a = _gelu(z).to(X.dtype.element_ty)
    mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
    rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)

    # Pass A: the two row means LayerNorm's backward needs, and this block's dgamma / dbeta partials.
    c_g = tl.zeros((BLOCK_M,), dtype=tl.float32)
    c_gx = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        cmask = cols < H
        m2d = rmask[:, None] & cmask[None, :]
        xhat = _xhat(X, WU, BU, a, mean, rstd, rows, rmask, cols, cmask, rr, rrmask, H, R, PRECISION, UPCAST)
        dy = tl.load(DY + rows[:, None] * H + cols[None, :], mask=m2d, other=0.0).to(tl.float32)
        gamma = tl.load(G + cols, mask=cmask, other=0.0).to(tl.float32)
        g = dy * gamma[None, :]
        c_g += tl.sum(g, 1)
        c_gx += tl.sum(tl.where(m2d, g * xhat, 0.0), 1)
        tl.store(DG_PART + pid * H + cols, tl.sum(tl.where(m2d, dy * xhat, 0.0), 0), mask=cmask)
        tl.store(DB_PART + pid * H + cols, tl.sum(dy, 0), mask=cmask)
    c_g = c_g / H
    c_gx = c_gx / H

    # Pass B: dv (stored for dW_u, db_u) and da = dv W_u, accumulated on chip.
    da = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols, cmask, m2d, dv = _dv_chunk(DY, G, X, WU, BU, a, mean, rstd, c_g, c_gx, rows, rmask, h0, rr, rrmask,
                                         H, R, BLOCK_H, PRECISION, UPCAST)  # fmt: skip
        tl.store(DV + rows[:, None] * H + cols[None, :], dv, mask=m2d)
        wu = tl.load(WU + cols[:, None] * R + rr[None, :], mask=cmask[:, None] & rrmask[None, :], other=0.0)
        da += _dot(dv.to(wu.dtype), wu, PRECISION, UPCAST)
    dz = da * _gelu_grad(z)
    tl.store(DZ + rows[:, None] * R + rr[None, :], dz, mask=zmask)

    # Pass C: dx = dv + dz W_d (dv recomputed: re-reading what this program just wrote would need a barrier).
    dz_in = dz.to(X.dtype.element_ty)
    for h0 in range(0, H, BLOCK_H):
        cols, cmask, m2d, dv = _dv_chunk(DY, G, X, WU, BU, a, mean, rstd, c_g, c_gx, rows, rmask, h0, rr, rrmask,
                                         H, R, BLOCK_H, PRECISION, UPCAST)  # fmt: skip
        wd = tl.load(WD + rr[:, None] * H + cols[None, :], mask=rrmask[:, None] & cmask[None, :], other=0.0)
        dx = dv + _dot(dz_in, wd, PRECISION, UPCAST)
        tl.store(DX + rows[:, None] * H + cols[None, :], dx, mask=m2d)


# Tiles (rows, hidden chunk) and warps, from `python -m biodistill.kernels.inspect` on sm_80 / sm_90: the
# largest tiles that spill nothing at every shipped shape (H 768, r 48; and H 312, r 26) in bf16, fp16 and
# fp32. The forward holds z and GELU(z) [BLOCK_M, BLOCK_R] plus one hidden chunk of x, W_u^T and v: at
# 32 x 128 over 4 warps that was 255 registers and a spill; at 32 x 32 over 8 warps it is 61-110. The
# backward keeps z, GELU(z) and da [BLOCK_M, BLOCK_R] live across its three passes plus a chunk's x, dy,
# xhat, dv and both weight tiles: 32 x 128 over 4 warps spilled 80 B-7.5 KB a thread; 16 x 32 over 8 warps
# fits in 96-156, so the backward stays one kernel (a split would write and re-read the M x r dz).
# Byte model (b the element size): the tiles change no HBM traffic. Per row the forward reads x and writes
# y and z (2Hb + 4r bytes); the backward reads x, dy, z and writes dx, dv, dz (4Hb + 8r: 6 KB at H 768 in
# bf16). Its three passes re-read a block's own rows (16 x H, 24 KB a tensor) from L1/L2, not HBM. What
# BLOCK_M sets is the weight traffic: every block reads the weight tiles, W_u about four times (v is
# recomputed in each pass, and da = dv W_u) and W_d once, from L2, where 2Hr elements (147 KB in bf16 at
# 768 x 48) stay resident: about 5Hrb / BLOCK_M = 46 KB a row at 16 rows, some 8x the HBM bytes. L2 serves
# roughly 2.5-3x HBM's bandwidth on an A100 or H100, so at these tiles the backward is bound by L2, not
# HBM. The next lever, for when a GPU can measure it: split the backward in two (dv and dz; then dx
# = dv + dz W_d reading dv back) so each kernel holds less and can take 64-row tiles.
FWD_TILES = {"BLOCK_M": 32, "BLOCK_H": 32, "num_warps": 8}
BWD_TILES = {"BLOCK_M": 16, "BLOCK_H": 32, "num_warps": 8}


def _precision(dtype) -> str:
    # fp32 inputs get IEEE fp32 products, as eager PyTorch does by default (no silent TF32).
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype) -> bool:
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _options(H: int, R: int, dtype, tiles: dict) -> dict:
    # tl.dot needs every tile dimension >= 16.
    block_h = min(tiles["BLOCK_H"], max(16, triton.next_power_of_2(H)))
    return dict(
        tiles, BLOCK_H=block_h, BLOCK_R=max(16, triton.next_power_of_2(R)), PRECISION=_precision(dtype),
        UPCAST=_upcast(dtype),
    )  # fmt: skip


def forward_launch(x2, wd, bd, wu, bu, g, b, y, z, mean, rstd, eps):
    """``(grid, args, options)`` of the ``_adapter_fwd`` launch; ``kernels.inspect`` compiles the same one."""
    (M, H), R = x2.shape, wd.shape[0]
    options = _options(H, R, x2.dtype, FWD_TILES)
    grid = (triton.cdiv(M, options["BLOCK_M"]),)
    return grid, (x2, wd, bd, wu, bu, g, b, y, z, mean, rstd, M, H, R, eps), options


def backward_blocks(M: int) -> int:
    """Row blocks of the backward launch: the rows of its dgamma / dbeta partials."""
    return triton.cdiv(M, BWD_TILES["BLOCK_M"])


def backward_launch(dy2, x2, z, mean, rstd, wd, wu, bu, g, dx, dv, dz, dg_part, db_part):
    """``(grid, args, options)`` of the ``_adapter_bwd`` launch."""
    (M, H), R = x2.shape, wd.shape[0]
    options = _options(H, R, x2.dtype, BWD_TILES)
    return (
        (backward_blocks(M),),
        (dy2, x2, z, mean, rstd, wd, wu, bu, g, dx, dv, dz, dg_part, db_part, M, H, R),
        options,
    )


class FusedBottleneckAdapter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias, eps):
        H = x.shape[-1]
        R = down_weight.shape[0]
        x2 = x.reshape(-1, H).contiguous()
        M = x2.shape[0]
        dt = x.dtype
        wd, bd, wu, bu = (t.to(dt).contiguous() for t in (down_weight, down_bias, up_weight, up_bias))
        g, b = norm_weight.contiguous(), norm_bias.contiguous()
        y = torch.empty_like(x2)
        z = torch.empty(M, R, device=x.device, dtype=torch.float32)
        mean = torch.empty(M, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        grid, args, options = forward_launch(x2, wd, bd, wu, bu, g, b, y, z, mean, rstd, eps)
        _adapter_fwd[grid](*args, **options)
        ctx.save_for_backward(x2, wd, wu, bu, g, z, mean, rstd)
        ctx.shape = x.shape
        ctx.param_dtypes = tuple(t.dtype for t in (down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias))
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, wd, wu, bu, g, z, mean, rstd = ctx.saved_tensors
        M, H = x2.shape
        R = wd.shape[0]
        dy2 = dy.reshape(-1, H).contiguous()
        grid = backward_blocks(M)
        dx = torch.empty_like(x2)
        dv = torch.empty_like(x2)
        dz = torch.empty(M, R, device=x2.device, dtype=torch.float32)
        dg_part = torch.empty(grid, H, device=x2.device, dtype=torch.float32)
        db_part = torch.empty_like(dg_part)
        launch = backward_launch(dy2, x2, z, mean, rstd, wd, wu, bu, g, dx, dv, dz, dg_part, db_part)
        _adapter_bwd[launch[0]](*launch[1], **launch[2])
        a = torch.nn.functional.gelu(z).to(x2.dtype)
        grads = (
            dz.to(x2.dtype).t() @ x2,  # dW_d [R, H]; cuBLAS accumulates in fp32 whatever the dtype
            dz.sum(0),  # db_d
            dv.t() @ a,  # dW_u [H, R]
            dv.sum(0, dtype=torch.float32),  # db_u
            dg_part.sum(0),  # dgamma
            db_part.sum(0),  # dbeta
        )
        grads = tuple(gr.to(dt) for gr, dt in zip(grads, ctx.param_dtypes))
        return (dx.view(ctx.shape), *grads, None)


def fused_bottleneck_adapter(x, down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias, eps=1e-12):
    """The Triton path of :func:`biodistill.kernels.reference.bottleneck_adapter` (same arguments)."""
    return FusedBottleneckAdapter.apply(x, down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias, eps)
