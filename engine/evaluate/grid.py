"""The grid: every (model, task, lr, batch size, seed) cell, run once and kept.

A cell lives in ``<output_dir>/cells/<model>/<task>/lr<lr>-bs<bs>-seed<seed>/``: its log, its dev and test
predictions, and ``metrics.json``, written last and atomically. A cell is finished exactly when its
metrics.json exists, so an interrupted grid resumes where it stopped: finished cells are never rerun, and a
cell killed half-way is started again from scratch. Cells run one after another in one process on a CPU,
and in parallel, one worker process per visible GPU, on a GPU machine (cell i goes to worker i mod n).

The lr (and batch size) of each (model, task) is chosen by the mean dev score over seeds; the test score
is reported as mean +- standard deviation over the seeds at that setting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from itertools import product
from pathlib import Path

import torch

from ..config import ConfigError, load_recipe, model_location
from ..runtime.files import replace_dir, write_atomic
from .finetune import Cell, run_cell
from .suite import ModelEntry, Suite
from .tasks import TaskData, read_task


def cells(suite: Suite) -> list[Cell]:
    p = suite.protocol
    return [
        Cell(m.name, t.name, lr, bs, seed)
        for m, t, lr, bs, seed in product(suite.models, suite.tasks, p.lrs, p.batch_sizes, p.seeds)
    ]


def cell_dir(suite: Suite, cell: Cell) -> Path:
    return Path(suite.output_dir) / "cells" / cell.id


def finished(suite: Suite, cell: Cell) -> bool:
    return (cell_dir(suite, cell) / "metrics.json").is_file()


def model_paths(suite: Suite) -> dict[str, str]:
    """Each model's directory or hub name; a ``recipe`` entry's initial student is built here, once. A
    ``task_recipe`` entry's student is distilled in each of its cells; its path here is its encoder before any
    task distillation (the same architecture: what the checks, the parameter count and the throughput read)."""
    return {m.name: m.path or str(initial_student(suite, m)) for m in suite.models}


def task_recipe_flags(suite: Suite, entry: ModelEntry) -> list[str]:
    """The flags a ``task_recipe`` entry's distillations run under: its teacher's and its student's paths."""
    paths = {m.name: m.path for m in suite.models}
    flags = ["--teacher.path", paths[entry.teacher]]
    if entry.student:
        flags += [
            "--student.init",
            "checkpoint",
            "--student.path",
            paths[entry.student],
            "--student.teacher_layers",
            "[]",
        ]
    return flags


def initial_student(suite: Suite, entry: ModelEntry) -> Path:
    """The student ``entry.recipe`` starts from, before any distillation step (its copy of the teacher's
    layers, or its seeded random init), saved with the recipe's tokenizer. Written atomically, and again only
    when the recipe has changed (a changed student then meets ``same_models``)."""
    final = Path(suite.output_dir) / "models" / entry.name
    if entry.task_recipe:  # its encoder alone: each cell's distillation gives it the task's head
        from ..config import TaskSection

        recipe = load_recipe(entry.task_recipe, task_recipe_flags(suite, entry), check_paths=False)
        recipe = dataclasses.replace(
            recipe, task=TaskSection(), student=dataclasses.replace(recipe.student, mlm_head=False)
        )
    else:
        recipe = load_recipe(entry.recipe, check_paths=False)
    built_from = json.dumps({k: v for k, v in asdict(recipe).items() if k != "source"}, sort_keys=True, default=str)
    record = final / "biodistill_recipe.json"
    if (final / "config.json").is_file() and record.is_file() and record.read_text() == built_from:
        return final
    from ..data.tokenise import recipe_tokenizer
    from ..models.outputs import Needs
    from ..models.students import build_student
    from ..models.teacher import load_teacher
    from ..runtime.seeds import seed_everything

    seed_everything(recipe.train.seed)  # the same init the distillation job makes
    needs_teacher = recipe.student.init == "teacher_layers"
    teacher = load_teacher(recipe, Needs(), torch.device("cpu")) if needs_teacher else None
    student = build_student(recipe, Needs(), teacher)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    recipe_tokenizer(recipe).save_pretrained(tmp)
    (tmp / record.name).write_text(built_from)
    replace_dir(tmp, final, record.name, "initial student")
    return final


def read_tasks(suite: Suite) -> dict[str, TaskData]:
    """Every task, read and checked before any cell runs: bad data costs no cell."""
    return {t.name: read_task(t, f"tasks[{i}]") for i, t in enumerate(suite.tasks)}


def check_models(suite: Suite, paths: dict[str, str], tasks: dict[str, TaskData]) -> None:
    """Every model's tokenizer and config, and its head against every task, before any cell runs."""
    from .finetune import check_weights, load_tokenizer, model_config

    for i, m in enumerate(suite.models):
        key = f"models[{i}].{'path' if m.path else 'recipe'}"
        path = paths[m.name]
        hub_name = path.count("/") == 1 and not path.startswith((".", "/", "~", "pkg://"))
        if not Path(model_location(path)).is_dir() and not hub_name:
            raise ConfigError(suite.source, key, f"{path}: no such model directory (a hub name is organisation/name)")
        check_weights(path, key)
        load_tokenizer(path, key)
        for task in tasks.values():
            model_config(paths[m.name], key, task, as_is=not m.finetune)


# Protocol fields that change what a cell computes; lrs, batch sizes and seeds only add or drop cells.
_CELL_FIELDS = ("epochs", "weight_decay", "schedule", "warmup_ratio", "max_length", "qa_max_length", "qa_stride")


def same_protocol(suite: Suite) -> None:
    """A grid resumed under another protocol would mix cells trained two ways in one mean: refused, by key.
    The first run records the protocol in ``<output_dir>/protocol.json``."""
    root = Path(suite.output_dir)
    record = root / "protocol.json"
    now = {k: getattr(suite.protocol, k) for k in _CELL_FIELDS}
    if not record.is_file() and root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ConfigError(
            suite.where("output_dir"), "output_dir",
            f"{root} exists and is not an evaluation's output (it has no protocol.json): its files could be replaced "
            "by this suite's; choose a new output_dir",
        )  # fmt: skip
    if record.is_file():
        before = json.loads(record.read_text())
        if before.get("suite", suite.name) != suite.name:
            raise ConfigError(
                suite.where("output_dir"), "output_dir",
                f"{root} holds the results of the suite {before['suite']!r}; this is {suite.name!r}, whose "
                "results.md, results.json and plot would replace them: give each suite its own output_dir",
            )  # fmt: skip
        for k in _CELL_FIELDS:
            if before.get(k) != now[k]:
                raise ConfigError(
                    suite.source, f"protocol.{k}",
                    f"the cells already in {suite.output_dir} were trained with {k} {before.get(k)!r}, this run says "
                    f"{now[k]!r}: keep {before.get(k)!r} to resume them, or choose another output_dir",
                )  # fmt: skip
        if "suite" not in before:  # written before suites were told apart: claim it now
            _write_json(record, {**before, "suite": suite.name})
        return
    _write_json(record, {**now, "suite": suite.name})


def fingerprint(path: str) -> str | None:
    """sha256 of a local model's config and weight files; None for a hub name (its revision is the cache's)."""
    root = Path(model_location(path))
    if not root.is_dir():
        return None
    digest = hashlib.sha256()
    for f in sorted(root.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".bin") or f.name == "config.json"):
            digest.update(f.name.encode())
            with open(f, "rb") as stream:
                while chunk := stream.read(1 << 24):
                    digest.update(chunk)
    return digest.hexdigest()


def same_models(suite: Suite, paths: dict[str, str]) -> dict[str, str | None]:
    """A model retrained in place (make demo again, a new export to the same directory) would have its old
    cells resumed as its own: refused, naming the model. ``<output_dir>/models.json`` records each model's
    fingerprint when its first cell runs; returns the fingerprints now."""
    record = Path(suite.output_dir) / "models.json"
    before = json.loads(record.read_text()) if record.is_file() else {}
    now = {m.name: _identity(m, paths[m.name]) for m in suite.models}
    for i, m in enumerate(suite.models):
        if m.name in before and before[m.name] != now[m.name]:
            (was, was_epochs), (weights, epochs) = (str(x).partition(" ")[::2] for x in (before[m.name], now[m.name]))
            if was == weights:  # the same weights: a task-distilled row's epochs changed
                key, what = f"models[{i}].epochs", f"{m.name}: its epochs of task distillation changed"
                detail = " -> ".join(x or "the protocol's epochs" for x in (was_epochs, epochs))
            else:
                key, what = f"models[{i}].{'path' if m.path else 'recipe'}", f"{paths[m.name]}: its weights changed"
                detail = f"sha256 {was[:12]} -> {weights[:12]}"
            raise ConfigError(
                suite.source, key,
                f"{what} since the cells in {suite.output_dir} were trained ({detail}), and resuming would mix two "
                "models in one mean: choose another output_dir, or delete this one",
            )  # fmt: skip
    if any(name not in before for name in now):
        _write_json(record, before | now)
    return now


def _identity(entry: ModelEntry, path: str) -> str | None:
    """What an entry's cells were trained from: its weights' fingerprint, and a task-distilled row's own epochs
    (its cells distil for that long): "<sha256> epochs=9"."""
    weights = fingerprint(path)
    return f"{weights} epochs={entry.epochs:g}" if weights and entry.epochs else weights


def _write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(doc, indent=1))


def run_grid(suite: Suite, overrides: list[str], worker: int = 0, workers: int = 1) -> tuple[dict, dict]:
    """Run every unfinished cell this worker owns; with several workers and this the parent, start them.
    Returns each model's path and fingerprint."""
    same_protocol(suite)
    paths, tasks = model_paths(suite), read_tasks(suite)
    check_models(suite, paths, tasks)
    prints = same_models(suite, paths) if workers == 1 else {}  # a worker's parent has checked (and hashed) them
    n = _workers(suite) if workers == 1 and worker == 0 else workers
    if n > 1 and workers == 1:
        _spawn(suite, overrides, n)
        return paths, prints
    entries = {m.name: (i, m) for i, m in enumerate(suite.models)}
    todo = [c for i, c in enumerate(cells(suite)) if i % n == worker and not finished(suite, c)]
    for number, cell in enumerate(todo, 1):
        index, entry = entries[cell.model]
        print(f"[eval] cell {number}/{len(todo)}: {cell.id}", flush=True)
        _run_one(suite, cell, paths[cell.model], f"models[{index}]", entry, tasks[cell.task])
    return paths, prints


def _run_one(suite: Suite, cell: Cell, path: str, key: str, entry: ModelEntry, task: TaskData) -> None:
    out = cell_dir(suite, cell)
    shutil.rmtree(out, ignore_errors=True)  # a cell killed half-way starts again
    out.mkdir(parents=True)
    distilled, started = None, time.perf_counter()
    if entry.task_recipe:
        path = distilled = task_distil(suite, cell, entry, task, out / "distil")
        key = f"{key}.task_recipe"
    with open(out / "log.jsonl", "w", encoding="utf-8") as log:

        def write(line: str) -> None:
            log.write(line + "\n")
            log.flush()

        result, _ = run_cell(cell, path, key, entry.adapters_only, task, suite.protocol, out, write, suite.deploy,
                             train=entry.finetune and distilled is None)  # fmt: skip
    if distilled is not None:
        job = json.loads((out / "distil" / "summary.json").read_text())
        result["distillation"] = {"steps": job["steps"], "task": job["plan"]["task"], "after": job["after"],
                                  "seconds": time.perf_counter() - started - result["seconds"]}  # fmt: skip
        result["seconds"] = time.perf_counter() - started  # the cell's whole cost: its distillation and its scoring
        shutil.rmtree(out / "distil", ignore_errors=True)  # the cell keeps its scores, not its model
    shutil.rmtree(out / "trainer", ignore_errors=True)  # the Trainer's scratch directory: nothing kept there
    _write_json(out / "metrics.json", result)  # the cell is finished from this instant


def task_distil(suite: Suite, cell: Cell, entry: ModelEntry, task: TaskData, out: Path) -> str:
    """The cell's student: ``entry.task_recipe`` run on this task, one rank in a process of its own, under the
    protocol's lr, batch size and seed, for as many steps as the entry's epochs (the protocol's by default) over the
    task's labelled train examples. Returns the exported student's directory."""
    from ..config import TaskEntry

    epochs = entry.epochs or suite.protocol.epochs
    steps = max(1, math.ceil(epochs * len(task.splits["train"]) / cell.batch_size))
    flags = [*task_recipe_flags(suite, entry), "--train.seed", str(cell.seed), "--optim.lr", repr(cell.lr),
             "--train.micro_batch_size", str(cell.batch_size), "--train.grad_accum", "1", "--train.global_batch_size",
             "0", "--train.max_steps", str(steps), "--train.save_every", "0", "--train.eval_every", "0",
             "--train.output_dir", str(out), "--data.max_length", str(suite.protocol.max_length)]  # fmt: skip
    defaults = TaskEntry()
    for f in dataclasses.fields(TaskEntry):
        value = getattr(task.entry, f.name)
        if value != getattr(defaults, f.name) or f.name in ("kind", "path"):
            flags += [f"--task.{f.name}", json.dumps(value)]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # fmt: skip
    print(f"[eval]   {cell.id}: task-distilling {entry.task_recipe} for {steps} steps", flush=True)
    done = subprocess.run([sys.executable, "-m", "biodistill.engine", "--config", entry.task_recipe, *flags], env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{cell.id}: the task distillation ({entry.task_recipe}) failed with exit code "
                           f"{done.returncode}; its output is above")  # fmt: skip
    return str(out / "student")


def free_port() -> int:
    """A port no process listens on now, for a one-rank job's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workers(suite: Suite) -> int:
    if suite.protocol.workers != "auto":
        return suite.protocol.workers
    return max(1, torch.cuda.device_count())


def _spawn(suite: Suite, overrides: list[str], n: int) -> None:
    """n worker processes of this command, each pinned to one GPU (when there are GPUs) and given its share
    of the cells; a worker that fails fails the grid after the others finish."""
    gpus = torch.cuda.device_count()
    procs = []
    for k in range(n):
        env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": str(k % gpus)} if gpus else {})}
        cmd = [sys.executable, "-m", "biodistill.engine.evaluate", "--config", suite.source,
               "--worker", str(k), "--workers", str(n), *overrides]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env))
    failed = [k for k, p in enumerate(procs) if p.wait() != 0]
    if failed:
        raise ConfigError(suite.source, "protocol.workers", f"worker(s) {failed} failed; rerun to resume the grid")


# ------------------------------------------------------------------------------------ aggregation


def _deployed(runs: list[dict], metric: str) -> dict:
    """The test score through ONNX Runtime fp32 and int8 over the same seeds, where every run has it (cells
    finished before deploy was turned on have not); and the authors' sub-word NER F1 (protocol.subword_f1)."""
    out = {}
    for label in ("onnx", "int8"):
        if all(f"test_{label}" in r for r in runs):
            values = [r[f"test_{label}"][metric] for r in runs]
            out[f"{label}_mean"] = statistics.mean(values)
            out[f"{label}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    if all("subword_f1" in r["test"] for r in runs):  # protocol.subword_f1: the authors' ner.py figure
        values = [r["test"]["subword_f1"] for r in runs]
        out["subword_mean"] = statistics.mean(values)
        out["subword_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def aggregate(suite: Suite) -> dict:
    """Per (model, task): the best (lr, batch size) by mean dev score over seeds, and at it the test scores,
    mean and standard deviation over seeds, with every cell's figures."""
    out: dict = {}
    for m in suite.models:
        for t in suite.tasks:
            metric = suite.metric(t)
            settings: dict[tuple[float, int], list[dict]] = {}
            for cell in cells(suite):
                if cell.model == m.name and cell.task == t.name and finished(suite, cell):
                    result = json.loads((cell_dir(suite, cell) / "metrics.json").read_text())
                    settings.setdefault((cell.lr, cell.batch_size), []).append(result)
            if not settings:
                continue
            (lr, bs), runs = max(settings.items(), key=lambda kv: statistics.mean(r["dev"][metric] for r in kv[1]))
            test = [r["test"][metric] for r in runs]
            out.setdefault(m.name, {})[t.name] = {
                "metric": metric,
                "lr": lr,
                "batch_size": bs,
                "seeds": len(runs),
                "dev_mean": statistics.mean(r["dev"][metric] for r in runs),
                "test_mean": statistics.mean(test),
                "test_std": statistics.stdev(test) if len(test) > 1 else 0.0,
                "truncated": runs[0]["truncated"],
                "test_runs": [r["test"] for r in runs],
                **_deployed(runs, metric),
                "trainable_parameters": runs[0]["trainable_parameters"],
            }
    return out
