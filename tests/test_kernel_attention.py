"""Attention divergence without T x T maps: the Triton kernel (kernels/attention.py, under the interpreter on
CPU) and the blocked CPU path (kernels/attention_blocked.py) against the materialised float64 definition
(kernels/reference.py): loss, dq and dk, for KL, probability MSE and score MSE, with padding, local windows,
selected rows, head dims that differ between the models, mixed dtypes, and the awkward cases (a row with no
valid key, no row selected, an upstream gradient that is not 1, queries and keys that are one tensor).

Both paths compute in fp32 from the inputs as given, so each comparison is against float64 on those same
(already rounded) inputs; what is left is fp32 arithmetic and one rounding of dq / dk into the input dtype."""

from __future__ import annotations

import pytest
import torch
from conftest import LargestTensor

from biodistill.kernels.attention import fused_attention_divergence
from biodistill.kernels.attention_blocked import blocked_attention_divergence
from biodistill.kernels.ops import attention_divergence, kernel_mode
from biodistill.kernels.reference import attention_divergence as reference

KINDS = ["kl", "kl_floor", "mse", "score_mse"]
# relative to the largest |value| of the exact loss / gradient: fp32 statistics, then one rounding of the gradient
RTOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def inputs(B, H, T, d_s, d_t, dtype_s=torch.float32, dtype_t=torch.float32, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    q_s, k_s = (torch.randn(B, H, T, d_s, generator=g, dtype=torch.float64).to(dtype_s) for _ in range(2))
    q_t, k_t = (torch.randn(B, H, T, d_t, generator=g, dtype=torch.float64).mul(1.5).to(dtype_t) for _ in range(2))
    mask = torch.ones(B, T, dtype=torch.bool)
    if pad:
        mask[-1, T - T // 3 :] = False  # the last sequence is a third padding
    return q_s, k_s, q_t, k_t, mask


def exact(q_s, k_s, q_t, k_t, kind, grad, **kw):
    """float64 loss per row and the gradients of sum(grad * loss) for the student's queries and keys."""
    a, b = q_s.double().requires_grad_(), k_s.double().requires_grad_()
    out = reference(a, b, q_t.double(), k_t.double(), kind, **kw)
    return (out.detach(), *torch.autograd.grad(out, (a, b), grad))


def run(fn, q_s, k_s, q_t, k_t, kind, grad, **kw):
    a, b = q_s.clone().requires_grad_(), k_s.clone().requires_grad_()
    out = fn(a, b, q_t, k_t, kind, **kw)
    dq, dk = torch.autograd.grad(out, (a, b), grad.float())
    return out.detach(), dq, dk


def assert_close(mine, exact_, dtype, what):
    assert mine.dtype == (torch.float32 if what == "loss" else dtype), what
    scale = exact_.abs().max().item()
    err = (mine.double() - exact_).abs().max().item()
    assert err <= RTOL[dtype] * max(scale, 1e-30), f"{what}: max error {err:.3e} against max |value| {scale:.3e}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "shape, window",
    [((2, 2, 50, 26, 64), None), ((1, 3, 130, 32, 32), 7), ((2, 1, 97, 64, 32), 40)],
    ids=["d26-vs-64", "d32-window7", "d64-vs-32-window40"],
)
def test_kernel_equals_the_definition(kind, shape, window):
    B, H, T, d_s, d_t = shape
    q_s, k_s, q_t, k_t, mask = inputs(B, H, T, d_s, d_t)
    rows = mask.clone()
    rows[0, :3] = False  # rows that do not count
    grad = torch.randn(B, H, T, dtype=torch.float64)
    kw = dict(key_mask=mask, rows=rows, window=window)
    want = exact(q_s, k_s, q_t, k_t, kind, grad, **kw)
    for fn in (fused_attention_divergence, blocked_attention_divergence):
        got = run(fn, q_s, k_s, q_t, k_t, kind, grad, **kw)
        for what, mine, theirs in zip(("loss", "dq", "dk"), got, want):
            assert_close(mine, theirs, torch.float32, f"{fn.__name__} {what}")
        assert (got[0][~rows[:, None, :].expand(B, H, T)] == 0).all()  # rows that do not count give 0


@pytest.mark.parametrize(
    "dtype_s, dtype_t",
    [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float16)],
)
def test_kernel_in_16_bit_keeps_fp32_statistics(dtype_s, dtype_t):
    q_s, k_s, q_t, k_t, mask = inputs(2, 2, 70, 32, 64, dtype_s, dtype_t, seed=1)
    grad = torch.randn(2, 2, 70, dtype=torch.float64)
    want = exact(q_s, k_s, q_t, k_t, "kl", grad, key_mask=mask, rows=mask)
    got = run(fused_attention_divergence, q_s, k_s, q_t, k_t, "kl", grad, key_mask=mask, rows=mask)
    assert_close(got[0], want[0], torch.float32, "loss")  # fp32 statistics: the loss is fp32-exact
    for what, mine, theirs in zip(("dq", "dk"), got[1:], want[1:]):
        assert_close(mine, theirs, dtype_s, what)


@pytest.mark.parametrize("T, window", [(512, None), (1024, 128)])
def test_kernel_at_hundreds_of_tokens_with_padding_and_a_window(T, window):
    """Many query and key tiles (16 x 32 at T = 1,024 in 64 x 32 tiles), the window skipping most of them."""
    q_s, k_s, q_t, k_t, mask = inputs(1, 1, T, 32, 64, torch.bfloat16, torch.bfloat16, seed=2)
    grad = torch.rand(1, 1, T, dtype=torch.float64)
    kw = dict(key_mask=mask, rows=mask, window=window)
    want = exact(q_s, k_s, q_t, k_t, "kl", grad, **kw)
    got = run(fused_attention_divergence, q_s, k_s, q_t, k_t, "kl", grad, **kw)
    for what, mine, theirs in zip(("loss", "dq", "dk"), got, want):
        assert_close(mine, theirs, torch.bfloat16 if what != "loss" else torch.float32, what)


@pytest.mark.parametrize("fn", [fused_attention_divergence, blocked_attention_divergence])
def test_awkward_rows_give_zero_and_no_nan(fn):
    q_s, k_s, q_t, k_t, mask = inputs(2, 2, 20, 16, 16)
    no_keys = mask.clone()
    no_keys[1] = False  # the second sequence has no valid key at all
    grad = torch.ones(2, 2, 20)
    out, dq, dk = run(fn, q_s, k_s, q_t, k_t, "kl", grad, key_mask=no_keys)
    assert torch.isfinite(out).all() and torch.isfinite(dq).all() and torch.isfinite(dk).all()
    assert (out[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all()
    out, dq, dk = run(fn, q_s, k_s, q_t, k_t, "mse", grad, rows=torch.zeros(2, 20, dtype=torch.bool))
    assert (out == 0).all() and (dq == 0).all() and (dk == 0).all()
    # the teacher equal to the student: KL 0, gradient 0 (no cancellation noise beyond fp32's)
    out, dq, _ = run(fn, q_s, k_s, q_s, k_s, "kl", grad)
    assert out.abs().max() < 1e-5 and dq.abs().max() < 1e-5


@pytest.mark.parametrize("fn", [fused_attention_divergence, blocked_attention_divergence])
def test_one_tensor_as_queries_and_keys(fn):
    """MiniLMv2's relations: (q, k) = (X, X); the gradient of X is the sum of both."""
    x_s, _, x_t, _, mask = inputs(2, 4, 24, 8, 16, seed=3)
    a = x_s.double().requires_grad_()
    want = reference(a, a, x_t.double(), x_t.double(), "kl", key_mask=mask, rows=mask)
    (want_grad,) = torch.autograd.grad(want.sum(), a)
    b = x_s.clone().requires_grad_()
    got = fn(b, b, x_t, x_t, "kl", key_mask=mask, rows=mask)
    (got_grad,) = torch.autograd.grad(got.sum(), b)
    assert_close(got.detach(), want.detach(), torch.float32, "loss")
    assert_close(got_grad, want_grad, torch.float32, "dq + dk")


@pytest.mark.parametrize("kind", KINDS)
def test_the_blocked_path_holds_one_block_of_scores_at_a_time(kind):
    """Forward and backward of the CPU path at T = 512 with 16-row blocks: no tensor larger than one block's
    [B, H, 16, T] or the inputs' [B, H, T, d] (the materialised definition makes [B, H, T, T]), and the result
    is the definition's."""
    B, H, T = 1, 2, 512
    q_s, k_s, q_t, k_t, mask = inputs(B, H, T, 16, 32, seed=4)
    block = 4 * B * H * 16 * T
    a, b = q_s.clone().requires_grad_(), k_s.clone().requires_grad_()
    with LargestTensor() as seen:
        out = blocked_attention_divergence(a, b, q_t, k_t, kind, key_mask=mask, rows=mask, block_bytes=block)
        out.sum().backward()
    assert seen.most <= B * H * T * 32, seen.most  # [B, H, 16, T] blocks, [B, H, T, 32] teacher keys
    grad = torch.ones(B, H, T, dtype=torch.float64)
    want = exact(q_s, k_s, q_t, k_t, kind, grad, key_mask=mask, rows=mask)
    assert_close(out.detach(), want[0], torch.float32, "loss")
    assert_close(a.grad, want[1], torch.float32, "dq")
    with LargestTensor() as seen:
        reference(a, b, q_t, k_t, kind, key_mask=mask, rows=mask).sum().backward()
    assert seen.most >= B * H * T * T  # what the bound is against


def test_dispatch_and_argument_errors():
    q_s, k_s, q_t, k_t, mask = inputs(1, 2, 16, 8, 8)
    with kernel_mode("auto"):  # CPU tensors: the blocked path
        auto = attention_divergence(q_s, k_s, q_t, k_t, key_mask=mask)
    with kernel_mode("triton"):  # the kernel, under the interpreter
        triton = attention_divergence(q_s, k_s, q_t, k_t, key_mask=mask)
    torch.testing.assert_close(auto, triton, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"student \[batch, heads, tokens\] \(1, 2, 16\) != teacher \(1, 2, 8\)"):
        attention_divergence(q_s, k_s, q_t[:, :, :8], k_t[:, :, :8])
    with pytest.raises(ValueError, match=r"key_mask must be a bool \[batch, tokens\] = \[1, 16\] tensor"):
        attention_divergence(q_s, k_s, q_t, k_t, key_mask=mask.long())
    with pytest.raises(ValueError, match="unknown attention divergence 'js'"):
        attention_divergence(q_s, k_s, q_t, k_t, "js")
    with pytest.raises(ValueError, match="window must be >= 0"):
        attention_divergence(q_s, k_s, q_t, k_t, window=-1)


# On a GPU: the compiled kernel at full size, against the float64 definition computed on the same device.
# fp32 inputs multiply in TF32 there (kernels/attention.py, tile_config), hence their looser tolerance.
GPU_RTOL = {torch.float32: 5e-3, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind, window", [("kl_floor", None), ("kl", 128), ("mse", None), ("score_mse", None)])
def test_compiled_kernel_at_full_size(dtype, kind, window):
    B, H, T = 2, 12, 2048
    q_s, k_s, q_t, k_t, mask = (x.cuda() for x in inputs(B, H, T, 64, 64, dtype, dtype, seed=5))
    rows = mask.clone()
    grad = torch.rand(B, H, T, dtype=torch.float64, device="cuda")
    kw = dict(key_mask=mask, rows=rows, window=window)
    want = exact(q_s, k_s, q_t, k_t, kind, grad, **kw)
    got = run(fused_attention_divergence, q_s, k_s, q_t, k_t, kind, grad, **kw)
    for what, mine, theirs in zip(("loss", "dq", "dk"), got, want):
        scale = theirs.abs().max().item()
        err = (mine.double() - theirs).abs().max().item()
        assert err <= GPU_RTOL[dtype] * scale, f"{what}: max error {err:.3e} against max |value| {scale:.3e}"
