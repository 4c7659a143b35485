"""The distillation loop: frozen teacher forward, student forward/backward under DeepSpeed, step, log,
evaluate, checkpoint, export. The same code runs on one CPU process and on a GPU cluster.

The :class:`Trainer` is the loop (build, step, log, evaluate, save, preempt, export). One distillation forward,
teacher and student and terms, is the :class:`~biodistill.engine.distiller.Distiller` it builds and DeepSpeed
trains; held-out evaluation is that object's method too. What the trainer reports lives in ``runtime/report.py``,
how it finds and restores a checkpoint in ``runtime/resume.py``.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Optional

import deepspeed
import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import AutoTokenizer, get_linear_schedule_with_warmup

from .config import Recipe, model_location
from .data import batches, cache, stream
from .data.tokenise import VocabMap, recipe_tokenizer
from .distiller import Distiller
from .models.card import model_card
from .models.students import build_student
from .models.teacher import load_teacher, place_teacher, resident_bytes
from .plan import Plan, make_plan
from .runtime import checkpoint, faults, hub, preempt, report
from .runtime.distributed import init_distributed, release_shared_memory
from .runtime.health import Health
from .runtime.resume import Position, find_checkpoint, load_checkpoint, tag_to_load
from .runtime.seeds import seed_everything
from .runtime.skips import SkipGuard
from .task.examples import TaskCollator, TaskView
from .task.stored import all_ready, store_task_outputs

log = logging.getLogger("biodistill")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # No decay on biases and norm weights (1-D tensors), as BERT pretraining does.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    """The loop over one resolved job (:class:`~biodistill.engine.plan.Plan`): it builds what the plan says and
    resolves nothing again. ``Trainer.from_recipe`` plans and builds in one call."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.recipe = recipe = plan.recipe  # every "auto" already concrete for this device
        self.dist = init_distributed(recipe.train.collective_timeout)
        if self.dist.world != plan.world:  # the plan's batch arithmetic and DeepSpeed config assume its world
            raise RuntimeError(f"the job was planned for {plan.world} ranks (the launcher's WORLD_SIZE) and joined "
                               f"a process group of {self.dist.world}")  # fmt: skip
        self.preemption = preempt.current()  # installed by the CLI: a signal saves and exits "resume me"
        if self.preemption is not None:
            self.preemption.attach(dist.distributed_c10d._get_default_store(), self.dist.rank)
        hub.agree()  # every rank loads the same way: offline if any rank cannot reach the hub
        faults.hit("train.start", 0)  # every rank is past the process group's set-up (a collective just ran)
        self.out = Path(recipe.train.output_dir)
        self.checkpoints = self.out / "checkpoints"
        self.resume_point = find_checkpoint(recipe, plan.resume, plan.resume_point, self.dist)
        if self.dist.rank == 0:
            for note in plan.attention:  # which path each attention term takes, and what it holds
                log.warning(note)
        seed_everything(recipe.train.seed)  # the same on every rank: random inits must agree before ZeRO
        self._build_models()
        self._build_engine()
        self._build_data()
        seed_everything(recipe.train.seed + self.dist.rank)  # dropout differs across ranks, as it should
        # step, micro-batches consumed, and micro-batches skipped for a non-finite loss or teacher output
        self.pos, self.saved_step = Position(), None
        # Both on the device, read at log points: the window's [loss, *terms, tokens, kept micro-batches]
        # and the skip verdicts (with the gradient gate on every trainable parameter).
        self.window = torch.zeros(len(self.model.terms) + 3, device=self.dist.device)
        self.guard = SkipGuard(
            self.engine.module.parameters(), self.dist.rank, self.dist.world, self.dist.device,
            capacity=self.grad_accum * recipe.train.log_every,
        )  # fmt: skip
        self.health: Optional[Health] = None
        self.report: Optional[report.Reporter] = None

    # ------------------------------------------------------------------------------------ building

    @classmethod
    def from_recipe(cls, recipe: Recipe, resume: Optional[str] = None) -> Trainer:
        """Plan ``recipe`` (the start-up checks) and build its trainer."""
        return cls(make_plan(recipe, resume))

    def _build_models(self) -> None:
        r, p = self.recipe, self.plan
        # What the models are loaded with follows from the terms' needs, decided in the plan. The teacher's weights
        # are read when it runs in the step, seeds a student of its layers, or has task outputs still to store.
        to_store = p.task is not None and p.task.stored is not None and not all_ready(p, self.dist.device)
        self.teacher = (
            load_teacher(r, p.teacher_needs, self.dist.device, p.teacher_path)
            if p.live_teacher or r.student.init == "teacher_layers" or to_store
            else None
        )
        self.tokenizer = recipe_tokenizer(r)
        self.student = build_student(r, p.student_needs, self.teacher, p.student_config)
        self.stored = None
        if p.task is not None and p.task.stored is not None:
            self.stored = store_task_outputs(p, self.teacher if to_store else None, self.tokenizer, self.dist)
        self.teacher_engine = None
        if not p.live_teacher:
            self.teacher = None  # only used to initialise the student, or to store its task outputs
        else:  # after the student copied its layers from the whole teacher
            self.teacher, self.teacher_engine = place_teacher(
                self.teacher, r.teacher.placement, r.train.micro_batch_size
            )
        vocab_map = None
        if r.teacher.vocab_map:
            teacher_tokenizer = AutoTokenizer.from_pretrained(model_location(r.teacher.path))
            vocab_map = VocabMap(self.tokenizer, teacher_tokenizer, self.student.config.vocab_size).to(self.dist.device)
        self.model = Distiller(self.student, p.terms, p.weights, self.teacher, vocab_map)

    def _build_engine(self) -> None:
        r = self.recipe
        ds_config = copy.deepcopy(self.plan.ds_config)
        if self.resume_point is not None:
            tag, job = self.resume_point
            self.resume_point = tag_to_load(self.checkpoints, tag, job, self.dist.world, ds_config), job
        if self.dist.is_main:  # the config this job runs with, every "auto" resolved
            self.out.mkdir(parents=True, exist_ok=True)
            checkpoint.write_atomic(self.out / "deepspeed_config.json", json.dumps(ds_config, indent=2))
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
        self.stream, self.ledger = None, None
        if r.train.sample_log:
            (self.out / "samples").mkdir(parents=True, exist_ok=True)
            self.ledger = open(self.out / "samples" / f"rank{d.rank}.jsonl", "a", encoding="utf-8")
        if self.plan.task is not None:
            return self._build_task_data()
        self.collator = batches.MLMCollator(
            self.tokenizer, r.data.mlm_probability, r.data.seed, r.losses.logit_rows, r.data.whole_word_masking
        )
        if r.data.streaming:
            self.stream = stream.DocumentStream(r.data, self.tokenizer, r.where("data.train_files"), d.rank, d.world)
            self.heldout = stream.heldout_stream_batches(
                r.data, self.tokenizer, r.where("data.train_files"), self.collator, self.micro_batch, d.rank, d.world,
                r.train.eval_batches,
            )  # fmt: skip
            self.data_info = {
                "streaming": True,
                "files": len(self.stream.files),
                "files_per_rank": len(self.stream.mine),
            }
            return
        splits, self.data_info = cache.prepare(
            r.data, self.tokenizer, r.where("data.train_files"), is_builder=d.local_rank == 0, barrier=dist.barrier
        )
        self.train_split = splits["train"]
        self.heldout = batches.heldout_batches(
            splits["heldout"], self.collator, self.micro_batch, d.rank, d.world, r.train.eval_batches
        )

    def _build_task_data(self) -> None:
        """A task recipe's examples: train (labelled, then unlabeled) sampled as corpus sequences are, dev held out."""
        r, d, task = self.recipe, self.dist, self.plan.task
        self.collator = TaskCollator(self.tokenizer, task.per_token, self.stored)
        self.train_split = TaskView(task.examples.train)
        heldout = TaskView(task.examples.heldout, offset=len(task.examples.train))
        self.heldout = batches.heldout_batches(heldout, self.collator, self.micro_batch, d.rank, d.world,
                                               r.train.eval_batches)  # fmt: skip
        self.data_info = {"task": task.examples.describe(), "train_examples": len(self.train_split),
                          "heldout_examples": len(heldout)}  # fmt: skip

    def _batches(self):
        if self.stream is not None:
            if self.pos.stream_state is not None:
                self.stream.load_state(self.pos.stream_state)
            self.stream_batches = stream.StreamBatches(self.stream, self.collator, self.micro_batch)
            return self.stream_batches
        sampler = batches.ShardedBatchSampler(
            len(self.train_split),
            self.micro_batch,
            self.dist.rank,
            self.dist.world,
            self.recipe.data.seed,
            start=self.pos.consumed,
            global_batch=self.micro_batch * self.grad_accum * self.dist.world,
        )
        return iter(batches.train_loader(self.train_split, self.collator, sampler))

    # ----------------------------------------------------------------------------------- the step

    def train_step(self, loader) -> None:
        """One optimiser step over ``grad_accum`` micro-batches, adding [loss, *terms, tokens, kept] into
        ``self.window`` on the device. Nothing here waits on the device: a micro-batch whose loss or
        teacher outputs are not finite on any rank has its gradients zeroed on every rank by a verdict
        taken on the device (runtime/skips.py), which the host reads at log and save points."""
        step = self.pos.step + 1
        for micro in range(self.grad_accum):
            self._mark(step, f"micro-batch {micro}")
            batch = next(loader)
            self.pos.consumed += 1
            if self.ledger is not None:
                self._record(batch, micro)
            names = {k: batch[k] for k in ("sample_epochs", "sample_ids") if k in batch}  # host tensors
            batch = batches.to_device(batch, self.dist.device, non_blocking=True)
            loss, values, teacher_nonfinite, _, _ = self.engine(batch, step=step)  # the Distiller's one forward
            loss = faults.poison("train.loss", loss, step)
            keep = self.guard.check(loss, teacher_nonfinite, step, micro, names)
            faults.hit("train.micro", step)
            self._mark(step, f"backward {micro}")
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed steps the optimiser only at the accumulation boundary
            if micro == self.grad_accum - 1:
                faults.poison_weights("train.weights", self.student.parameters(), step)
            totals = torch.cat([loss.detach().float().reshape(1), values, batch["attention_mask"].sum().reshape(1)])
            self.window[:-1] += torch.where(keep, totals, 0)  # where: a skipped NaN loss times 0 is still NaN
            self.window[-1] += keep.float()
        faults.hit("train.step", step)

    def _flush_skips(self) -> None:
        """The device's skip verdicts since the last flush, read on the host (log, save and end points)."""
        self.guard.flush(self.pos, self.recipe.train.max_consecutive_skips, _batch_name)

    def fit(self) -> dict:
        r, d = self.recipe, self.dist
        self.health = Health(d.rank, d.world, r.train.collective_timeout).start()
        self.report = report.Reporter(self.engine, d, self.out, self.model.term_names)
        if self.resume_point is not None:
            self._load()
        pos = self.pos  # the restored position when resumed
        before = self.evaluate()
        self.report.heldout("before", before, pos.step)
        train_batches = self._batches()
        window_start = time.perf_counter()
        bar = tqdm(
            total=r.train.max_steps, initial=pos.step, disable=not d.is_main, desc="distilling", dynamic_ncols=True
        )
        step_seconds = []
        self._enter("train")
        while pos.step < r.train.max_steps:
            started = time.perf_counter()
            self.train_step(train_batches)
            step_seconds.append(time.perf_counter() - started)
            pos.step += 1
            self._mark(pos.step, "done")
            bar.update(1)
            if pos.step % r.train.log_every == 0 or pos.step == r.train.max_steps:
                self._mark(pos.step, "log")
                self._flush_skips()
                self.report.train(pos.step, self.window, time.perf_counter() - window_start, pos.skips, bar)
                self.window.zero_()
                window_start = time.perf_counter()
            if r.train.eval_every and pos.step % r.train.eval_every == 0 and pos.step < r.train.max_steps:
                if (metrics := self.evaluate()) is not None:  # None: cut short by a preemption
                    self.report.write("eval", metrics, pos.step)
            if r.train.save_every and pos.step % r.train.save_every == 0 and pos.step < r.train.max_steps:
                self.save()
            if self._stop_here(f"step/{pos.step}", boundary=True):
                bar.close()
                self._save_preempted()
        bar.close()
        self._enter("final")
        self._flush_skips()
        after = self.evaluate()
        self.report.heldout("after", after, pos.step)
        self.save()
        teacher_bytes = resident_bytes(self.teacher) if self.teacher is not None else 0
        summary = {
            "steps": pos.step,
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
            "ranks": report.resources(self.engine, self.student, pos.step, step_seconds, teacher_bytes, d),
            "attention_terms": self.plan.attention,
            "plan": self.plan.summary(),
            "skipped": {**pos.skips, "fp16_overflow_steps": self.engine.skipped_steps},
        }
        if r.train.export:
            summary["export"] = self.export({"before": before, "after": after})
        report.write_summary(self.out, summary, d)
        return summary

    def evaluate(self) -> Optional[dict[str, float]]:
        """The Distiller's held-out metrics through the engine in eval mode; None when a preemption cut it short."""
        self.engine.eval()
        try:
            return self.model.heldout(self.engine, self.heldout, self.dist.device, self._before_heldout_batch)
        finally:
            self.engine.train()

    def _before_heldout_batch(self, i: int) -> bool:
        if self._stop_here(f"eval/{self.pos.step}/{i}"):  # every rank breaks at the same batch
            return True
        self._mark(self.pos.step, f"evaluation batch {i}")
        faults.hit("eval.batch", self.pos.step)
        return False

    # ------------------------------------------------------------------------------------ preemption

    def _enter(self, phase: str) -> None:
        if self.preemption is not None:
            self.preemption.enter(phase, self.pos.step)

    def _stop_here(self, point: str, boundary: bool = False) -> bool:
        """Whether every rank stops here for a preemption (runtime/preempt.py); only inside the loop."""
        p = self.preemption
        return p is not None and p.phase == "train" and p.stop_here(point, boundary)

    def _save_preempted(self) -> None:
        """The ranks agreed to stop: write the step reached, through the same atomic save, and unwind."""
        self._mark(self.pos.step, "preempted")
        started, tag = time.perf_counter(), None if self.saved_step == self.pos.step else f"step{self.pos.step}"
        self.save()
        self.preemption.checkpoint_written()
        raise preempt.Preempted(tag, self.pos.step, time.perf_counter() - started)

    def _mark(self, step: int, what: str) -> None:
        if self.preemption is not None:
            self.preemption.step = step  # what a signal's message names
        if self.health is not None:  # the watchdog runs from fit(); a benchmark may step without it
            self.health.mark(step, what)

    def _record(self, batch: dict, micro: int) -> None:
        """One ledger line per micro-batch: which sequences (epoch, index) this rank trained on."""
        pairs = zip(batch["sample_epochs"].tolist(), batch["sample_ids"].tolist())
        line = {"step": self.pos.step + 1, "micro": micro, "samples": [[e, i] for e, i in pairs]}
        self.ledger.write(json.dumps(line) + "\n")

    # ------------------------------------------------------------------------ checkpoints, export

    def save(self) -> None:
        step = self.pos.step
        if self.saved_step == step:  # resumed at this step and trained no further: nothing new to save
            return
        self._mark(step, "save")
        self._flush_skips()  # the counts the checkpoint carries
        stream_state = self.stream_batches.state() if self.stream is not None else None
        counters = {"skips": self.pos.skips, "skips_in_a_row": self.pos.skips_in_a_row}
        checkpoint.save(
            self.engine, str(self.checkpoints), step, self.pos.consumed, self.recipe.to_dict(),
            extra=counters, data_state=stream_state, keep=self.recipe.train.keep_checkpoints,
        )  # fmt: skip
        self.saved_step = step
        self._mark(step, "saved")

    def _load(self) -> None:
        tag, job = self.resume_point
        self.pos = load_checkpoint(
            self.engine, self.checkpoints, tag, job, self.micro_batch, self.grad_accum, self.dist,
            streaming=self.stream is not None, position=self.pos,
        )  # fmt: skip
        self.saved_step = self.pos.step
        _current_lr(self.engine.lr_scheduler)

    def export(self, heldout: Optional[dict] = None) -> Optional[str]:
        """Export the student (without the loss terms' projections) with its model card, and check the files
        reload exactly. ``heldout``: the held-out figures before and after, for the card."""
        self._mark(self.pos.step, "export")
        faults.hit("export.begin", self.pos.step)
        checkpoint.refuse_nonfinite(self.student, self.pos.step, self.checkpoints, f"export {self.out / 'student'}")
        state = checkpoint.gathered_state_dict(self.engine, self.student)
        path = None
        if self.dist.is_main:
            record = self._record_of()
            card = model_card(record, self.student.config, self.plan.parameters, self.recipe.student.mlm_head, heldout)
            path = checkpoint.export(state, self.student, self.tokenizer, str(self.out / "student"), record, card)
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

    def _record_of(self) -> dict:
        """What the exported student was distilled from and how (its distillation.json)."""
        r = self.recipe
        return {
            "recipe": r.name,
            "recipe_file": r.source,
            "teacher": r.teacher.path,
            "student": {"init": r.student.init, "teacher_layers": r.student.teacher_layers, "path": r.student.path},
            "losses": r.to_dict()["losses"],
            "data": {"train_files": r.data.train_files, "dataset": r.data.dataset, "max_length": r.data.max_length},
            "task": self.plan.task.summary() if self.plan.task is not None else None,
            "steps": self.pos.step,
            "global_batch": self.micro_batch * self.grad_accum * self.dist.world,
            "precision": str(self.input_dtype).removeprefix("torch."),
        }

    def close(self) -> None:
        for f in (self.ledger, self.report, self.guard):
            if f is not None:
                f.close()
        if self.health is not None:
            self.health.stop()
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            release_shared_memory()


def _batch_name(names: dict) -> str:
    if "sample_ids" not in names:
        return "a batch of the stream"
    return f"the batch of epoch {names['sample_epochs'].tolist()[0]} sequences {names['sample_ids'].tolist()}"


def _current_lr(scheduler) -> None:
    """Set the optimizer's learning rates to what ``scheduler`` gives at the step it was restored to. A checkpoint
    restores the rates the old schedule had reached (its last one, 0, at the end of a linear decay), while the
    scheduler computes the next ones from this recipe's schedule (a longer train.max_steps): without this, the first
    resumed step would run at the old rate. With the same schedule it sets the very value the state held."""
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        for group, base, rule in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * rule(scheduler.last_epoch)
