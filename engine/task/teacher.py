"""The task teacher: a model directory with the task's head, trained. One without it (a base encoder, a general
teacher) is first fine-tuned on the task by biodistill-evaluate's protocol, one cell of the same code
(``evaluate/finetune.run_cell``), and cached by content: the teacher's weights, the task's files, the labels and
the fine-tuning settings name the folder, so a second job (another student, a resume) finds it.

The first process to take the folder's lock fine-tunes; the job's other ranks wait on the lock (not in a
collective, so no timeout runs while they wait) and then read the result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from filelock import FileLock

from ..config import Recipe, TaskEntry, resolve_path
from ..evaluate.tasks import TaskData
from ..runtime.files import write_atomic

HEADS = {"ner": "TokenClassification", "classification": "SequenceClassification",
         "relation": "SequenceClassification"}  # fmt: skip
RECORD = "finetune.json"  # written last: the folder's marker


def trained_head(config, kind: str) -> bool:
    """Whether ``config`` is of a model saved with ``kind``'s head (its architectures say so)."""
    return any(a.endswith(f"For{HEADS[kind]}") for a in getattr(config, "architectures", None) or [])


def check_labels(recipe: Recipe, key: str, path: str, config, task: TaskData) -> None:
    """A trained head must have the task's labels, in the task's order (the logits' columns are the labels)."""
    labels = [config.id2label[i] for i in range(config.num_labels)]
    if labels != task.labels:
        what = "other labels" if set(labels) != set(task.labels) else "the task's labels in another order"
        raise recipe.error(
            key, f"{path}: its {HEADS[task.entry.kind]} head has {what}: {', '.join(map(str, labels))}; task "
            f"{recipe.task.path!r} has {', '.join(task.labels)} (from its train split)",
        )  # fmt: skip


def cache_folder(recipe: Recipe, teacher_fingerprint: str, task: TaskData) -> Path:
    """The fine-tuned teacher's folder, named by what decides its weights: the teacher, every example of the task's
    splits (words and labels, or texts and labels), the labels' order, the cut and the fine-tuning settings."""
    f = recipe.task.finetune
    digest = hashlib.sha256(teacher_fingerprint.encode())
    for split in sorted(task.splits):
        for row in task.splits[split]:
            digest.update(repr({k: v for k, v in vars(row).items() if k != "where"}).encode())
    setting = [task.entry.kind, task.labels, recipe.task.subword_labels, recipe.data.max_length,
               f.lr, f.epochs, f.batch_size, f.seed, f.weight_decay]  # fmt: skip
    digest.update(json.dumps(setting).encode())
    return resolve_path(f.cache_dir) / digest.hexdigest()[:20]


def finetuned(recipe: Recipe, teacher_fingerprint: str, task: TaskData) -> Path:
    """The fine-tuned teacher's folder, fine-tuning it first when no earlier job has.

    The cell runs in a process of its own: inside a launched job, transformers' Trainer would read the launcher's
    RANK / WORLD_SIZE and wait in a process group for ranks that are waiting on this folder's lock."""
    folder = cache_folder(recipe, teacher_fingerprint, task)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / RECORD).is_file():
            return folder
        f = recipe.task.finetune
        print(f"[biodistill] {recipe.teacher.path} has no {task.entry.kind} head: fine-tuning it on {recipe.task.path} "
              f"first (lr {f.lr:g}, {f.epochs:g} epochs, batch {f.batch_size}, seed {f.seed}); cached in {folder}",
              file=sys.stderr, flush=True)  # fmt: skip
        entry = {field.name: getattr(task.entry, field.name) for field in dataclasses.fields(TaskEntry)}
        job = {"teacher": recipe.teacher.path, "task": entry, "folder": str(folder),
               "finetune": dataclasses.asdict(f), "max_length": recipe.data.max_length, "task_path": recipe.task.path}  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}
        done = subprocess.run([sys.executable, "-m", __name__, json.dumps(job)], env=env)
        if done.returncode != 0 or not (folder / RECORD).is_file():
            raise RuntimeError(f"fine-tuning the teacher {recipe.teacher.path} on {recipe.task.path} failed "
                               f"(exit code {done.returncode}; its output is above)")  # fmt: skip
        dev = json.loads((folder / RECORD).read_text())["result"]["dev"]
        print(f"[biodistill] fine-tuned teacher, dev: {', '.join(f'{k} {v:.4f}' for k, v in dev.items() if isinstance(v, float))}",
              file=sys.stderr, flush=True)  # fmt: skip
        return folder


# What a launcher sets for the job's process group; the fine-tuning process is a job of its own.
_LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                       "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE", "OMPI_COMM_WORLD_SIZE",
                       "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")  # fmt: skip


def _finetune(job: dict) -> None:
    """One cell of the evaluation protocol on the task, saved with its tokenizer into a temporary folder renamed
    into place (the record written last inside it): whole or not at all."""
    import transformers

    from ..evaluate.finetune import Cell, load_tokenizer, run_cell
    from ..evaluate.suite import Protocol
    from ..evaluate.tasks import read_task

    transformers.logging.set_verbosity_error()  # the new head's "newly initialized" report is expected here
    transformers.logging.disable_progress_bar()
    f, folder = job["finetune"], Path(job["folder"])
    task = read_task(TaskEntry(**job["task"]), "task")
    work = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        cell = Cell("teacher", task.entry.name or "task", f["lr"], f["batch_size"], f["seed"])
        protocol = Protocol(epochs=f["epochs"], lrs=[f["lr"]], batch_sizes=[f["batch_size"]], seeds=[f["seed"]],
                            weight_decay=f["weight_decay"], max_length=job["max_length"], workers=1)  # fmt: skip
        with open(work / "log.jsonl", "w", encoding="utf-8") as log:

            def write(line: str) -> None:
                log.write(line + "\n")
                log.flush()

            result, model = run_cell(cell, job["teacher"], "teacher.path", False, task, protocol, work, write)
        shutil.rmtree(work / "trainer", ignore_errors=True)
        model.save_pretrained(work)
        load_tokenizer(job["teacher"], "teacher.path").save_pretrained(work)
        record = {"teacher": job["teacher"], "task": job["task_path"], "finetune": f, "result": result}
        write_atomic(work / RECORD, json.dumps(record, indent=1))
        if folder.exists():  # an unfinished folder of this cache (no record): ours to replace
            shutil.rmtree(folder)
        os.replace(work, folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


if __name__ == "__main__":
    _finetune(json.loads(sys.argv[1]))
