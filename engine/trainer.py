"""The distillation loop: frozen teacher forward, student forward/backward under DeepSpeed, step, log,
evaluate, checkpoint, export. The same code runs on one CPU process and on a GPU cluster."""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import socket
import time
from pathlib import Path
from typing import Optional

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from biodistill.engine import checkpoint, data, faults, preflight, streaming
from biodistill.engine.config import ConfigError, Recipe
from biodistill.engine.distributed import deepspeed_config, init_distributed, release_shared_memory
from biodistill.engine.health import Health, JobError
from biodistill.engine.losses import DistillationModel, build_terms
from biodistill.engine.models import NOTHING, Needs, Outputs, encode, hidden_size
from biodistill.engine.prepare import recipe_tokenizer
from biodistill.engine.students import build_student, student_config, teacher_config
from biodistill.engine.teacher import (
    VocabMap,
    load_teacher,
    model_location,
    place_teacher,
    resident_bytes,
    seen_by_terms,
)

log = logging.getLogger("biodistill")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # No decay on biases and norm weights (1-D tensors), as BERT pretraining does.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    def __init__(self, recipe: Recipe, resume: Optional[str] = None):
        self.recipe, self.resume = recipe, resume
        self.dist = init_distributed(recipe.train.collective_timeout)
        self.out = Path(recipe.train.output_dir)
        self.resume_point = self._find_checkpoint()
        seed_everything(recipe.train.seed)  # the same on every rank: random inits must agree before ZeRO
        self._build_models()
        self._build_engine()
        self._build_data()
        seed_everything(recipe.train.seed + self.dist.rank)  # dropout differs across ranks, as it should
        self.step, self.consumed, self.saved_step = 0, 0, None
        # Micro-batches skipped for a non-finite student loss or teacher output: in all, and in a row.
        self.skips, self.skips_in_a_row = {"nonfinite_loss": 0, "teacher_nonfinite": 0}, 0
        self.health: Optional[Health] = None
        self.metrics_log = None

    # ------------------------------------------------------------------------------------ building

    def _build_models(self) -> None:
        r = self.recipe
        # Configs only: the terms' needs decide what the models are loaded with.
        teachers = teacher_config(r)
        students = student_config(r, teachers)
        probe = build_terms(r.losses, students, seen_by_terms(r, teachers, students), r.source)
        student_needs = teacher_needs = Needs()
        for term in probe:
            student_needs, teacher_needs = student_needs | term.student_needs, teacher_needs | term.teacher_needs
        self.teacher = (
            load_teacher(r, teacher_needs, self.dist.device)
            if r.needs_teacher() or r.student.init == "teacher_layers"
            else None
        )
        self.tokenizer = recipe_tokenizer(r)
        self.student = build_student(r, student_needs, self.teacher)
        self.teacher_engine = None
        if not r.needs_teacher():
            self.teacher = None  # only used to initialise the student
        else:  # after the student copied its layers from the whole teacher
            self.teacher, self.teacher_engine = place_teacher(
                self.teacher, r.teacher.placement, r.train.micro_batch_size
            )
        self.vocab_map = None
        if r.teacher.vocab_map:
            from transformers import AutoTokenizer

            teacher_tokenizer = AutoTokenizer.from_pretrained(model_location(r.teacher.path))
            self.vocab_map = VocabMap(self.tokenizer, teacher_tokenizer, self.student.config.vocab_size)
            self.vocab_map.to(self.dist.device)
        seen = seen_by_terms(r, self.teacher.config if self.teacher else None, self.student.config)
        terms = build_terms(r.losses, self.student.config, seen, r.source)
        self.model = DistillationModel(self.student, terms, [t.weight for t in r.losses.terms])

    def _build_engine(self) -> None:
        r = self.recipe
        ds_config = deepspeed_config(r, self.dist.world)
        if self.resume_point is not None:
            tag, job = self.resume_point
            directory = str(self.out / "checkpoints")
            if checkpoint.needs_universal(directory, tag, job, self.dist.world):
                # Written by another world size: re-shard the optimizer states through DeepSpeed's universal format.
                self.resume_point = checkpoint.to_universal(directory, tag), job
                ds_config.setdefault("checkpoint", {})["load_universal"] = True
        optimizer = scheduler = None
        if "optimizer" not in ds_config:
            optimizer = torch.optim.AdamW(
                param_groups(self.model, r.optim.weight_decay),
                lr=r.optim.lr,
                betas=tuple(r.optim.betas),
                eps=r.optim.eps,
            )
        if "scheduler" not in ds_config:

            def scheduler(opt):  # noqa: E306  DeepSpeed calls it with the optimizer it ends up using
                return get_linear_schedule_with_warmup(opt, r.optim.warmup_steps, r.train.max_steps)

        self.engine, _, _, _ = deepspeed.initialize(
            model=self.model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            model_parameters=param_groups(self.model, r.optim.weight_decay) if optimizer is None else None,
            config=ds_config,
        )
        # DeepSpeed resolves batch sizes and precision from whichever config it was given: read them back.
        self.micro_batch = self.engine.train_micro_batch_size_per_gpu()
        self.grad_accum = self.engine.gradient_accumulation_steps()
        self.input_dtype = (
            torch.bfloat16
            if self.engine.bfloat16_enabled()
            else torch.float16
            if self.engine.fp16_enabled()
            else torch.float32
        )

    def _build_data(self) -> None:
        r, d = self.recipe, self.dist
        self.collator = data.MLMCollator(
            self.tokenizer, r.data.mlm_probability, r.data.seed, r.losses.logit_rows, r.data.whole_word_masking
        )
        self.stream, self.stream_state = None, None
        self.ledger = None
        if r.train.sample_log:
            (self.out / "samples").mkdir(parents=True, exist_ok=True)
            self.ledger = open(self.out / "samples" / f"rank{d.rank}.jsonl", "a", encoding="utf-8")
        if r.data.streaming:
            self.stream = streaming.DocumentStream(r.data, self.tokenizer, r.source, d.rank, d.world)
            self.heldout = streaming.heldout_stream_batches(
                r.data, self.tokenizer, r.source, self.collator, self.micro_batch, d.rank, d.world,
                r.train.eval_batches,
            )  # fmt: skip
            self.data_info = {
                "streaming": True,
                "files": len(self.stream.files),
                "files_per_rank": len(self.stream.mine),
            }
            return
        splits, self.data_info = data.prepare(
            r.data, self.tokenizer, r.source, is_builder=d.local_rank == 0, barrier=dist.barrier
        )
        self.train_split = splits["train"]
        self.heldout = data.heldout_batches(
            splits["heldout"], self.collator, self.micro_batch, d.rank, d.world, r.train.eval_batches
        )

    def _batches(self):
        if self.stream is not None:
            if self.stream_state is not None:
                self.stream.load_state(self.stream_state)
            self.batches = streaming.StreamBatches(self.stream, self.collator, self.micro_batch)
            return self.batches
        sampler = data.ShardedBatchSampler(
            len(self.train_split),
            self.micro_batch,
            self.dist.rank,
            self.dist.world,
            self.recipe.data.seed,
            start=self.consumed,
            global_batch=self.micro_batch * self.grad_accum * self.dist.world,
        )
        return iter(data.train_loader(self.train_split, self.collator, sampler))

    # ----------------------------------------------------------------------------------- the step

    def teacher_outputs(self, batch: dict, extra: Needs = NOTHING) -> Outputs:
        if self.teacher is None:
            return Outputs()
        ids = batch["input_ids"] if self.vocab_map is None else self.vocab_map.inputs(batch["input_ids"])
        with torch.no_grad():
            out = encode(
                self.teacher,
                ids,
                batch["attention_mask"],
                self.model.teacher_needs | extra,
                batch["rows"],
            )
        # Loss terms read teacher tensors in fp32; the fp16 teacher's outputs are upcast once here.
        out = Outputs(
            *(
                None if x is None else tuple(t.float() for t in x) if isinstance(x, tuple) else x.float()
                for x in (out.hidden_states, out.attentions, out.logits)
            )
        )
        if out.logits is not None and self.vocab_map is not None:
            out.logits = self.vocab_map.logits(out.logits)
        return out

    def train_step(self, batches) -> torch.Tensor:
        """One optimiser step over ``grad_accum`` micro-batches; returns [loss, *terms, tokens] summed over
        them. A micro-batch whose loss or teacher outputs are not finite on any rank is skipped by every
        rank (no backward) and another is drawn in its place."""
        totals = torch.zeros(len(self.model.terms) + 2)
        micro, step = 0, self.step + 1
        while micro < self.grad_accum:
            self.health.mark(step, f"micro-batch {micro}")
            batch = next(batches)
            self.consumed += 1
            if self.ledger is not None:
                self._record(batch, micro)
            names = {k: batch[k] for k in ("sample_epochs", "sample_ids") if k in batch}
            batch = {k: v.to(self.dist.device, non_blocking=True) for k, v in batch.items()}
            teacher = self.teacher_outputs(batch)
            if teacher.logits is not None:
                teacher.logits = faults.poison("teacher.outputs", teacher.logits, step)
            loss, values, _ = self.engine(batch, teacher)
            loss = faults.poison("train.loss", loss, step)
            if self._skip_nonfinite(loss, teacher, names):
                continue
            faults.hit("train.micro", step)
            self.health.mark(step, f"backward {micro}")
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed steps the optimiser only at the accumulation boundary
            totals += torch.cat(
                [loss.detach().float().reshape(1), values, batch["attention_mask"].sum().reshape(1)]
            ).cpu()
            micro += 1
        faults.hit("train.step", step)
        return totals

    def _skip_nonfinite(self, loss: torch.Tensor, teacher: Outputs, names: dict) -> bool:
        """True when any rank's loss or teacher outputs hold inf/NaN: then every rank skips the micro-batch.

        Skipping must be unanimous, or the replicas' gradient reductions would no longer pair up: one tiny
        all-reduce per micro-step, and a host-device sync (the flags decide what the host does next).
        """
        d, r = self.dist, self.recipe
        flags = torch.zeros(d.world, 2, device=d.device)
        flags[d.rank, 0] = (~torch.isfinite(loss.detach())).any().float()
        flags[d.rank, 1] = _nonfinite(teacher).float()
        dist.all_reduce(flags)
        flags = flags.cpu().bool()
        if not flags.any():
            self.skips_in_a_row = 0
            return False
        kind = "teacher_nonfinite" if flags[:, 1].any() else "nonfinite_loss"
        what = "teacher outputs (an fp16 teacher overflowing?)" if kind == "teacher_nonfinite" else "student loss"
        self.skips[kind] += 1
        self.skips_in_a_row += 1
        ranks = flags.any(1).nonzero().flatten().tolist()
        mine = _batch_name(names)
        if flags[d.rank].any():
            log.warning(
                "rank %d: step %d: non-finite %s on %s; micro-batch skipped on every rank (%d in a row, %d in all)",
                d.rank, self.step + 1, what, mine, self.skips_in_a_row, sum(self.skips.values()),
            )  # fmt: skip
        if self.skips_in_a_row >= r.train.max_consecutive_skips:
            batches = [None] * d.world
            dist.all_gather_object(batches, mine)
            raise JobError(
                f"step {self.step + 1}: {self.skips_in_a_row} micro-batches in a row had a non-finite {what} "
                f"(train.max_consecutive_skips = {r.train.max_consecutive_skips}); the last on "
                + ", ".join(f"rank {i}: {batches[i]}" for i in ranks)
            )
        return True

    def fit(self) -> dict:
        r, d = self.recipe, self.dist
        self.health = Health(d.rank, d.world, r.train.collective_timeout).start()
        if d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.metrics_log = open(self.out / "metrics.jsonl", "a", encoding="utf-8")
        if self.resume_point is not None:
            self._load()
        before = self.evaluate()
        self._report_eval("before", before)
        batches = self._batches()
        window, window_start = torch.zeros(len(self.model.terms) + 2), time.perf_counter()
        bar = tqdm(
            total=r.train.max_steps, initial=self.step, disable=not d.is_main, desc="distilling", dynamic_ncols=True
        )
        step_seconds = []
        while self.step < r.train.max_steps:
            started = time.perf_counter()
            window += self.train_step(batches)
            step_seconds.append(time.perf_counter() - started)
            self.step += 1
            self.health.mark(self.step, "done")
            bar.update(1)
            if self.step % r.train.log_every == 0 or self.step == r.train.max_steps:
                self._log(window, time.perf_counter() - window_start, bar)
                window, window_start = torch.zeros_like(window), time.perf_counter()
            if r.train.eval_every and self.step % r.train.eval_every == 0 and self.step < r.train.max_steps:
                self._write("eval", self.evaluate())
            if r.train.save_every and self.step % r.train.save_every == 0 and self.step < r.train.max_steps:
                self.save()
        bar.close()
        after = self.evaluate()
        self._report_eval("after", after)
        self.save()
        summary = {
            "steps": self.step,
            "before": before,
            "after": after,
            "data": self.data_info,
            "job": {
                "world_size": d.world,
                "micro_batch_size": self.micro_batch,
                "grad_accum": self.grad_accum,
                "zero_stage": self.engine.zero_optimization_stage(),
                "dtype": str(self.input_dtype).removeprefix("torch."),
                "teacher_placement": r.teacher.placement if self.teacher is not None else None,
            },
            "ranks": self._resources(step_seconds),
            "skipped": {**self.skips, "fp16_overflow_steps": self.engine.skipped_steps},
        }
        if r.train.export:
            summary["export"] = self.export()
        if d.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
            tqdm.write(format_report(before, after))
        return summary

    def _record(self, batch: dict, micro: int) -> None:
        """One ledger line per micro-batch: which sequences (epoch, index) this rank trained on."""
        pairs = zip(batch["sample_epochs"].tolist(), batch["sample_ids"].tolist())
        line = {"step": self.step + 1, "micro": micro, "samples": [[e, i] for e, i in pairs]}
        self.ledger.write(json.dumps(line) + "\n")

    def _resources(self, step_seconds: list[float]) -> list[dict]:
        """Per rank: peak memory, teacher parameter bytes held, step time (median, after the first step)."""
        timed = sorted(step_seconds[1:] or step_seconds)
        mine = {
            "rank": self.dist.rank,
            "local_rank": self.dist.local_rank,
            "host": socket.gethostname(),
            "threads": torch.get_num_threads(),
            "student_sha256": checkpoint.weights_digest(self.engine, self.student),
            "rss_mib": _rss_mib(),  # now, after training: what the job holds in its steady state
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux reports KiB
            "peak_device_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
            "teacher_param_mib": resident_bytes(self.teacher) / 2**20 if self.teacher is not None else 0.0,
            "step_seconds": timed[len(timed) // 2] if timed else None,
        }
        ranks = [None] * self.dist.world
        dist.all_gather_object(ranks, mine)
        digests = {r["student_sha256"] for r in ranks}
        if len(digests) > 1:  # a replica that drifted (a rank-dependent bug, a flaky device) spoils the export
            groups = {d: [r["rank"] for r in ranks if r["student_sha256"] == d] for d in digests}
            raise RuntimeError(f"student weights differ across ranks after step {self.step}: {list(groups.values())}")
        return ranks

    # -------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss terms and teacher-student agreement, averaged over every rank's batches."""
        self.engine.eval()
        terms = [f"loss/{n}" for n in self.model.term_names]
        names = ["loss/total", *terms, "agreement/hidden_cosine", "agreement/top1", "student/mlm_loss"]
        sums, counts = torch.zeros(len(names)), torch.zeros(len(names))
        for i, batch in enumerate(self.heldout):
            if self.health is not None:
                self.health.mark(self.step, f"evaluation batch {i}")
            faults.hit("eval.batch", self.step)
            batch = {k: v.to(self.dist.device) for k, v in batch.items()}
            teacher = self.teacher_outputs(batch, Needs(hidden_states=True))
            loss, values, student = self.engine(batch, teacher, Needs(hidden_states=True))
            extra = self._agreement(batch, student, teacher)
            row = torch.cat([loss.detach().float().reshape(1).cpu(), values.cpu(), extra])
            sums += torch.nan_to_num(row)
            counts += ~row.isnan()
        self.engine.train()
        stats = torch.cat([sums, counts])
        dist.all_reduce(stats)
        sums, counts = stats.chunk(2)
        return {n: (s / c).item() for n, s, c in zip(names, sums, counts) if c > 0}

    def _agreement(self, batch: dict, student: Outputs, teacher: Outputs) -> torch.Tensor:
        nan = float("nan")
        cosine = top1 = mlm = nan
        if teacher.hidden_states is not None and hidden_size(self.student.config) == hidden_size(self.teacher.config):
            mask = batch["attention_mask"].bool()
            cosine = (
                F.cosine_similarity(student.hidden_states[-1][mask].float(), teacher.hidden_states[-1][mask], dim=-1)
                .mean()
                .item()
            )
        if student.logits is not None and teacher.logits is not None and len(batch["rows"]):
            top1 = (student.logits.argmax(-1) == teacher.logits.argmax(-1)).float().mean().item()
        if student.logits is not None and (batch["row_labels"] != -100).any():
            mlm = F.cross_entropy(student.logits.float(), batch["row_labels"], ignore_index=-100).item()
        return torch.tensor([cosine, top1, mlm])

    # ---------------------------------------------------------------------------------- reporting

    def _log(self, window: torch.Tensor, seconds: float, bar) -> None:
        window = window.clone()
        dist.all_reduce(window)  # one collective per log interval, not per step
        micro_steps = self.grad_accum * self.recipe.train.log_every * self.dist.world
        tokens = window[-1].item()
        means = (window[:-1] / micro_steps).tolist()
        metrics = {
            "loss": means[0],
            **dict(zip(self.model.term_names, means[1:])),
            "lr": self.engine.get_lr()[0],
            "tokens_per_s": tokens / max(seconds, 1e-9),
            **{f"skipped/{k}": v for k, v in self.skips.items()},
            "skipped/fp16_overflow_steps": self.engine.skipped_steps,  # DeepSpeed's loss-scale skips
        }
        self._write("train", metrics)
        skipped = sum(self.skips.values())
        shown = {"skipped": skipped} if skipped else {}
        bar.set_postfix(loss=f"{means[0]:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}", **shown, refresh=False)

    def _write(self, prefix: str, metrics: dict[str, float]) -> None:
        if self.engine.monitor.enabled:
            self.engine.monitor.write_events([(f"{prefix}/{k}", v, self.step) for k, v in metrics.items()])
        if self.metrics_log is not None:  # exact values (JSON floats round-trip), one line per event
            self.metrics_log.write(json.dumps({"step": self.step, "split": prefix, **metrics}) + "\n")
            self.metrics_log.flush()

    def _report_eval(self, when: str, metrics: dict[str, float]) -> None:
        self._write(f"eval_{when}", metrics)
        if self.dist.is_main:
            shown = "  ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            tqdm.write(f"[biodistill] held-out {when} (step {self.step}): {shown}")

    # ------------------------------------------------------------------------ checkpoints, export

    def save(self) -> None:
        if self.saved_step == self.step:  # resumed at this step and trained no further: nothing new to save
            return
        self.health.mark(self.step, "save")
        stream = self.batches.state() if self.stream is not None else None
        counters = {"skips": self.skips, "skips_in_a_row": self.skips_in_a_row}
        checkpoint.save(
            self.engine, str(self.out / "checkpoints"), self.step, self.consumed, self.recipe.to_dict(),
            extra=counters, data_state=stream, keep=self.recipe.train.keep_checkpoints,
        )  # fmt: skip
        self.saved_step = self.step
        self.health.mark(self.step, "saved")

    def _find_checkpoint(self) -> Optional[tuple[str, dict]]:
        """The checkpoint ``--resume`` names (or the latest), checked before anything is built."""
        directory = self.out / "checkpoints"
        found = preflight.resume_point(self.recipe, self.resume)
        if found is None:
            if self.resume is not None and self.dist.is_main:
                tqdm.write(f"[biodistill] --resume: no checkpoint in {directory}; starting from step 0")
            return None
        tag, job = found
        if self.recipe.data.streaming and job["world_size"] != self.dist.world:
            raise ConfigError(
                "--resume", "data.streaming",
                f"{directory / tag} was written by {job['world_size']} ranks; a stream's per-rank position "
                f"resumes only on the same world size, not {self.dist.world} (prepare a cache to change it)",
            )  # fmt: skip
        return found

    def _load(self) -> None:
        directory = self.out / "checkpoints"
        tag, job = self.resume_point
        global_batch = self.micro_batch * self.grad_accum * self.dist.world
        written = job["micro_batch_size"] * job["grad_accum"] * job["world_size"]
        if global_batch != written:
            raise ConfigError(
                "--resume", "train.global_batch_size",
                f"{directory / tag} was written with a global batch of {written} sequences "
                f"({job['micro_batch_size']} x {job['grad_accum']} accumulation x {job['world_size']} ranks); this job's "
                f"is {global_batch}: set train.global_batch_size {written} so no sequence is skipped or repeated",
            )  # fmt: skip
        client = checkpoint.load(self.engine, str(directory), tag)
        self.step = self.saved_step = job["step"]
        self.skips = dict(client.get("skips", self.skips))
        self.skips_in_a_row = client.get("skips_in_a_row", 0)
        # The position is kept in sequences: on another world size it is another count of micro-batches.
        self.consumed = job["consumed_samples"] // (self.micro_batch * self.dist.world)
        if self.stream is not None:
            states = client.get("data") or [None]
            if states[self.dist.rank] is None:
                raise ConfigError(
                    "--resume", "data.streaming",
                    f"{directory / tag} has no stream position for rank {self.dist.rank}: it was not written by a streaming job",
                )  # fmt: skip
            self.stream_state = states[self.dist.rank]
        if self.dist.is_main:
            moved = f" (written by {job['world_size']} ranks)" if job["world_size"] != self.dist.world else ""
            tqdm.write(f"[biodistill] resumed from {directory / tag} at step {self.step}{moved}")

    def export(self) -> Optional[str]:
        """Export the student (without the loss terms' projections) and check the files reload exactly."""
        self.health.mark(self.step, "export")
        faults.hit("export.begin", self.step)
        state = checkpoint.gathered_state_dict(self.engine, self.student)
        path = None
        if self.dist.is_main:
            path = checkpoint.export(state, self.student, self.tokenizer, str(self.out / "student"))
            reloaded = type(self.student).from_pretrained(path).state_dict()
            worst = max((reloaded[k].float() - v.float()).abs().max().item() for k, v in state.items() if k in reloaded)
            missing = [k for k in state if k not in reloaded]
            if missing or worst != 0:
                raise RuntimeError(
                    f"exported student at {path} does not reload exactly (max diff {worst}, missing {missing[:3]})"
                )
            tqdm.write(
                f"[biodistill] student exported to {path}: reloaded with from_pretrained, {len(state)} tensors identical"
            )
        dist.barrier()
        return str(path) if path else None

    def close(self) -> None:
        for f in (self.ledger, self.metrics_log):
            if f is not None:
                f.close()
        if self.health is not None:
            self.health.stop()
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            release_shared_memory()


def _nonfinite(outputs: Outputs) -> torch.Tensor:
    """True (a 0-d tensor on the outputs' device, no sync) when any of the teacher's outputs holds inf or NaN."""
    groups = (outputs.hidden_states, outputs.attentions, outputs.logits)
    tensors = [t for x in groups if x is not None for t in (x if isinstance(x, tuple) else (x,))]
    if not tensors:
        return torch.tensor(False)
    return torch.stack([~torch.isfinite(t).all() for t in tensors]).any()


def _batch_name(names: dict) -> str:
    if "sample_ids" not in names:
        return "a batch of the stream"
    return f"the batch of epoch {names['sample_epochs'].tolist()[0]} sequences {names['sample_ids'].tolist()}"


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def format_report(before: dict[str, float], after: dict[str, float]) -> str:
    """The held-out table printed at the end: each metric before and after distillation."""
    lines = ["", "held-out teacher-student comparison   before      after", "-" * 58]
    for key in before:
        better = "higher is better" if key.startswith("agreement") else "lower is better"
        lines.append(f"{key:<36}{before[key]:>8.4f} {after.get(key, float('nan')):>10.4f}   ({better})")
    return "\n".join(lines)
