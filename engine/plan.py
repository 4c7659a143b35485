"""The start-up checks, and the one resolved job they return.

:func:`make_plan` runs every check that needs no weights, no process group and no GPU kernel, each failure a
ConfigError naming the key at fault: the world first (paths, writable directories, the resume target, an offline
node's cache), then the corpus formats, then the models' configs (copied layers, position limits, the student a
family can build), the precision this device trains in, the DeepSpeed config, every loss term and its layer map,
the tokenizers, and room on disk for a checkpoint. What it checked is what it returns: a :class:`Plan` holding
the recipe with every "auto" made concrete, both models' configs, the loss terms (built once, here), what each
model must output, the final DeepSpeed dict, the attention memory notes and the data plan. ``Trainer(plan)``
builds from it and resolves nothing again; ``summary.json`` records it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

from .config import Recipe, data_files, resolve_precision
from .losses import LossTerm, attention_notes, build_terms, validate_terms
from .models.outputs import Needs, hidden_size

if TYPE_CHECKING:
    from .task.plan import TaskPlan


@dataclass
class Plan:
    recipe: Recipe  # train.precision and teacher.dtype concrete for this device (the JSON's, where it decides)
    device_type: str  # "cuda" or "cpu": what the accelerator will be
    world: int  # the world size the launcher set
    teacher_config: Any  # None without a teacher
    student_config: Any
    terms: list[LossTerm]  # built once, seeded by train.seed: they move into the Distiller
    student_needs: Needs
    teacher_needs: Needs
    ds_config: dict  # what deepspeed.initialize gets (a resume on another world size adds load_universal)
    parameters: int  # the student's
    resume: Optional[str] = None  # --resume as given: None without it, "" for the latest, else a tag
    resume_point: Optional[tuple[str, dict]] = None  # (tag, job) of the checkpoint it continues
    attention: list[str] = field(default_factory=list)  # one line per attention term: path, why, memory
    notes: list[str] = field(default_factory=list)  # what the DeepSpeed JSON changed over the recipe
    task: Optional[TaskPlan] = None  # a task recipe's examples, teacher and stored outputs

    @property
    def teacher_used(self) -> bool:
        """Whether a loss term reads the teacher (else it only seeds a student made of its layers)."""
        return any(t.uses_teacher for t in self.terms)

    @property
    def live_teacher(self) -> bool:
        """Whether the teacher runs in the training step (stored task outputs replace it)."""
        return self.teacher_used and (self.task is None or self.task.stored is None)

    @property
    def teacher_path(self) -> str:
        return self.task.teacher_path if self.task is not None else self.recipe.teacher.path

    @property
    def weights(self) -> list[float]:
        return [t.weight for t in self.recipe.losses.terms]

    def summary(self) -> dict:
        """What summary.json records of the plan."""
        r = self.recipe
        return {
            "precision": r.train.precision,
            "teacher_dtype": r.teacher.dtype if self.teacher_config is not None else None,
            "world_size": self.world,
            "student": {
                "model_type": self.student_config.model_type,
                "parameters": self.parameters,
                "layers": getattr(self.student_config, "num_hidden_layers", None),
                "hidden_size": hidden_size(self.student_config),
            },  # fmt: skip
            "teacher": None
            if self.teacher_config is None
            else {
                "model_type": self.teacher_config.model_type,
                "path": r.teacher.path,
                "layers": getattr(self.teacher_config, "num_hidden_layers", None),
            },  # fmt: skip
            "terms": [
                {
                    "kind": t.name,
                    "weight": w,
                    "path": getattr(t, "path", None),
                    "student_needs": _needs(t.student_needs),
                    "teacher_needs": _needs(t.teacher_needs),
                }
                for t, w in zip(self.terms, self.weights)
            ],  # fmt: skip
            "deepspeed": self.ds_config,
            "attention": self.attention,
            "notes": self.notes,
            "data": {
                "train_files": [str(p) for _, p in data_files(r.data, r.source)] if r.data.train_files else [],
                "dataset": r.data.dataset,
                "streaming": r.data.streaming,
                "max_length": r.data.max_length,
            },  # fmt: skip
            "resume": self.resume_point[0] if self.resume_point else None,
            "task": self.task.summary() if self.task is not None else None,
        }


def _needs(needs: Needs) -> dict:
    return {k: sorted(v) if isinstance(v, frozenset) else v for k, v in dataclasses.asdict(needs).items() if v}


def device() -> tuple[str, bool, Optional[int]]:
    """(device type, bf16 at full speed, device memory in bytes) of the accelerator this rank will use, read before
    any process group: DeepSpeed's accelerator names it, LOCAL_RANK picks the GPU."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cuda":
        return "cpu", False, None
    index = int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1)
    return "cuda", accelerator.is_bf16_supported(), torch.cuda.get_device_properties(index).total_memory


def make_plan(recipe: Recipe, resume: Optional[str]) -> Plan:
    """The start-up checks (see the module docstring), and the job they resolve."""
    from .data import corpora, tokenise
    from .models.students import check_positions, parameter_count, student_config, teacher_config
    from .models.teacher import seen_by_terms
    from .runtime import preflight
    from .runtime.distributed import check_deepspeed_json, check_precision, deepspeed_config, launch_world
    from .runtime.seeds import seed_everything
    from .task import plan as task_plan

    r = recipe
    validate_terms(r)  # each term's kind and options, by its own class
    resume_point = preflight.check(r, resume)  # the world, and the checkpoint --resume continues (its files hashed)
    if r.data.train_files:
        for key, path in data_files(r.data, r.source):
            corpora.require_known_format(r.where("data.train_files"), key, path)
    task = task_plan.read(r) if r.is_task else None  # every split read and checked, the labels from train
    teacher = teacher_config(r)
    student = student_config(r, teacher)  # student.teacher_layers against the teacher
    if task is not None:
        task_plan.check_heads(r, task, teacher, student)  # trained heads have the task's labels; the student gets them
    check_positions(r, teacher, student)  # data.max_length against both models' position embeddings
    params = parameter_count(r, student)  # built on the meta device: a config its family refuses is named now
    check_precision(r)  # fp16 only where there is a GPU
    world = launch_world()
    notes = check_deepspeed_json(r, world, hidden_size(student))  # batch arithmetic, flags vs the JSON
    kind, bf16, memory = device()
    r = resolve_precision(r, kind, bf16)  # the one place: the JSON's precision, else the recipe's rule
    seed_everything(r.train.seed)  # terms with parameters (a projection) start the same on every rank
    terms = build_terms(r.losses, student, seen_by_terms(r, teacher, student), r.source)  # every layer map
    tokenise.check_tokenizers(r, teacher, student)
    preflight.room_for_a_checkpoint(r, params)
    tasked = None
    if task is not None:  # last: a teacher without the task's head is fine-tuned here (cached by content)
        tasked = task_plan.resolve(r, task, teacher, terms, tokenise.recipe_tokenizer(r))
    element_bytes = 4 if r.train.precision == "fp32" else 2
    attention = attention_notes(r, terms, student, teacher or student, element_bytes, memory)
    student_needs = teacher_needs = Needs()
    for term in terms:
        student_needs, teacher_needs = student_needs | term.student_needs, teacher_needs | term.teacher_needs
    if os.environ.get("RANK", "0") == "0":
        for note in notes:
            print(f"[biodistill] note: {note}", file=sys.stderr, flush=True)
    return Plan(
        recipe=r, device_type=kind, world=world, teacher_config=teacher, student_config=student, terms=terms,
        student_needs=student_needs, teacher_needs=teacher_needs,
        ds_config=deepspeed_config(r, world, hidden_size(student)), parameters=params, resume=resume,
        resume_point=resume_point,
        attention=attention, notes=notes, task=tasked,
    )  # fmt: skip
