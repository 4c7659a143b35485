"""The fused bottleneck adapter (kernels/adapter.py) against the float64 reference, under the Triton
interpreter on CPU (TRITON_INTERPRET=1, set in conftest) and at full size on a GPU (marker)."""

from __future__ import annotations

import pytest
import torch

from biodistill.kernels.adapter import fused_bottleneck_adapter
from biodistill.kernels.ops import bottleneck_adapter
from biodistill.kernels.reference import bottleneck_adapter as reference

NAMES = ["x", "down_weight", "down_bias", "up_weight", "up_bias", "norm_weight", "norm_bias"]
# Relative to each tensor's largest magnitude; the kernel must also be within 3x of eager PyTorch in
# the same dtype (whose own rounding sets what is achievable).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def inputs(M: int, H: int, R: int, seed: int = 0, lead=()):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    return [
        randn(*lead, M, H),
        randn(R, H, scale=H**-0.5 * 2),
        randn(R, scale=0.1),
        randn(H, R, scale=R**-0.5),
        randn(H, scale=0.1),
        1 + randn(H, scale=0.2),  # LayerNorm gain away from 1
        randn(H, scale=0.2),
    ]


def run(fn, tensors, dtype, dy):
    leaves = [t.detach().to(dtype, copy=True).requires_grad_() for t in tensors]
    y = fn(*leaves, 1e-12)
    y.backward(dy.to(dtype))
    return y.detach().double(), [leaf.grad.double() for leaf in leaves]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M, H, R", [(37, 96, 6), (5, 312, 19), (61, 768, 48), (1, 40, 3)])
def test_matches_float64_reference(M, H, R, dtype):
    tensors = inputs(M, H, R)
    dy = torch.randn(M, H, dtype=torch.float64)
    y64, g64 = run(reference, tensors, torch.float64, dy)
    y_eager, g_eager = run(reference, tensors, dtype, dy)
    y, grads = run(fused_bottleneck_adapter, tensors, dtype, dy)
    for name, ours, eager, exact in zip(["y", *NAMES], [y, *grads], [y_eager, *g_eager], [y64, *g64]):
        bound = max(TOLERANCE[dtype], 3 * rel_err(eager, exact))
        assert rel_err(ours, exact) <= bound, f"{name}: {rel_err(ours, exact):.2e} > {bound:.2e}"


def test_batched_non_contiguous_input_and_scaled_grad_output():
    tensors = inputs(7, 64, 4, seed=2, lead=(3,))
    x = tensors[0].transpose(0, 1).contiguous().transpose(0, 1)  # [3, 7, 64] with swapped strides
    assert not x.is_contiguous()
    dy = 0.37 * torch.randn(3, 7, 64, dtype=torch.float64)
    y64, g64 = run(reference, [x, *tensors[1:]], torch.float64, dy)
    y, grads = run(fused_bottleneck_adapter, [x, *tensors[1:]], torch.float32, dy)
    assert y.shape == (3, 7, 64)
    for ours, exact in zip([y, *grads], [y64, *g64]):
        assert rel_err(ours, exact) < 2e-5


def test_dispatch_switch(monkeypatch):
    """CPU tensors take the reference unless BIODISTILL_KERNELS=triton; bad values are refused."""
    calls = []
    import biodistill.kernels.adapter as adapter

    monkeypatch.setattr(adapter.FusedBottleneckAdapter, "apply", lambda *a: calls.append(1) or reference(*a))
    tensors = [t.float() for t in inputs(4, 32, 2)]
    bottleneck_adapter(*tensors)
    assert calls == []
    monkeypatch.setenv("BIODISTILL_KERNELS", "triton")
    bottleneck_adapter(*tensors)
    assert calls == [1]
    monkeypatch.setenv("BIODISTILL_KERNELS", "fast")
    with pytest.raises(ValueError, match="BIODISTILL_KERNELS must be"):
        bottleneck_adapter(*tensors)


def test_minialbert_trains_the_same_with_the_kernel(monkeypatch):
    """A few AdamW steps of a small MiniALBERT with the fused adapters (interpreter) follow the reference run."""
    from biodistill.engine.models.minialbert import MiniAlbertConfig, MiniAlbertForMaskedLM

    config = MiniAlbertConfig(
        vocab_size=200, embedding_size=16, hidden_size=64, num_attention_heads=4, intermediate_size=64
    )
    config.num_hidden_layers, config.hidden_dropout_prob, config.attention_probs_dropout_prob = 2, 0.0, 0.0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 200, (4, 12), generator=g)
    labels = torch.where(torch.rand(4, 12, generator=g) < 0.3, ids, -100)

    def curve(mode: str) -> list[float]:
        monkeypatch.setenv("BIODISTILL_KERNELS", mode)
        torch.manual_seed(0)
        model = MiniAlbertForMaskedLM(config)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(6):
            loss = model(ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    fused, ref = curve("triton"), curve("reference")
    assert fused == pytest.approx(ref, rel=1e-4) and ref[-1] < ref[0]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_full_size_on_gpu(dtype):
    """miniALBERT's shape: 192 x 256 tokens, H = 768, r = 48."""
    tensors = [t.cuda() for t in inputs(192 * 256, 768, 48)]
    dy = torch.randn(192 * 256, 768, dtype=torch.float64, device="cuda")
    y64, g64 = run(reference, tensors, torch.float64, dy)
    y_eager, g_eager = run(reference, tensors, dtype, dy)
    y, grads = run(fused_bottleneck_adapter, tensors, dtype, dy)
    for ours, eager, exact in zip([y, *grads], [y_eager, *g_eager], [y64, *g64]):
        assert rel_err(ours, exact) <= max(TOLERANCE[dtype], 3 * rel_err(eager, exact))
