"""Stored against live teacher outputs in task distillation: time per epoch, and the whole job of a second student.

    python -m biodistill.engine.bench.task [--ranks 2] [--epochs 2] [--unlabeled 2000]

Real jobs of configs/task/ner-sample.yaml (the fine-tuned MiniLM-L6 teacher, a 3-layer student) on the bundled NER
sample plus unlabeled sentences of the bundled corpus, launched as a user launches them (``deepspeed``), one after
another on this host: the teacher live in every step; the teacher's outputs stored by the first student's job; a
second student (other teacher layers) from the stored outputs, which never loads the teacher. Per job: the median
step, the time per epoch (steps per epoch x median step) and the job's wall time (start-up included). Ratios are
against the live job measured in the same run. The fine-tuned teacher is cached before the timed jobs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = "configs/task/ner-sample.yaml"
CORPUS = "pkg://biodistill.engine/assets/biomed_clinical_sample.jsonl"


def job(name: str, root: Path, ranks: int, flags: list[str]) -> dict:
    out = root / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")  # a flag value YAML reads as a plain string
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--log_level", "error", "launch/train.py", "--config", CONFIG,
           "--train.output_dir", str(out), "--train.save_every", "0", "--train.export", "false", *flags]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"{name}: exit code {done.returncode}")
    summary = json.loads((out / "summary.json").read_text())
    step = max(r["step_seconds"] for r in summary["ranks"])  # the slowest rank sets the pace
    outputs = summary["plan"]["task"]["teacher_outputs"]
    forwards = "every step" if outputs.startswith("live") else "none" if "(found)" in outputs else "once an example"
    return {"name": name, "wall": wall, "step": step, "summary": summary, "forwards": forwards}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--unlabeled", type=int, default=2000, help="sentences of the bundled corpus")
    parser.add_argument("--micro-batch", type=int, default=16)
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    root = Path(tempfile.mkdtemp(prefix="biodistill-bench-task-"))
    data = ["--data.train_files", f"[{CORPUS}]", "--task.max_unlabeled", str(args.unlabeled),
            "--train.micro_batch_size", str(args.micro_batch), "--task.outputs_dir", str(root / "stored")]  # fmt: skip
    # A warm-up job: the fine-tuned teacher cached (if it is not yet), the examples counted.
    warm = job(
        "warm-up",
        root,
        args.ranks,
        [*data, "--train.max_steps", "1", "--optim.warmup_steps", "0", "--task.teacher_outputs", "live"],
    )
    examples = warm["summary"]["data"]["train_examples"]
    per_epoch = examples // (args.micro_batch * args.ranks)
    steps = ["--train.max_steps", str(math.ceil(args.epochs * per_epoch))]
    live = job("live teacher", root, args.ranks, [*data, *steps, "--task.teacher_outputs", "live"])
    first = job("stored (first student: stores them)", root, args.ranks, [*data, *steps])
    second = job("stored (second student)", root, args.ranks, [*data, *steps, "--student.teacher_layers", "[1, 3, 5]"])
    print(f"task distillation, {CONFIG}: {warm['summary']['data']['task']}; {args.ranks} ranks x micro-batch "
          f"{args.micro_batch}, {per_epoch} steps an epoch, {steps[1]} steps a job, on {os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'job':<38}{'median step':>12}{'per epoch':>11}{'whole job':>11}  teacher forwards  vs live (epoch / job)")
    for r in (live, first, second):
        epoch = r["step"] * per_epoch
        print(f"{r['name']:<38}{r['step'] * 1e3:>9.0f} ms{epoch:>9.1f} s{r['wall']:>9.1f} s  {r['forwards']:<16}  "
              f"{live['step'] / r['step']:.2f}x / {live['wall'] / r['wall']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
