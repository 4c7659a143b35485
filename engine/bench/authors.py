"""A DistilBioBERT step: this engine against the authors' own training loop, interleaved on one host.

The baseline is the loop nlpie-research/Compact-Biomedical-Transformers published for DistilBioBERT
(``DistilBioBERT-Distillation.py``): their ``DistillationWrapper`` (student and teacher ``AutoModelForMaskedLM``,
both run with ``output_hidden_states``; 2 x MLM + 5 x T^2 KL at T = 2 over the masked positions + 1 x cosine
embedding loss of the last hidden states over non-pad tokens) under transformers' ``Trainer``, whose own
``training_step`` (forward, loss, backward) and AdamW / linear-schedule step are what is timed. It is written
here from their file, not imported: their script loads data sets and checkpoints at import.

Ours is ``configs/distilbiobert.yaml`` as the engine runs it (``Trainer.train_step``: both forwards, the terms, the
backward and the optimiser step under DeepSpeed ZeRO-2, one process). Both sides get the same teacher and student
(BioBERT-base's published shape with random weights, the student its layers 0, 2, ..., 10: weights do not change
the time, and compute nodes often cannot download them), the same batches of 8 x 256 tokens, masked as each side
masks them, in fp32 on this CPU, on the same threads. Steps run in alternating blocks (``--block`` of ours, then as
many of theirs), so a host that slows down slows both alike; the report is the median step of each and their ratio.

``--teacher-dtype bf16`` runs our teacher as the engine runs a frozen teacher on a GPU (``teacher.dtype: bf16``;
on a CPU that "auto" leaves in fp32), which pays where the CPU multiplies bf16 natively (AMX, AVX512-BF16); their
side keeps its published fp32 teacher (their TrainingArguments set no half precision). The student trains in fp32
on both sides either way.

    python -m biodistill.engine.bench.authors --steps 8 --block 2 [--teacher-dtype bf16]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import os
import statistics
import tempfile
import time

import torch
from torch import nn

from ..config import load_recipe
from ..models.smoke import smoke


class DistillationWrapper(nn.Module):
    """The authors' wrapper (DistilBioBERT-Distillation.py), its loss as they wrote it."""

    def __init__(self, student, teacher, temperature=2.0, alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0):
        super().__init__()
        self.student, self.teacher, self.temperature = student, teacher, temperature
        self.alpha_ce, self.alpha_mlm, self.alpha_cos = alpha_ce, alpha_mlm, alpha_cos
        self.ce_loss_fct = nn.KLDivLoss(reduction="batchmean")
        self.cosine_loss_fct = nn.CosineEmbeddingLoss(reduction="mean")

    def forward(self, input_ids, attention_mask, labels=None, **kwargs):
        from transformers.modeling_outputs import MaskedLMOutput

        student = self.student(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                               output_hidden_states=True)  # fmt: skip
        s_logits, s_hidden = student["logits"], student["hidden_states"]
        with torch.no_grad():
            teacher = self.teacher(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        t_logits, t_hidden = teacher["logits"], teacher["hidden_states"]
        mask = (labels > -1).unsqueeze(-1).expand_as(s_logits).bool()  # restrict_ce_to_mask
        s_sel = torch.masked_select(s_logits, mask).view(-1, s_logits.size(-1))
        t_sel = torch.masked_select(t_logits, mask).view(-1, s_logits.size(-1))
        loss_ce = self.ce_loss_fct(
            nn.functional.log_softmax(s_sel / self.temperature, dim=-1),
            nn.functional.softmax(t_sel / self.temperature, dim=-1),
        ) * self.temperature**2  # fmt: skip
        loss = self.alpha_mlm * student.loss + self.alpha_ce * loss_ce
        s_last, t_last = s_hidden[-1], t_hidden[-1]
        hidden_mask = attention_mask.unsqueeze(-1).expand_as(s_last).bool()
        dim = s_last.size(-1)
        s_h = torch.masked_select(s_last, hidden_mask).view(-1, dim)
        t_h = torch.masked_select(t_last, hidden_mask).view(-1, dim)
        loss = loss + self.alpha_cos * self.cosine_loss_fct(s_h, t_h, s_h.new(s_h.size(0)).fill_(1))
        return MaskedLMOutput(loss=loss, logits=student.logits)


def authors_step(model: DistillationWrapper, batches, lr: float, warmup: int, total: int, scratch: str):
    """One optimiser step of transformers' Trainer over the wrapper: its training_step, then AdamW and the schedule."""
    import transformers as ts

    args = ts.TrainingArguments(
        os.path.join(scratch, "authors"), per_device_train_batch_size=8, learning_rate=lr, lr_scheduler_type="linear",
        warmup_steps=warmup, weight_decay=0.0, max_steps=total, report_to=[], use_cpu=True, save_strategy="no",
        logging_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = ts.Trainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=total)
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets for one micro-batch a step
    model.train()

    def step():
        trainer.training_step(model, next(batches))
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad()

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/distilbiobert.yaml")
    parser.add_argument("--steps", type=int, default=8, help="timed steps of each side")
    parser.add_argument("--block", type=int, default=2, help="steps of one side before switching")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--teacher-dtype", choices=["fp32", "bf16"], default="fp32", help="our teacher's dtype")
    parser.add_argument("--json", default="", help="write the figures here too")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    from ..trainer import Trainer

    transformers.logging.set_verbosity_error()
    scratch = tempfile.mkdtemp(prefix="biodistill-authors-")
    base = load_recipe(args.config, ["--train.output_dir", scratch], check_paths=False)
    r = smoke(base, full_size=True)  # the published shapes, random weights, the bundled corpus
    r.data = dataclasses.replace(r.data, max_length=args.length)
    r.train = dataclasses.replace(r.train, micro_batch_size=args.micro_batch, grad_accum=1, global_batch_size=0,
                                  precision="fp32", max_steps=10**6, log_every=10**6, export=False)  # fmt: skip
    r.deepspeed = dataclasses.replace(r.deepspeed, tensorboard=False, csv=False)
    r.teacher = dataclasses.replace(r.teacher, dtype=args.teacher_dtype)
    ours = Trainer.from_recipe(r)
    source = ours._batches()
    fixed = [next(source) for _ in range(4)]
    # The same teacher and student on their side: copies of ours before any step (the teacher frozen, as theirs,
    # and in fp32, as they run it).
    teacher = ours.teacher if args.teacher_dtype == "fp32" else copy.deepcopy(ours.teacher).float()
    theirs = DistillationWrapper(copy.deepcopy(ours.student).train(), teacher)
    their_batches = itertools.cycle(
        [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["labels"]} for b in fixed]
    )
    their_step = authors_step(theirs, their_batches, r.optim.lr, r.optim.warmup_steps, 10**6, scratch)
    feed = itertools.cycle(fixed)

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    ours.train_step(feed)  # warm-up: the allocator, first-call paths
    their_step()
    times = {"ours": [], "authors": []}
    while len(times["ours"]) < args.steps:
        times["ours"] += [timed(lambda: ours.train_step(feed)) for _ in range(args.block)]
        times["authors"] += [timed(their_step) for _ in range(args.block)]
    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "recipe": args.config, "micro_batch": args.micro_batch, "length": args.length, "threads": torch.get_num_threads(),
        "teacher_dtype": {"ours": args.teacher_dtype, "authors": "fp32"},
        "steps": args.steps, "seconds": medians, "authors_over_ours": medians["authors"] / medians["ours"],
        "spread": {k: (max(v) - min(v)) / statistics.median(v) for k, v in times.items()},
        "torch": torch.__version__, "transformers": transformers.__version__,
    }  # fmt: skip
    print(f"DistilBioBERT step, {args.micro_batch} x {args.length} tokens, fp32 students, our teacher "
          f"{args.teacher_dtype} (theirs fp32), {result['threads']} threads, "
          f"{args.steps} steps each in blocks of {args.block}")  # fmt: skip
    print(f"  the authors' wrapper under transformers' Trainer  median {medians['authors']:7.2f} s/step")
    print(f"  biodistill (DeepSpeed ZeRO-2, one process)         median {medians['ours']:7.2f} s/step")
    print(f"  authors / biodistill = {result['authors_over_ours']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    ours.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
