"""Kernel microbenchmarks: one harness, one subcommand per kernel; every row a ratio against named
baselines measured in the same run.

    python -m biodistill.kernels.bench kl                   # fused temperature KL vs eager / torch.compile / Liger
    python -m biodistill.kernels.bench adapter              # fused bottleneck adapter vs eager / torch.compile
    python -m biodistill.kernels.bench step                 # a whole MiniALBERT training step, kernel on vs off
    python -m biodistill.kernels.bench attention            # attention KL without maps vs materialised / compile
    python -m biodistill.kernels.bench adapter --small      # CPU check of the harness (Triton interpreter)

On CUDA, times are triton.testing.do_bench medians and memory is the peak allocated beyond the
inputs; on CPU (harness verification only) times are wall-clock medians and memory is not measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], device: str, reps: int) -> float:
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=max(reps, 100), return_mode="median")
    fn()  # warm-up (compilation, interpreter caches)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_mb(fn: Callable[[], object], device: str) -> float:
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def split_ms(setup: Callable[[], object], timed: Callable[[object], object], device: str, reps: int) -> float:
    """Median time of ``timed(setup())`` alone: a backward pass without the forward that feeds it."""
    timed(setup())  # warm-up
    times = []
    for _ in range(reps):
        state = setup()
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            timed(state)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            timed(state)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device: str, mbytes: int) -> float:
    """Measured device-to-device copy bandwidth (read + write), the yardstick for memory-bound kernels."""
    src = torch.empty(mbytes * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, reps=20)
    return 2 * src.numel() / ms / 1e6


def table(title: str, rows: list[tuple[str, dict[str, float]]], baseline: str) -> str:
    """Rows of {column: ms or MB}; each provider's fwd+bwd ratio against ``baseline``."""
    cols = list(rows[0][1])
    head = f"{'provider':<20}" + "".join(f"{c:>14}" for c in cols) + f"{'speedup':>10}"
    out = [title, head, "-" * len(head)]
    base = dict(rows)[baseline]["fwd+bwd ms"]
    for name, vals in rows:
        cells = "".join(f"{v:>14.3f}" for v in vals.values())
        out.append(f"{name:<20}{cells}{base / vals['fwd+bwd ms']:>9.2f}x")
    return "\n".join(out)


# -------------------------------------------------------------------------------------------- kl


def _log_probs(s: torch.Tensor, t: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    import torch.nn.functional as F

    return F.log_softmax(s.float() / temperature, dim=-1), F.log_softmax(t.float() / temperature, dim=-1)


def eager_kl(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """What a distillation script writes by hand: two log-softmaxes and kl_div, T^2-scaled."""
    import torch.nn.functional as F

    log_q, log_p = _log_probs(s, t, temperature)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * temperature**2


def liger_kl(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Liger-Kernel's KL path: its kl_div kernel takes log-probabilities, so softmax and temperature
    run eagerly outside it (it has no fused temperature form)."""
    from liger_kernel.transformers.functional import liger_kl_div

    log_q, log_p = _log_probs(s, t, temperature)
    return liger_kl_div(log_q, log_p, reduction="batchmean", log_target=True) * temperature**2


def bench_kl(args) -> str:
    """N rows x V, bf16 student / fp16 teacher (the engine's mixed-precision case), T = 2, batchmean.
    GB/s counts the 6V-bytes-per-row floor (read s and t, write the gradient once) for every provider."""
    from .kl import fused_temperature_kl

    device, N, T = args.device, args.rows, 2.0
    copy = copy_bandwidth_gbs(device, 1024 if device == "cuda" else 64)
    providers = {"eager": eager_kl}
    if not args.no_compile:
        providers["torch.compile"] = torch.compile(eager_kl, dynamic=False)
    if device != "cuda":
        print("liger-kernel skipped: its kernels do not run under the Triton interpreter")
    elif importlib.util.find_spec("liger_kernel") is None:
        print("liger-kernel not installed (pip install -e '.[bench]'): its row is skipped")
    else:
        providers["liger-kernel"] = liger_kl
    providers["triton (ours)"] = fused_temperature_kl
    out = [f"copy bandwidth {copy:.0f} GB/s (device-to-device, read + write), {_device_name(device)}"]
    for V in args.vocab:
        g = torch.Generator(device="cpu").manual_seed(V)
        s = (torch.randn(N, V, generator=g) * 3).to(device, torch.bfloat16).requires_grad_()
        t = (torch.randn(N, V, generator=g) * 3).to(device, torch.float16)
        floor_bytes = 6 * N * V
        rows = []
        for name, fn in providers.items():

            def forward(fn=fn, s=s, t=t):
                s.grad = None
                return fn(s, t, T)

            def fwd_bwd(forward=forward):
                forward().backward()

            both = median_ms(fwd_bwd, device, args.reps)
            rows.append(
                (
                    name,
                    {
                        "fwd ms": median_ms(forward, device, args.reps),
                        "bwd ms": split_ms(forward, lambda loss: loss.backward(), device, args.reps),
                        "fwd+bwd ms": both,
                        "GB/s": floor_bytes / both / 1e6,
                        "% of copy": 100 * floor_bytes / both / 1e6 / copy,
                        # Beyond the inputs and the gradient every provider must produce.
                        "extra MB": peak_mb(fwd_bwd, device) - s.numel() * s.element_size() / 2**20,
                    },
                )
            )
        out.append(table(f"\ntemperature KL: N={N} rows x V={V}, bf16 student / fp16 teacher, T={T}", rows, "eager"))
    return "\n".join(out)


# --------------------------------------------------------------------------------------- adapter


def bench_adapter(args) -> str:
    from .adapter import fused_bottleneck_adapter
    from .reference import bottleneck_adapter

    device, dtype = args.device, getattr(torch, args.dtype)
    M, H, R = args.tokens, args.hidden, args.hidden // args.reduction
    g = torch.Generator(device="cpu").manual_seed(0)

    def make(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    x = make(M, H).requires_grad_()
    params = [make(R, H, scale=H**-0.5), make(R), make(H, R, scale=R**-0.5), make(H), 1 + make(H, scale=0.1), make(H)]
    params = [p.requires_grad_() for p in params]
    dy = make(M, H)
    providers = {"eager": bottleneck_adapter, "triton (ours)": fused_bottleneck_adapter}
    if not args.no_compile:
        providers["torch.compile"] = torch.compile(bottleneck_adapter, dynamic=False)
    rows = []
    for name, fn in providers.items():

        def fwd(fn=fn):
            with torch.no_grad():
                return fn(x, *params, 1e-12)

        def fwd_bwd(fn=fn):
            y = fn(x, *params, 1e-12)
            torch.autograd.backward(y, dy, inputs=[x, *params])

        rows.append(
            (
                name,
                {
                    "fwd ms": median_ms(fwd, device, args.reps),
                    "fwd+bwd ms": median_ms(fwd_bwd, device, args.reps),
                    "peak MB": peak_mb(fwd_bwd, device),
                },
            )
        )
    title = f"bottleneck adapter: M={M} tokens, H={H}, r={R}, {args.dtype}, {_device_name(device)}"
    return table(title, rows, baseline="eager")


# -------------------------------------------------------------------------------------- attention


def bench_attention(args) -> str:
    """One layer pair's attention KL, loss and dq/dk, [B, H, T, 64] bf16 student / teacher queries and keys with
    10% padded keys, from T = 512 to 8,192: the materialised definition (``reference.attention_divergence``,
    what eager attention's maps cost), torch.compile of it, and the fused kernel; on a CPU the blocked path
    instead of the kernel. A provider that runs out of memory is reported as such."""
    from .attention_blocked import blocked_attention_divergence
    from .reference import attention_divergence

    device, dtype = args.device, getattr(torch, args.dtype)
    B, H, d = args.attn_batch, args.attn_heads, args.head_dim
    providers = {"materialised": attention_divergence}
    if not args.no_compile:
        providers["torch.compile"] = torch.compile(attention_divergence, dynamic=False)
    if device == "cuda":
        from .attention import fused_attention_divergence

        providers["triton (ours)"] = fused_attention_divergence
    else:
        providers["blocked (CPU path)"] = blocked_attention_divergence
    out = [
        f"attention KL, one layer pair: B={B} x H={H} heads x d={d}, {args.dtype}, {_device_name(device)} "
        "(peak MB: GPU only; NaN times: out of memory)"
    ]
    for T in args.tokens_attn:
        g = torch.Generator(device="cpu").manual_seed(T)
        q_s, k_s, q_t, k_t = ((torch.randn(B, H, T, d, generator=g)).to(device, dtype) for _ in range(4))
        q_s.requires_grad_(), k_s.requires_grad_()
        mask = torch.ones(B, T, dtype=torch.bool, device=device)
        mask[:, T - T // 10 :] = False
        rows = []
        for name, fn in providers.items():

            def forward(fn=fn, x=(q_s, k_s, q_t, k_t, mask)):
                x[0].grad = x[1].grad = None
                return fn(*x[:4], "kl", key_mask=x[4], rows=x[4]).sum()

            def fwd_bwd(forward=forward):
                forward().backward()

            try:
                rows.append((name, {
                    "fwd ms": median_ms(forward, device, args.reps),
                    "fwd+bwd ms": median_ms(fwd_bwd, device, args.reps),
                    "peak MB": peak_mb(fwd_bwd, device),
                }))  # fmt: skip
            except torch.OutOfMemoryError:
                rows.append((name, {"fwd ms": float("nan"), "fwd+bwd ms": float("nan"), "peak MB": float("nan")}))
                torch.cuda.empty_cache()
        out.append(table(f"\nT={T}", rows, baseline="materialised"))
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ step


def bench_step(args) -> str:
    """A MiniALBERT-312 masked-LM training step (forward, backward, AdamW), adapters fused vs eager."""
    from ..engine.models.minialbert import MiniAlbertConfig, MiniAlbertForMaskedLM
    from .ops import kernel_mode

    device, dtype = args.device, getattr(torch, args.dtype)
    config = (
        MiniAlbertConfig()
        if not args.small
        else MiniAlbertConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, embedding_size=32)
    )
    torch.manual_seed(0)
    model = MiniAlbertForMaskedLM(config).to(device, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch, length = args.batch, args.length
    ids = torch.randint(5, config.vocab_size, (batch, length), device=device)
    labels = torch.where(torch.rand(batch, length, device=device) < 0.15, ids, -100)

    def step():
        loss = model(ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rows = []
    for name, mode in (("eager adapters", "reference"), ("fused adapters", "triton")):
        with kernel_mode(mode):  # the switch is process-wide: left as found
            ms = median_ms(step, device, args.reps)
        rows.append((name, {"fwd+bwd ms": ms, "tokens/s": batch * length / ms * 1e3}))
    title = f"MiniALBERT training step: {batch} x {length} tokens, {args.dtype}, {_device_name(device)}"
    return table(title, rows, baseline="eager adapters")


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m biodistill.kernels.bench", description=__doc__.split("\n")[0])
    parser.add_argument("kernel", choices=["kl", "adapter", "step", "attention"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--rows", type=int, default=8192, help="kl: logit rows N")
    parser.add_argument("--vocab", type=int, nargs="+", default=[28996, 30522, 50265, 128256], help="kl: vocabularies")
    parser.add_argument("--tokens", type=int, default=192 * 256, help="adapter: rows M (batch x length)")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--reduction", type=int, default=16)
    parser.add_argument("--batch", type=int, default=48, help="step: sequences")
    parser.add_argument("--length", type=int, default=256, help="step: tokens per sequence")
    parser.add_argument("--tokens-attn", type=int, nargs="+", help="attention: sequence lengths (GPU: 512 to 8,192; "
                        "CPU: 512 to 4,096, where the materialised maps must fit in host memory)")  # fmt: skip
    parser.add_argument("--attn-batch", type=int, help="attention: sequences (GPU 4, CPU 1)")
    parser.add_argument("--attn-heads", type=int, help="attention: heads (GPU 12, CPU 4)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--small", action="store_true", help="CPU-sized shapes, to check the harness itself")
    args = parser.parse_args(argv)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda"
    args.tokens_attn = args.tokens_attn or ([512, 1024, 2048, 4096, 8192] if gpu else [512, 1024, 2048, 4096])
    args.attn_batch, args.attn_heads = args.attn_batch or (4 if gpu else 1), args.attn_heads or (12 if gpu else 4)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel modules are imported
        if args.small:
            args.tokens, args.hidden, args.batch, args.length, args.reps = 64, 96, 2, 16, 3
            args.dtype = "float32"
            args.rows, args.vocab = 16, [1000, 5000]
            args.tokens_attn, args.attn_batch, args.attn_heads, args.head_dim = [64, 256], 1, 2, 16
    benches = {"kl": bench_kl, "adapter": bench_adapter, "step": bench_step, "attention": bench_attention}
    print(benches[args.kernel](args))


if __name__ == "__main__":
    main()
