"""The fused temperature-KL kernel (kernels/kl.py) against a float64 reference, under the Triton
interpreter on CPU (TRITON_INTERPRET=1, set in conftest) and at full size on a GPU (marker).

The kernel computes in fp32 on the inputs exactly as given, so every comparison is made against
float64 on those same (already rounded) inputs: the only dtype-dependent error left is the one
rounding of the gradient into the student's dtype."""

from __future__ import annotations

import pytest
import torch

import biodistill.kernels.kl as kl
from biodistill.kernels.kl import TemperatureKLFunction, fused_temperature_kl
from biodistill.kernels.ops import TemperatureKL, temperature_kl
from biodistill.kernels.reference import temperature_kl as reference

NEG_INF = float("-inf")
# Gradient, relative to each element: fp32 exp() of an argument |s - lse| ~ 10-20 carries ~1e-6, then
# one rounding into the student's dtype; plus a floor relative to the largest gradient (cancellation
# in q - p, fp16 subnormals).
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def kl64(s, t, T=1.0, scale_t2=True, keep=None):
    """Per-row loss and the gradient of its sum, in float64, from the definition."""
    s64 = s.detach().double().requires_grad_()
    log_p = torch.log_softmax(t.double() / T, -1)
    log_q = torch.log_softmax(s64 / T, -1)
    p = log_p.exp()
    rows = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1) * (T * T if scale_t2 else 1.0)
    if keep is not None:
        rows = torch.where(keep, rows, torch.zeros_like(rows))
    rows.sum().backward()
    return rows.detach(), s64.grad


def logits(*shape, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def fused(s, t, *args, grad_output=None, **kwargs):
    """Loss and student gradient of the kernel; ``grad_output`` defaults to 1."""
    leaf = s.detach().clone().requires_grad_()
    loss = fused_temperature_kl(leaf, t, *args, **kwargs)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return loss.detach(), leaf.grad


def assert_grad_close(grad, exact, dtype):
    assert grad.dtype == dtype
    floor = max(1e-6 * exact.abs().max().item(), 2**-25 if dtype == torch.float16 else 0.0)  # half a subnormal step
    torch.testing.assert_close(grad.double(), exact, rtol=GRAD_RTOL[dtype], atol=max(floor, 1e-12))


DTYPES = [
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float16),  # bf16 student, fp16 teacher
]


@pytest.mark.parametrize("student_dtype, teacher_dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("N, V", [(41, 1271), (3, 30522), (7, 1000), (2, 256000)])
def test_matches_float64_per_row(N, V, student_dtype, teacher_dtype):
    s, t = logits(N, V, dtype=student_dtype), logits(N, V, dtype=teacher_dtype, seed=1)
    rows, grad = fused(s, t, 2.0, reduction="none")
    rows64, grad64 = kl64(s, t, 2.0)
    torch.testing.assert_close(rows.double(), rows64, rtol=1e-5, atol=1e-6)
    assert_grad_close(grad, grad64, student_dtype)


def test_streamed_rows_match_float64_like_on_chip_rows(monkeypatch):
    """Force the two-pass path on a short row (a partial last block included): as exact as one pass."""
    s, t = logits(41, 1271), logits(41, 1271, seed=1)
    rows64, grad64 = kl64(s, t, 2.0)
    monkeypatch.setattr(kl, "ON_CHIP_MAX", 512)
    monkeypatch.setattr(kl, "CHUNK", 256)
    rows, grad = fused(s, t, 2.0, "none")
    torch.testing.assert_close(rows.double(), rows64, rtol=1e-5, atol=1e-6)
    assert_grad_close(grad, grad64, torch.float32)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("select", ["mask", "labels"])
def test_reductions_over_selected_rows(reduction, select):
    N, V = 23, 777
    s, t = logits(N, V), logits(N, V, seed=1)
    keep = torch.rand(N, generator=torch.Generator().manual_seed(2)) < 0.4
    assert 0 < keep.sum() < N
    s[~keep, :5] = float("nan")  # ignored rows are never read: garbage there cannot leak
    rows_arg = {"mask": keep} if select == "mask" else {"labels": torch.where(keep, 7, -100)}
    loss, grad = fused(s, t, 2.0, reduction, **rows_arg)
    rows64, grad64 = kl64(s, t, 2.0, keep=keep)
    n = keep.sum().item()
    expected = {"none": rows64, "sum": rows64.sum(), "batchmean": rows64.sum() / n, "mean": rows64.sum() / (n * V)}
    divisor = {"none": 1, "sum": 1, "batchmean": n, "mean": n * V}[reduction]
    torch.testing.assert_close(loss.double(), expected[reduction], rtol=1e-5, atol=1e-7)
    assert (grad[~keep] == 0).all()
    assert_grad_close(grad[keep], grad64[keep] / divisor, torch.float32)
    # The reference agrees on the same rows (it is what CPU tensors run).
    clean = s.clone()
    clean[~keep] = 0
    torch.testing.assert_close(reference(clean, t, 2.0, reduction, **rows_arg), loss, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("V", [300, 40000])
def test_all_rows_ignored_gives_zero_not_nan(reduction, V):
    s, t = logits(4, V), logits(4, V, seed=1)
    loss, grad = fused(s, t, 2.0, reduction, mask=torch.zeros(4, dtype=torch.bool))
    assert (loss == 0).all() and (grad == 0).all()
    empty, empty_grad = fused(torch.zeros(0, V), torch.zeros(0, V), 2.0, reduction)
    assert not empty.isnan().any() and empty_grad.shape == (0, V)
    assert (reference(s, t, 2.0, reduction, mask=torch.zeros(4, dtype=torch.bool)) == 0).all()


@pytest.mark.parametrize("V, pad", [(1271, 100), (40000, 9000)], ids=["on-chip", "streamed"])
def test_minus_infinity_never_makes_nan(V, pad):
    """A padded vocabulary (-inf in both, whole blocks of it when streamed, at either end), -inf in the
    teacher only (p = 0), and -inf in the student only where the teacher has mass (an infinite KL)."""
    s, t = logits(6, V), logits(6, V, seed=1)
    s[:3, -pad:] = t[:3, -pad:] = NEG_INF
    s[3:5, :pad] = t[3:5, :pad] = NEG_INF
    t[1, 5:40:3] = NEG_INF
    s[5, 7] = NEG_INF
    rows, grad = fused(s, t, 2.0, "none")
    rows64, grad64 = kl64(s, t, 2.0)
    assert not rows.isnan().any() and not grad.isnan().any()
    assert rows[5].item() == float("inf") and rows64[5].item() == float("inf")
    torch.testing.assert_close(rows[:5].double(), rows64[:5], rtol=1e-5, atol=1e-6)
    assert_grad_close(grad, grad64, torch.float32)
    assert (grad[:3, -pad:] == 0).all()


@pytest.mark.parametrize("V", [1271, 40000])
def test_large_magnitude_logits_are_stable(V):
    t = logits(5, V, scale=1e4)
    s = t + logits(5, V, scale=30.0, seed=1)  # near the teacher, at magnitude 1e4
    s[0] = logits(V, scale=1e4, seed=3)  # and one row far from it
    rows, grad = fused(s, t, 1.0, "none")
    rows64, grad64 = kl64(s, t, 1.0)
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(rows.double(), rows64, rtol=1e-5, atol=1e-2)
    assert_grad_close(grad, grad64, torch.float32)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_grad_output_scales_the_gradient(reduction):
    s, t = logits(9, 500, dtype=torch.bfloat16), logits(9, 500, seed=1)
    go = torch.tensor(0.37) if reduction != "none" else torch.rand(9, generator=torch.Generator().manual_seed(3))
    _, grad = fused(s, t, 2.0, reduction, grad_output=go)
    _, unit = fused(s, t, 2.0, reduction)
    expected = unit.double() * (go.double() if reduction != "none" else go.double()[:, None])
    torch.testing.assert_close(grad.double(), expected, rtol=8e-3, atol=1e-6)


def test_non_contiguous_and_batched_inputs():
    B, L, V = 3, 5, 777
    s = logits(V, B * L).t().reshape(B, L, V)  # column stride != 1
    wide = logits(B, L, V + 33, seed=1)
    t = wide[..., :V]  # a view: row stride != V
    assert not s.is_contiguous() and not t.is_contiguous()
    mask = torch.rand(B, L, generator=torch.Generator().manual_seed(4)) < 0.6
    rows, grad = fused(s, t, 2.0, "none", mask=mask)
    assert rows.shape == (B, L) and grad.shape == (B, L, V)
    rows64, grad64 = kl64(s.reshape(-1, V), t.reshape(-1, V), 2.0, keep=mask.reshape(-1))
    torch.testing.assert_close(rows.reshape(-1).double(), rows64, rtol=1e-5, atol=1e-6)
    assert_grad_close(grad.reshape(-1, V), grad64, torch.float32)


def test_t2_scaling_is_switchable():
    s, t = logits(8, 300), logits(8, 300, seed=1)
    rows, grad = fused(s, t, 4.0, "none", scale_t2=False)
    rows64, grad64 = kl64(s, t, 4.0, scale_t2=False)
    torch.testing.assert_close(rows.double(), rows64, rtol=1e-5, atol=1e-7)
    assert_grad_close(grad, grad64, torch.float32)


def test_in_place_gradient_into_the_logits_buffer():
    g = torch.Generator().manual_seed(5)
    h, t = torch.randn(12, 16, generator=g), logits(12, 300, seed=1)
    w = torch.randn(16, 300, generator=g, requires_grad=True)
    out = h @ w
    fused_temperature_kl(out, t, 2.0, inplace=True).backward()
    w_grad = w.grad.clone()
    w.grad = None
    reference(h @ w, t, 2.0).backward()
    torch.testing.assert_close(w_grad, w.grad, rtol=1e-5, atol=1e-7)
    ref_out = h @ w
    expected = torch.autograd.grad(reference(ref_out, t, 2.0), ref_out)[0]
    torch.testing.assert_close(out.detach(), expected, rtol=1e-5, atol=1e-9)  # the buffer now holds it
    # Another use of the same logits that saved them for its backward fails loudly, not silently wrong.
    out = h @ w
    other = out.pow(2).sum()
    loss = fused_temperature_kl(out, t, 2.0, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


def test_misuse_is_refused_clearly():
    s, t = logits(4, 50).requires_grad_(), logits(4, 50, seed=1)
    with pytest.raises(ValueError, match="teacher as a constant"):
        fused_temperature_kl(s, t.clone().requires_grad_())
    with pytest.raises(ValueError, match="inplace=True needs"):
        fused_temperature_kl(s, t, inplace=True)  # a leaf: its values would become the gradient
    loss = fused_temperature_kl(s, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
    for fn in (fused_temperature_kl, reference):
        with pytest.raises(ValueError, match=r"logit shapes differ: student \(4, 50\), teacher \(4, 49\)"):
            fn(s, t[:, :49])
        with pytest.raises(ValueError, match="unknown reduction 'avg'"):
            fn(s, t, reduction="avg")
        with pytest.raises(ValueError, match=r"mask has shape \(3,\); the logits' rows are \(4,\)"):
            fn(s, t, mask=torch.ones(3, dtype=torch.bool))
        with pytest.raises(TypeError, match="mask must be a bool tensor"):
            fn(s, t, mask=torch.ones(4))
        with pytest.raises(ValueError, match="temperature must be > 0"):
            fn(s, t, 0.0)
        with pytest.raises(ValueError, match="either as mask or as labels"):
            fn(s, t, mask=torch.ones(4, dtype=torch.bool), labels=torch.zeros(4))


def test_no_gradient_requested_writes_none():
    s, t = logits(6, 300), logits(6, 300, seed=1)
    before = s.clone()
    with torch.no_grad():
        loss = fused_temperature_kl(s, t, 2.0, inplace=True)
        leaf_loss = fused_temperature_kl(s.clone().requires_grad_(), t, 2.0, inplace=True)  # eval of a leaf
    for value in (loss, leaf_loss):
        torch.testing.assert_close(value.double(), kl64(s, t, 2.0)[0].mean(), rtol=1e-5, atol=1e-7)
    assert torch.equal(s, before)


def test_function_module_functional_and_dispatch_agree(monkeypatch):
    s, t = logits(10, 400), logits(10, 400, seed=1)
    mask = torch.arange(10) % 3 != 0
    expected = reference(s, t, 2.0, mask=mask)
    calls = []
    real_apply = TemperatureKLFunction.apply
    monkeypatch.setattr(TemperatureKLFunction, "apply", lambda *a: calls.append(1) or real_apply(*a))
    assert torch.equal(temperature_kl(s, t, 2.0, mask=mask), expected)  # CPU tensors: the reference
    assert calls == []
    monkeypatch.setenv("BIODISTILL_KERNELS", "triton")
    for out in (temperature_kl(s, t, 2.0, mask=mask), TemperatureKL(2.0)(s, t, mask=mask)):
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-7)
    assert calls == [1, 1]
    keep = mask.clone()
    direct = TemperatureKLFunction.apply(s, t, keep, 2.0, "batchmean", True, False)
    torch.testing.assert_close(direct, expected, rtol=1e-5, atol=1e-7)
    assert "temperature=2.0" in repr(TemperatureKL(2.0))


def test_distillation_follows_the_reference_run(monkeypatch):
    """The engine's logit-KL term, training a small BERT student against a BERT teacher with AdamW:
    the kernel (interpreter) and the reference give the same loss curve."""
    from transformers import BertConfig, BertForMaskedLM

    from biodistill.engine.config import LossesConfig, LossTermConfig
    from biodistill.engine.distiller import Distiller
    from biodistill.engine.losses import build_terms

    def bert(layers, hidden, seed):
        torch.manual_seed(seed)
        cfg = BertConfig(vocab_size=1500, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                         intermediate_size=2 * hidden, max_position_embeddings=32, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)  # fmt: skip
        return BertForMaskedLM(cfg)

    teacher = bert(4, 64, seed=1).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1500, (4, 16), generator=g)
    mask = torch.ones_like(ids)
    rows = (torch.rand(4 * 16, generator=g) < 0.3).nonzero().squeeze(1)  # the collator's flat row indices
    batch = {"input_ids": ids, "attention_mask": mask, "rows": rows}  # the teacher's logits: the Distiller's own
    losses = LossesConfig(temperature=2.0, terms=[LossTermConfig(kind="logit_kl", weight=1.0)])

    def curve(mode: str) -> list[float]:
        monkeypatch.setenv("BIODISTILL_KERNELS", mode)
        student = bert(2, 32, seed=0)
        terms = build_terms(losses, student.config, teacher.config, "test.yaml")
        model = Distiller(student, terms, [1.0], teacher)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        values = []
        for _ in range(8):
            loss, *_ = model(batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            values.append(loss.item())
        return values

    fused_curve, ref_curve = curve("triton"), curve("reference")
    assert fused_curve == pytest.approx(ref_curve, rel=1e-4)
    assert ref_curve[-1] < 0.8 * ref_curve[0]


@pytest.mark.gpu
@pytest.mark.parametrize("student_dtype, teacher_dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("V", [28996, 30522, 50265, 128256, 256000])
def test_full_size_on_gpu(V, student_dtype, teacher_dtype):
    """The benchmark's shapes on the device, with no host synchronisation inside the call."""
    N = 4096
    s = logits(N, V, dtype=student_dtype).cuda()
    t = logits(N, V, dtype=teacher_dtype, seed=1).cuda()
    t[:, -64:] = s[:, -64:] = NEG_INF  # a padded vocabulary
    keep = (torch.rand(N, generator=torch.Generator().manual_seed(2)) < 0.15).cuda()
    leaf = s.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    inputs = torch.cuda.memory_allocated()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = fused_temperature_kl(leaf, t, 2.0, mask=keep)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # Beyond the inputs: the gradient (N x V, the student's dtype) and O(N) floats, nothing N x V more.
    extra = torch.cuda.max_memory_allocated() - inputs - leaf.grad.numel() * leaf.grad.element_size()
    assert extra <= 64 * N + 2**20, f"{extra} bytes beyond the inputs and the gradient"
    rows64, grad64 = kl64(s, t, 2.0, keep=keep)
    n = keep.sum().item()
    torch.testing.assert_close(loss.double(), rows64.sum() / n, rtol=1e-5, atol=1e-6)
    assert_grad_close(leaf.grad, grad64 / n, student_dtype)
