"""A task recipe's part of the plan: the task read and checked, the heads' labels, the teacher that teaches (the
given one, or it fine-tuned first), the examples tokenised, and whether the teacher's outputs are stored."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import Recipe
from ..evaluate.tasks import TaskData
from ..models.outputs import Needs
from ..models.students import with_labels
from . import examples as task_examples
from . import stored
from .teacher import check_labels, finetuned, trained_head

STORABLE = Needs(task_logits=True)  # what stored outputs hold of the teacher


@dataclass
class TaskPlan:
    examples: task_examples.TaskExamples
    teacher_path: str  # the fine-tuned teacher the job reads
    finetuned_here: bool  # the given teacher had no head: this folder is its fine-tuned copy
    stored: Optional[Path]  # where the teacher's outputs are stored; None: the teacher runs live
    ready: bool  # the stored outputs were found whole (no teacher forward at all)
    ident: dict
    live_because: list[str]  # the terms that read more of the teacher than its task logits

    @property
    def per_token(self) -> bool:
        return self.examples.task.entry.kind == "ner"

    def summary(self) -> dict:
        outputs = (
            f"stored in {self.stored} ({'found' if self.ready else 'computed by this job'})"
            if self.stored is not None
            else "live: " + (", ".join(self.live_because) or "task.teacher_outputs: live")
        )  # fmt: skip
        return {
            "kind": self.examples.task.entry.kind,
            "labels": self.examples.task.labels,
            "examples": self.examples.describe(),
            "unlabeled_left_out": self.examples.left_out,
            "teacher": self.teacher_path,
            "teacher_outputs": outputs,
        }


def read(recipe: Recipe) -> TaskData:
    return task_examples.read(recipe)


def check_heads(recipe: Recipe, task: TaskData, teacher_config, student_config) -> None:
    """A trained head of either model has the task's labels, in order; the student's config gets the task's."""
    kind = task.entry.kind
    if teacher_config is not None and trained_head(teacher_config, kind):
        check_labels(recipe, "teacher.path", recipe.teacher.path, teacher_config, task)
    if recipe.student.path and trained_head(student_config, kind):
        check_labels(recipe, "student.path", recipe.student.path, student_config, task)
    with_labels(student_config, task.labels)


def resolve(recipe: Recipe, task: TaskData, teacher_config, terms, tokenizer) -> TaskPlan:
    """The examples, the teacher (fine-tuned first when it has no head: minutes, once per content), and where its
    outputs are stored. Last of the start-up checks: every cheaper check has passed before a teacher trains."""
    from ..evaluate.grid import fingerprint

    examples = task_examples.build(recipe, task, tokenizer)
    given = recipe.teacher.path
    path, here = given, False
    if not trained_head(teacher_config, task.entry.kind):
        path, here = str(finetuned(recipe, fingerprint(given) or given, task)), True
    live = [f"{t.name} reads the teacher's {_read(t.teacher_needs)}" for t in terms
            if t.uses_teacher and not _within(t.teacher_needs, STORABLE)]  # fmt: skip
    folder, ready, ident = None, False, {}
    if recipe.task.teacher_outputs != "live" and any(t.uses_teacher for t in terms):
        if live and recipe.task.teacher_outputs != "auto":
            raise recipe.error("task.teacher_outputs", "stored outputs hold the teacher's task logits alone; "
                               + "; ".join(live) + ": set task.teacher_outputs: live")  # fmt: skip
        if not live:
            ident = stored.identity(fingerprint(path) or path, examples, recipe.teacher.dtype, task.labels)
            folder = stored.location(recipe, ident)
            ready = stored.check(recipe, folder, ident)
    return TaskPlan(examples, path, here, folder, ready, ident, live)


def _within(needs: Needs, allowed: Needs) -> bool:
    return (needs | allowed) == allowed


def _read(needs: Needs) -> str:
    names = [f for f, v in vars(needs).items() if v and f != "task_logits"]
    return ", ".join(n.replace("_", " ") for n in names) or "outputs"
