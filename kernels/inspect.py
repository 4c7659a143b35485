"""Compile every Triton kernel ahead of time for A100 (sm_80) and H100/H200 (sm_90), without a GPU, and
read each cubin's resource usage: the check the Triton interpreter cannot make.

    python -m biodistill.kernels.inspect                 # the table; exit 1 on any fault
    python -m biodistill.kernels.inspect --arch 90 --only adapter
    python -m biodistill.kernels.inspect --only kl --only adapter --only attention-worst   # what the tests compile

Each row is one launch exactly as a dispatcher makes it (``kl.forward_launch``, ``adapter.backward_launch``,
...) for the shipped and benchmark shapes, built from mock tensors of the right dtypes and strides and
specialised the way Triton's runtime specialises a real launch (constant 1 strides, 16-byte alignment).
``cuobjdump --dump-resource-usage`` (shipped in the triton wheel) gives registers a thread, STACK (bytes a
thread spilled to local memory) and shared memory. A fault is a compile error (the interpreter accepts
code the compiler rejects, e.g. a non-constexpr global read inside @triton.jit), any spill, or more
shared memory than the architecture gives one block. Compiles use a private, empty Triton cache: a
cached artefact would hide a compile error.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Collection
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

ARCHS = (80, 90)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes one block may use (A100, H100/H200)
# the widest row kept on chip, then BioBERT, BERT/PubMedBERT, RoBERTa, Llama-3, Gemma
KL_VOCABS = (16000, 28996, 30522, 50265, 128256, 256000)
KL_DTYPES = (  # (student, teacher): the engine's mixed cases and the plain ones
    (torch.bfloat16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float32, torch.float16),
    (torch.float32, torch.float32),
)
# (hidden H, reduction factor), r = H / factor: the shipped MiniALBERTs (768 / 16) and a 312-wide one
# (312 is not a multiple of 16; 12 is the nearest factor that divides it)
ADAPTER_SHAPES = ((768, 16), (312, 12))
ADAPTER_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Attention divergence (kernels/attention.py): (student, teacher) head dims TinyBERT's 26 (312 / 12) against BERT's
# 64, MiniLM's and ModernBERT-base's 32 / 64, 96 and 128 (wide heads); each pair in the engine's dtypes (bf16, and
# fp16 and fp32 for the attention KL the terms use) with every kind, and the windowed variant (ModernBERT's
# local layers). Registers grow with the tile of head dims (32, 64, 128) and with the kind (two-pass kinds hold
# the most); WORST_ATTENTION is the largest of each tile configuration (tile_config), what the test suite compiles.
ATTENTION_HEADS = ((26, 64), (32, 32), (64, 64), (96, 96), (128, 128))
ATTENTION_CASES = [
    (d_s, d_t, s_dtype, t_dtype, kind, window)
    for d_s, d_t in ATTENTION_HEADS
    for s_dtype, t_dtype, kinds in (
        (torch.bfloat16, torch.bfloat16, ("kl_floor", "kl", "mse", "score_mse")),
        (torch.float16, torch.float16, ("kl_floor",)),
        (torch.float32, torch.float32, ("kl_floor",)),
    )
    for kind in kinds
    for window in ((None, 64) if (kind, s_dtype) == ("kl_floor", torch.bfloat16) else (None,))
]
WORST_ATTENTION = [
    (d, d, dtype, dtype, kind, window)
    for d, dtype in ((64, torch.bfloat16), (128, torch.bfloat16), (128, torch.float32))
    for kind, window in (("kl_floor", 64), ("mse", None))
]
ATTENTION_TOKENS, ATTENTION_BATCH_HEADS = 8192, (4, 12)
ROWS = 4096  # rows of the mock launches: sets the grid and the row strides, not the code


@dataclass(frozen=True)
class Case:
    kernel: str  # "module.function"
    config: str  # what the row is, for the table
    make: Callable[[], tuple]  # () -> (jit function, grid, args, options), built in the compiling process


@dataclass
class Usage:
    case: str
    config: str
    arch: int
    registers: int = 0
    spill: int = 0
    shared: int = 0
    error: Optional[str] = None

    def faults(self) -> list[str]:
        if self.error:
            return [f"does not compile: {self.error}"]
        out = []
        if self.spill:
            out.append(f"spills {self.spill} B a thread")
        if self.shared > SHARED_LIMIT[self.arch]:
            out.append(f"uses {self.shared} B of shared memory, above sm_{self.arch}'s {SHARED_LIMIT[self.arch]}")
        return out


# ------------------------------------------------------------------------------------- the cases


def _mock(dtype, *shape):
    from triton.runtime.jit import MockTensor

    class Mock(MockTensor):  # a contiguous tensor's strides, per dimension as torch gives them
        def stride(self, dim=None):
            strides = super().stride()
            return strides if dim is None else strides[dim]

    return Mock(dtype, list(shape))


def _kl_forward(V, s_dtype, t_dtype, write_grad):
    from . import kl

    s, t = _mock(s_dtype, ROWS, V), _mock(t_dtype, ROWS, V)
    loss, keep, rows = _mock(torch.float32, ROWS), _mock(torch.bool, ROWS), _mock(torch.int64, 1)
    grad = s if write_grad else loss
    launch = kl.forward_launch(s, t, loss, grad, keep, rows, 2.0, "batchmean", True, write_grad)
    return (kl._kl_fwd, *launch)


def _kl_scale(V, g_dtype):
    from . import kl

    return (kl._scale_grad, *kl.scale_launch(_mock(g_dtype, ROWS, V), _mock(torch.float32, 1), False))


def _adapter(H, factor, dtype, backward):
    from . import adapter

    R = H // factor
    x, w_down, w_up = _mock(dtype, ROWS, H), _mock(dtype, R, H), _mock(dtype, H, R)
    vec_h, vec_r, f32 = _mock(dtype, H), _mock(dtype, R), torch.float32
    z, stats = _mock(f32, ROWS, R), _mock(f32, ROWS)
    if not backward:
        launch = adapter.forward_launch(x, w_down, vec_r, w_up, vec_h, vec_h, vec_h, x, z, stats, stats, 1e-12)
        return (adapter._adapter_fwd, *launch)
    part = _mock(f32, adapter.backward_blocks(ROWS), H)
    launch = adapter.backward_launch(x, x, z, stats, stats, w_down, w_up, vec_h, vec_h, x, x, z, part, part)
    return (adapter._adapter_bwd, *launch)


def _attention(kernel, d_s, d_t, s_dtype, t_dtype, kind, window):
    from . import attention

    (B, H), T = ATTENTION_BATCH_HEADS, ATTENTION_TOKENS
    q_s, q_t = _mock(s_dtype, B, H, T, d_s), _mock(t_dtype, B, H, T, d_t)
    mask, rows_f32 = _mock(torch.bool, B, T), _mock(torch.float32, B, H, T)
    out = _mock(torch.float32, B, H, T, d_s) if kernel != "fwd" else rows_f32
    launch = attention.launch(kernel, q_s, q_s, q_t, q_t, mask, mask, out, rows_f32, rows_f32, rows_f32, kind,
                              window, 0.125, 0.125, rows_f32)  # fmt: skip
    return (attention._KERNELS[kernel], *launch)


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.").replace("float", "fp").replace("bfp", "bf")


def cases(only: Optional[Collection[str]] = None) -> list[Case]:
    """The launches of the kernel modules in ``only`` (all when None)."""
    only = set(only or ("kl", "adapter", "attention"))
    out = []
    if "kl" in only:
        for V in KL_VOCABS:
            for s_dtype, t_dtype in KL_DTYPES:
                for write_grad in (True, False):
                    what = "loss+grad" if write_grad else "loss only"
                    config = f"V={V} student {_name(s_dtype)} teacher {_name(t_dtype)} {what}"
                    out.append(Case("kl._kl_fwd", config, _bind(_kl_forward, V, s_dtype, t_dtype, write_grad)))
            for g_dtype in sorted({s for s, _ in KL_DTYPES}, key=str):
                out.append(Case("kl._scale_grad", f"V={V} grad {_name(g_dtype)}", _bind(_kl_scale, V, g_dtype)))
    if "adapter" in only:
        for H, factor in ADAPTER_SHAPES:
            for dtype in ADAPTER_DTYPES:
                for backward in (False, True):
                    kernel = "adapter._adapter_bwd" if backward else "adapter._adapter_fwd"
                    config = f"H={H} r={H // factor} {_name(dtype)}"
                    out.append(Case(kernel, config, _bind(_adapter, H, factor, dtype, backward)))
    if only & {"attention", "attention-worst"}:
        for d_s, d_t, s_dtype, t_dtype, kind, window in ATTENTION_CASES if "attention" in only else WORST_ATTENTION:
            for kernel in ("fwd", "dq", "dk"):
                config = f"d={d_s}/{d_t} {_name(s_dtype)}/{_name(t_dtype)} {kind}"
                config += f" window {window}" if window is not None else ""
                make = _bind(_attention, kernel, d_s, d_t, s_dtype, t_dtype, kind, window)
                out.append(Case(f"attention.{kernel}", config, make))
    return out


class _bind:  # a picklable partial (cases cross into worker processes)
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __call__(self):
        return self.fn(*self.args)


# ---------------------------------------------------------------------------------- compiling


def _cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def compile_case(case: Case, arch: int) -> Usage:
    """Compile one launch for ``sm_<arch>`` exactly as Triton's runtime would specialise it; read its usage."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as triton_compile
    from triton.runtime.jit import create_function_from_signature

    usage = Usage(case.kernel, case.config, arch)
    try:
        fn, _grid, args, options = case.make()
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        options = {**options, "debug": False}
        bound, specialization, parsed = binder(*args, **options)
        parsed, signature, constexprs, attrs = fn._pack_args(backend, options, bound, specialization, parsed)
        compiled = triton_compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=parsed.__dict__)
    except Exception as e:  # a compile error is a finding, reported in the table
        usage.error = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        return usage
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        out = subprocess.run(
            [str(_cuobjdump()), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", out)
    if m is None:
        usage.error = f"cuobjdump printed no resource line: {out.strip()[:200]}"
        return usage
    usage.registers, usage.spill, usage.shared = map(int, m.groups())
    return usage


def _compile_all(work: tuple[list[Case], int]) -> list[Usage]:
    batch, arch = work
    return [compile_case(c, arch) for c in batch]


def inspect(only: Optional[Collection[str]] = None, archs=ARCHS, jobs: int = 0) -> list[Usage]:
    """Every case at every architecture, compiled in ``jobs`` processes (default: one a core)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit(
            "kernels.inspect compiles for a GPU: unset TRITON_INTERPRET (the interpreter compiles nothing)"
        )
    os.environ.pop("TRITON_ALLOW_NON_CONSTEXPR_GLOBALS", None)  # the check this tool exists to make
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="biodistill-inspect-")  # nothing cached hides an error
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the runtime's default; silences its warning
    todo = [(c, a) for a in archs for c in cases(only)]
    jobs = jobs or os.cpu_count() or 1
    work = [([c for c, a in todo[i::jobs] if a == arch], arch) for i in range(jobs) for arch in archs]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        results = [u for chunk in pool.map(_compile_all, work) for u in chunk]
    order = {(c.kernel, c.config, a): i for i, (c, a) in enumerate(todo)}
    return sorted(results, key=lambda u: order[u.case, u.config, u.arch])


def format_table(usages: list[Usage]) -> str:
    head = f"| kernel | configuration | {' | '.join(f'sm_{a} reg / spill / smem' for a in ARCHS)} |"
    lines = [head, "|" + "---|" * (2 + len(ARCHS))]
    rows: dict[tuple[str, str], dict[int, Usage]] = {}
    for u in usages:
        rows.setdefault((u.case, u.config), {})[u.arch] = u
    for (kernel, config), by_arch in rows.items():
        cells = []
        for a in ARCHS:
            u = by_arch.get(a)
            cells.append(
                "-" if u is None else "COMPILE ERROR" if u.error else f"{u.registers} / {u.spill} B / {u.shared} B"
            )
        lines.append(f"| {kernel} | {config} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m biodistill.kernels.inspect", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, choices=ARCHS, action="append", help="sm_80 and/or sm_90 (default both)")
    parser.add_argument(
        "--only", choices=["kl", "adapter", "attention", "attention-worst"], action="append",
        help="kernel modules, repeatable (attention-worst: the largest attention launch of each tile configuration)",
    )  # fmt: skip
    parser.add_argument("--jobs", type=int, default=0, help="compiling processes (default: one a core)")
    args = parser.parse_args(argv)
    usages = inspect(args.only, tuple(args.arch or ARCHS), args.jobs)
    print(format_table(usages))
    faults = [f"{u.case} [{u.config}] on sm_{u.arch}: {f}" for u in usages for f in u.faults()]
    for line in faults:
        print(f"FAULT {line}", file=sys.stderr)
    archs = ", ".join(f"sm_{a}" for a in (args.arch or ARCHS))
    print(f"\n{len(usages)} launches compiled for {archs}: {len(faults)} fault(s)")
    return 1 if faults else 0


if __name__ == "__main__":
    sys.exit(main())
