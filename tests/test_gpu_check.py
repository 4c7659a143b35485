"""``make gpu-check DRY_RUN=1``: the GPU run's plumbing on this CPU at tiny sizes. Every step runs (the GPU
tests are collected and skipped; kernels compile for sm_90; the kernel benchmarks run under the Triton
interpreter; the full-size step benchmark runs at the smoke shapes) and the dated section is appended to
the Markdown file whole. This is also the CPU test of the benchmark harnesses (kernels/bench.py,
engine/bench/step.py, engine/bench/attention.py)."""

from __future__ import annotations

import re
import subprocess

import pytest
from conftest import REPO


@pytest.mark.slow
def test_make_gpu_check_dry_run_writes_a_whole_section(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n## An earlier section\n\nkept as it was\n")
    flags = f"--out {out} --logs {tmp_path / 'logs'}"
    proc = subprocess.run(
        ["make", "-s", "gpu-check", "DRY_RUN=1", f"GPU_CHECK_FLAGS={flags}"], cwd=REPO, capture_output=True,
        text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "8 of 8 steps ok" in proc.stdout
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\n## An earlier section\n\nkept as it was\n\n## GPU check (DRY RUN")
    assert re.search(r"## GPU check \(DRY RUN: CPU, tiny sizes\): \d{4}-\d\d-\d\d, no GPU", text)
    assert "torch 2." in text and "deepspeed 0." in text and "Commit " in text
    steps = re.findall(r"^### (\d)\. .*: ok, \d+ s$", text, flags=re.M)
    assert steps == ["1", "2", "3", "4", "5", "6", "7", "8"], text[:2000]
    # 1: the GPU tests are selected (and skipped here), nothing else
    assert re.search(r"\d+ skipped, \d+ deselected", text)
    # 2: compiled, not interpreted
    assert "launches compiled for sm_90: 0 fault(s)" in text
    # 3-6: every provider timed, each table's baseline at 1.00x (two KL vocabularies, the adapter, the step, two
    # attention lengths)
    for row in ("copy bandwidth", "eager ", "triton (ours)", "eager adapters", "fused adapters", "blocked (CPU path)"):
        assert row in text, row
    # at least: a measured ratio may itself round to 1.00x on a CPU (a CI run met 7), so the count is no exact figure
    assert text.count("1.00x") >= 6
    # 7: both recipes, FLOPs counted, each kernel mode timed
    for recipe in ("distilbiobert", "compactbiobert"):
        head = re.search(rf"{recipe} step: 2 x 32 tokens .*\n  FLOPs counted: ([\d.]+) GFLOP a step", text)
        assert head and float(head.group(1)) > 0, recipe
    assert len(re.findall(r"^  (fused|reference) +[\d.]+ +\d+ ", text, flags=re.M)) == 4
    # 8: the attention paths as real jobs, side by side
    assert re.search(r"^compactbiobert +maps +[\d.]+ +[\d.]+$", text, flags=re.M)
    assert re.search(r"^  compactbiobert: fused / maps = [\d.]+x the step speed", text, flags=re.M)
    assert (tmp_path / "logs" / "step8.log").stat().st_size > 0
