"""Every Triton kernel compiled ahead of time for sm_80 and sm_90 (no GPU needed): the real compiler, not the
interpreter, so what only a GPU run would have revealed (compile errors, register spills) fails here.

The compiles run in a subprocess: this process runs under TRITON_INTERPRET=1 (conftest), in which
@triton.jit gives interpreter objects that cannot be compiled."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO


def compiler_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_ALLOW_NON_CONSTEXPR_GLOBALS"] = "1"  # the inspection must ignore this waiver
    return env


@pytest.mark.slow
def test_every_shipped_kernel_compiles_for_sm80_and_sm90_without_spilling():
    """Every KL and adapter launch, and the largest attention launch of each of its tile configurations (the
    whole attention matrix, 210 launches, is ``--only attention``: BENCHMARKS.md keeps its table)."""
    only = ["--only", "kl", "--only", "adapter", "--only", "attention-worst"]
    proc = subprocess.run(
        [sys.executable, "-m", "biodistill.kernels.inspect", *only], capture_output=True, text=True,
        env=compiler_env(), cwd=REPO, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    prefixes = ("| kl.", "| adapter.", "| attention.")
    rows = [line for line in proc.stdout.splitlines() if line.startswith(prefixes)]
    kernels = {row.split("|")[1].strip() for row in rows}
    assert kernels == {"kl._kl_fwd", "kl._scale_grad", "adapter._adapter_fwd", "adapter._adapter_bwd"} | {
        f"attention.{k}" for k in ("fwd", "dq", "dk")
    }
    assert sum("V=30522 student bf16 teacher fp16 loss+grad" in r for r in rows) == 1
    assert sum("adapter._adapter_bwd | H=768 r=48 bf16" in r for r in rows) == 1
    assert sum("attention.dk | d=128/128 bf16/bf16 kl_floor window 64" in r for r in rows) == 1
    assert "COMPILE ERROR" not in proc.stdout
    for row in rows:  # "REG / SPILL B / SHARED B" per architecture, both present
        cells = [c.strip() for c in row.split("|")[3:5]]
        assert all(c.split(" / ")[1] == "0 B" for c in cells), row
    assert "launches compiled for sm_80, sm_90: 0 fault(s)" in proc.stdout


def test_the_inspection_reports_a_compile_error_and_a_spill(tmp_path):
    """The two faults issue 17 found: a module-level float read inside @triton.jit (the interpreter runs it,
    the compiler rejects it), and the KL kernel's former one-block configuration for a 30k row (32,768
    wide over 32 warps), which spilled."""
    (tmp_path / "faulty.py").write_text(
        textwrap.dedent(
            """
            import triton
            import triton.language as tl

            _SCALE = 0.5

            @triton.jit
            def scale(X, N, BLOCK: tl.constexpr):
                offs = tl.arange(0, BLOCK)
                x = tl.load(X + offs, mask=offs < N)
                tl.store(X + offs, x * _SCALE, mask=offs < N)
            """
        )
    )
    script = textwrap.dedent(
        """
        import torch
        import faulty
        from biodistill.kernels import inspect, kl

        def global_read():
            return faulty.scale, (1,), (inspect._mock(torch.float32, 64), 64), {"BLOCK": 64}

        def one_block_30k():
            fn, grid, args, options = inspect._kl_forward(30522, torch.bfloat16, torch.float16, True)
            return fn, grid, args, {**options, "ONE_PASS": True, "BLOCK_V": 32768, "num_warps": 32}

        for name, make in (("global", global_read), ("one-block", one_block_30k)):
            usage = inspect.compile_case(inspect.Case(name, name, make), 90)
            print(name, "|", usage.faults())
        """
    )
    env = compiler_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a fresh cache: a cached artefact would hide the error
    env.pop("TRITON_ALLOW_NON_CONSTEXPR_GLOBALS")  # compile_case alone does not clear it; inspect() does
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" | ", 1) for line in proc.stdout.splitlines() if " | " in line)
    assert "does not compile" in lines["global"] and "Cannot access global variable _SCALE" in lines["global"]
    assert lines["one-block"].startswith("['spills ") and "B a thread" in lines["one-block"], lines
