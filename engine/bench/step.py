"""One training step of a recipe at full size, as the engine runs it: tokens/s, model FLOP utilisation, peak
memory and the teacher's share of the step, with the fused kernels and with ``BIODISTILL_KERNELS=reference``.

    python -m biodistill.engine.bench.step --config configs/distilbiobert.yaml          # bf16, 24 x 256
    python -m biodistill.engine.bench.step --config configs/compactbiobert.yaml --dry-run  # CPU, smoke shapes

The recipe's teacher and student at their published shapes with random weights (``models/smoke.py``,
``full_size=True``: compute nodes often cannot download them, and weights do not change the time), on the
bundled tokenizer's vocabulary (30,522; BioBERT's is 28,996: the LM heads run at the masked rows only, so
this moves the step's FLOPs by well under 1%) and the bundled corpus, in one process under DeepSpeed
with the recipe's ZeRO stage. ``--dry-run`` is the same plumbing at the smoke shapes, in fp32, on a CPU.

- step: the Trainer's own ``train_step`` (forward of both models, the loss terms, backward, optimiser),
  median of ``--steps`` over fixed batches after warm-up, timed with CUDA events on a GPU;
- FLOPs: counted, not estimated: ``torch.utils.flop_counter`` over one step (every matmul and attention
  the step runs, forward and backward; the Triton kernels add no matmul) and over one teacher forward;
- MFU: the step's FLOPs / its time / the device's dense bf16 peak (spec sheet), and the same against the
  matmul peak measured in this run (a 8192^3 bf16 matmul; on CPU an fp32 one);
- teacher share: the median of the teacher's forward alone on the same batches / the step;
- peak memory: ``torch.cuda.max_memory_allocated`` over the timed steps (not measured on CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from ...kernels.ops import kernel_mode
from ..config import load_recipe
from ..data.batches import to_device
from ..losses import needs_teacher
from ..models.smoke import smoke

# Dense bf16 tensor-core peaks from the vendors' spec sheets (no sparsity), by device-name substring.
SPEC_PEAK = {"H200": 989.4e12, "H100 PCIe": 756.0e12, "H100": 989.4e12, "A100": 312.0e12, "L40S": 362.1e12}


def spec_peak(name: str) -> float | None:
    return next((peak for key, peak in SPEC_PEAK.items() if key in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def matmul_peak(device: torch.device) -> float:
    """FLOP/s of one large square matmul: bf16 8192^3 on a GPU, fp32 1024^3 on a CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / (median_ms(lambda: a @ b, device, reps=10) / 1e3)


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench_recipe(config: str, micro_batch: int, length: int, precision: str, steps: int, dry_run: bool, scratch: str):
    """``(results, trainer)`` for one recipe, its models and run under ``scratch``; the caller closes the
    trainer (its process group serves the next recipe)."""
    from ..trainer import Trainer

    base = load_recipe(config, ["--train.output_dir", scratch], check_paths=False)
    if not needs_teacher(base.losses):  # the teacher's share and FLOPs are half of what this reports
        raise SystemExit(f"{config}: trains with MLM alone (no teacher); the step benchmark times distillation recipes")
    r = smoke(base, full_size=not dry_run)
    r.data = dataclasses.replace(r.data, max_length=length)
    r.train = dataclasses.replace(
        r.train, micro_batch_size=micro_batch, precision=precision, max_steps=10**6, log_every=10**6, export=False
    )
    r.deepspeed = dataclasses.replace(r.deepspeed, tensorboard=False, csv=False)
    trainer = Trainer.from_recipe(r)
    device = trainer.dist.device
    source = trainer._batches()
    fixed = [next(source) for _ in range(4)]
    on_device = [to_device(b, device) for b in fixed]
    feed = itertools.cycle(fixed)
    teacher_feed = itertools.cycle(on_device)

    def step():
        trainer.train_step(feed)

    def teacher_forward():
        trainer.model.teacher_outputs(next(teacher_feed))

    tokens = micro_batch * length * trainer.grad_accum
    with kernel_mode("reference"):  # FLOPs are the same either way; count them through plain PyTorch ops
        step_flops, teacher_flops = count_flops(step), count_flops(teacher_forward)
    result = {
        "recipe": r.name.removesuffix("-smoke"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "dtype": str(trainer.input_dtype).removeprefix("torch."),
        "teacher_dtype": str(next(trainer.teacher.parameters()).dtype).removeprefix("torch."),
        "zero_stage": trainer.engine.zero_optimization_stage(),
        "micro_batch": micro_batch,
        "length": length,
        "grad_accum": trainer.grad_accum,
        "student_params": sum(p.numel() for p in trainer.student.parameters()),
        "teacher_params": sum(p.numel() for p in trainer.teacher.parameters()),
        "step_gflop": step_flops / 1e9,
        "teacher_gflop": teacher_flops / 1e9,
        "matmul_peak_tflops": matmul_peak(device) / 1e12,
        "spec_peak_tflops": None,
    }
    if device.type == "cuda" and spec_peak(result["device"]):
        result["spec_peak_tflops"] = spec_peak(result["device"]) / 1e12
    modes = ("auto", "reference")
    for mode in modes:  # first calls (Triton's compile, DeepSpeed's lazy buffers) before either is timed
        with kernel_mode(mode):
            step(), teacher_forward()
    for mode in modes:
        with kernel_mode(mode):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            ms = median_ms(step, device, steps)
            teacher_ms = median_ms(teacher_forward, device, steps)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            trainer._flush_skips()  # the skip verdicts of the timed steps (none expected), read off the timed path
        achieved = step_flops / (ms / 1e3)
        result["fused" if mode == "auto" else "reference"] = {
            "step_ms": ms,
            "tokens_per_s": tokens / (ms / 1e3),
            "tflops": achieved / 1e12,
            "mfu_spec": achieved / (result["spec_peak_tflops"] * 1e12) if result["spec_peak_tflops"] else None,
            "mfu_measured": achieved / (result["matmul_peak_tflops"] * 1e12),
            "teacher_ms": teacher_ms,
            "teacher_share": teacher_ms / ms,
            "peak_gib": peak,
        }
    result["fused_speedup"] = result["reference"]["step_ms"] / result["fused"]["step_ms"]
    return result, trainer


def format_result(r: dict) -> str:
    head = (
        f"{r['recipe']} step: {r['micro_batch']} x {r['length']} tokens x {r['grad_accum']} micro-batch(es), student "
        f"{r['dtype']} ({r['student_params'] / 1e6:.1f}M), teacher {r['teacher_dtype']} ({r['teacher_params'] / 1e6:.1f}M), "
        f"ZeRO-{r['zero_stage']}, {r['device']}\n"
        f"  FLOPs counted: {r['step_gflop']:.1f} GFLOP a step, of which the teacher's forward {r['teacher_gflop']:.1f}; "
        f"matmul peak measured {r['matmul_peak_tflops']:.1f} TFLOP/s"
        + (f", spec {r['spec_peak_tflops']:.1f}" if r["spec_peak_tflops"] else "")
    )
    lines = [head, f"  {'kernels':<12}{'step ms':>10}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU spec':>10}"
             f"{'MFU meas.':>10}{'teacher':>9}{'peak GiB':>10}"]  # fmt: skip
    for name in ("fused", "reference"):  # "fused": BIODISTILL_KERNELS=auto, the reference anyway on a CPU
        m = r[name]
        spec = f"{100 * m['mfu_spec']:.1f}%" if m["mfu_spec"] is not None else "-"
        peak = f"{m['peak_gib']:.2f}" if m["peak_gib"] is not None else "-"
        lines.append(
            f"  {name:<12}{m['step_ms']:>10.1f}{m['tokens_per_s']:>12.0f}{m['tflops']:>10.2f}{spec:>10}"
            f"{100 * m['mfu_measured']:>9.1f}%{100 * m['teacher_share']:>8.1f}%{peak:>10}"
        )
    lines.append(f"  fused kernels / reference: {r['fused_speedup']:.3f}x the speed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m biodistill.engine.bench.step", description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", help="recipe(s); default distilbiobert and compactbiobert")
    parser.add_argument("--micro-batch", type=int, default=24)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per kernel mode")
    parser.add_argument("--dry-run", action="store_true", help="smoke shapes, fp32, micro-batch 2 x 32 (CPU)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    configs = args.config or ["configs/distilbiobert.yaml", "configs/compactbiobert.yaml"]
    if args.dry_run:
        args.micro_batch, args.length, args.precision, args.steps = 2, 32, "fp32", 2
    results, trainer = [], None
    with tempfile.TemporaryDirectory(prefix="biodistill-step-") as scratch:  # a full-size teacher is 0.4 GB
        for i, config in enumerate(configs):
            if trainer is not None:  # the process group stays; the previous recipe's engine and hooks go
                trainer.guard.close()
                trainer.engine.destroy()
            shape = (args.micro_batch, args.length, args.precision, args.steps, args.dry_run)
            result, trainer = bench_recipe(config, *shape, f"{scratch}/{i}")
            results.append(result)
            print(format_result(result), flush=True)
        trainer.close()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
