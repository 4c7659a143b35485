"""Attention terms without T x T maps, measured as real jobs: peak memory and step time of the fused path
(captured queries and keys, kernels/attention.py; both models on SDPA) against the maps path (eager attention,
every layer's ``[B, heads, T, T]``), side by side in one run, each job a fresh process.

    python -m biodistill.engine.bench.attention long        # a 4-layer / 128-wide teacher, T = 1,024 .. 4,096
    python -m biodistill.engine.bench.attention recipes     # CompactBioBERT and TinyBioBERT, full size, 8 x 512
    python -m biodistill.engine.bench.attention equal       # 20 steps: fused and maps give the same losses
    python -m biodistill.engine.bench.attention recipes --dry-run   # CPU, smoke shapes: the harness itself

- long: a random 4-layer, 128-wide BERT teacher (4 heads, BERT's 0.1 dropout) distilled into 2 of its layers
  with attention KL and hidden cosine on the bundled corpus packed to T tokens, micro-batch 2, one process
  (``python -m biodistill.engine``): peak RSS of the job (``summary.json``: the kernel's max RSS) at each T and
  path, and the same job without the attention term, which shows what the models' own attention costs.
- recipes: each recipe at its published shapes with random weights (``--smoke`` at full size, as
  engine/bench/step.py does), micro-batch 8 x 512 tokens, fp32 on a CPU (bf16 on a GPU), 3 timed steps: median
  step time and peak memory (RSS on a CPU, ``max_memory_allocated`` on a GPU).
- equal: the long job's teacher at 256 tokens without dropout and a random 2-layer student, 20 steps, once
  per path, with attention KL, MSE and score MSE: every logged loss of the fused path against the maps path's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from ..config import load_recipe, resolve_path
from ..models.smoke import TOKENIZER, smoke

CORPUS = "pkg://biodistill.engine/assets/biomed_clinical_sample.jsonl"


def small_teacher(root: Path, length: int, dropout: float, init: float = 0.02) -> Path:
    """A random 4-layer, 128-wide BERT (4 heads of 32) with positions for ``length`` tokens, saved with the bundled
    tokenizer; ``init`` the weights' scale (BERT's 0.02 gives near-uniform attention)."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    path = root / f"teacher-{length}-{dropout}-{init}"
    if not path.is_dir():
        torch.manual_seed(0)
        config = BertConfig(
            hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
            max_position_embeddings=max(512, length), hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
            initializer_range=init,
        )  # fmt: skip
        BertForMaskedLM(config).save_pretrained(path)
        AutoTokenizer.from_pretrained(str(resolve_path(TOKENIZER))).save_pretrained(path)
    return path


def long_recipe(teacher: Path, out: Path, length: int, path: str, attention: bool, steps: int) -> dict:
    terms = [{"kind": "hidden_cosine", "weight": 1.0, "layer_map": "uniform"}]
    if attention:
        terms.append({"kind": "attention_kl", "weight": 1.0, "layer_map": "uniform"})
    return {
        "name": f"bench-attention-{length}",
        "teacher": {"path": str(teacher)},
        "student": {"init": "teacher_layers", "teacher_layers": [1, 3], "mlm_head": False},
        "data": {
            "train_files": [CORPUS],
            "max_length": length,
            "packing": True,
            "heldout_fraction": 0.1,
            "cache_dir": str(out.parent / "cache"),
        },  # fmt: skip
        "losses": {"attention_path": path, "terms": terms},
        "optim": {"lr": 1e-4},
        "train": {
            "max_steps": steps,
            "micro_batch_size": 2,
            "output_dir": str(out),
            "log_every": 1,
            "eval_batches": 1,
            "export": False,
        },  # fmt: skip
        "deepspeed": {"zero_stage": 0, "tensorboard": False, "csv": False},
    }


def run_job(recipe: dict, where: Path) -> dict:
    """One job in a fresh process (``python -m biodistill.engine``): its summary and logged training losses."""
    where.mkdir(parents=True, exist_ok=True)
    config = where / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe))
    env = {
        **os.environ,
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu"),
    }
    proc = subprocess.run([sys.executable, "-m", "biodistill.engine", "--config", str(config)], env=env,
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"job {config} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = Path(recipe["train"]["output_dir"])
    summary = json.loads((out / "summary.json").read_text())
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary["losses"] = [r for r in train if r["split"] == "train"]
    return summary


def peak_gib(summary: dict) -> float:
    rank = summary["ranks"][0]
    peak = rank["peak_device_mib"] if rank["peak_device_mib"] is not None else rank["peak_rss_mib"]
    return peak / 1024


def bench_long(args, scratch: Path) -> str:
    lines = [
        "long sequences: 4-layer / 128-wide BERT teacher (4 heads) -> 2 of its layers, hidden cosine (+ attention KL), "
        f"micro-batch 2, {args.steps} steps, one process",
        f"{'T':>6}{'terms':>30}{'path':>8}{'peak GiB':>10}{'s/step':>9}",
    ]
    for length in args.lengths:
        teacher = small_teacher(scratch, length, dropout=0.1)
        for attention, path in ((False, "auto"), (True, "maps"), (True, "fused")):
            where = scratch / f"long-{length}-{attention}-{path}"
            s = run_job(long_recipe(teacher, where / "run", length, path, attention, args.steps), where)
            terms = "hidden_cosine + attention_kl" if attention else "hidden_cosine"
            shown = path if attention else "-"
            step = s["ranks"][0]["step_seconds"]
            lines.append(f"{length:>6}{terms:>30}{shown:>8}{peak_gib(s):>10.2f}{step:>9.2f}")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def bench_recipes(args, scratch: Path) -> str:
    """Each recipe at full size through the trainer, one process per (recipe, path)."""
    lines = [f"full-size steps: micro-batch {args.micro_batch} x {args.length} tokens, {args.steps} steps, one process",
             f"{'recipe':<16}{'path':>8}{'peak GiB':>10}{'s/step':>9}"]  # fmt: skip
    results = {}
    for config in args.config:
        base = load_recipe(config, ["--train.output_dir", str(scratch / Path(config).stem)], check_paths=False)
        full = smoke(base, full_size=not args.dry_run)
        for path in ("maps", "fused"):
            r = dataclasses.replace(full)
            r.data = dataclasses.replace(full.data, max_length=args.length, packing=True)
            r.losses = dataclasses.replace(full.losses, attention_path=path)
            r.train = dataclasses.replace(
                full.train, micro_batch_size=args.micro_batch, max_steps=args.steps, log_every=1, eval_batches=1,
                export=False, output_dir=str(scratch / f"{Path(config).stem}-{path}" / "run"),
            )  # fmt: skip
            r.optim = dataclasses.replace(full.optim, warmup_steps=min(full.optim.warmup_steps, args.steps - 1))
            r.deepspeed = dataclasses.replace(full.deepspeed, tensorboard=False, csv=False)
            s = run_job(r.to_dict(), scratch / f"{Path(config).stem}-{path}")
            results[config, path] = s
            lines.append(f"{base.name:<16}{path:>8}{peak_gib(s):>10.2f}{s['ranks'][0]['step_seconds']:>9.2f}")
            print(lines[-1], flush=True)
        maps, fused = results[config, "maps"], results[config, "fused"]
        speed = maps["ranks"][0]["step_seconds"] / fused["ranks"][0]["step_seconds"]
        lines.append(
            f"  {base.name}: fused / maps = {speed:.2f}x the step speed, {peak_gib(fused) / peak_gib(maps):.2f}x the peak memory"
        )
    return "\n".join(lines)


def bench_equal(args, scratch: Path) -> str:
    """The same 20 steps (no dropout: the maps path reads the student's maps after dropout) down both paths."""
    teacher = small_teacher(scratch, 512, dropout=0.0, init=0.2)  # peaked attention: terms far from 0
    losses = {}
    for path in ("maps", "fused"):
        where = scratch / f"equal-{path}"
        recipe = long_recipe(teacher, where / "run", 256, path, attention=True, steps=20)
        # a random student: copies of the teacher's layers would make every attention term ~0 from the start
        recipe["student"] = {"init": "config", "overrides": {"num_hidden_layers": 2, "initializer_range": 0.2},
                             "mlm_head": False}  # fmt: skip
        recipe["losses"]["terms"] += [{"kind": "attention_mse", "weight": 1.0, "layer_map": [[2, 4]]},
                                      {"kind": "attention_score_mse", "weight": 0.01, "layer_map": [[1, 2]]}]  # fmt: skip
        losses[path] = run_job(recipe, where)["losses"]
    keys = ["loss", "hidden_cosine", "attention_kl", "attention_mse", "attention_score_mse"]
    worst, where = 0.0, ""
    for a, b in zip(losses["maps"], losses["fused"], strict=True):
        for key in keys:
            diff = abs(a[key] - b[key]) / max(abs(a[key]), 1e-12)
            if diff > worst:
                worst, where = diff, f"{key} at step {a['step']} ({a[key]:.8f} vs {b[key]:.8f})"
    return (
        f"fused vs maps, 20 steps at 256 tokens, {', '.join(keys)}: the largest relative difference in any "
        f"logged loss is {worst:.2e}" + (f", {where}" if where else "")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m biodistill.engine.bench.attention", description=__doc__.split("\n")[0]
    )
    parser.add_argument("what", choices=["long", "recipes", "equal"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096], help="long: sequence lengths")
    parser.add_argument("--config", action="append", help="recipes: default compactbiobert and tinybiobert")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512, help="recipes: tokens a sequence")
    parser.add_argument("--steps", type=int, default=4, help="training steps a job (the first is not timed)")
    parser.add_argument("--dry-run", action="store_true", help="recipes: CompactBioBERT at smoke shapes, 2 x 32")
    args = parser.parse_args(argv)
    args.config = args.config or ["configs/compactbiobert.yaml", "configs/tinybiobert.yaml"]
    if args.dry_run:
        args.config, args.micro_batch, args.length, args.steps = args.config[:1], 2, 32, 2
    with tempfile.TemporaryDirectory(prefix="biodistill-attention-") as scratch:
        bench = {"long": bench_long, "recipes": bench_recipes, "equal": bench_equal}[args.what]
        print(bench(args, Path(scratch)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
