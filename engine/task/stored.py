"""The teacher's task logits, computed once and stored: a task distillation whose terms read nothing else of the
teacher (task_kl, task_ce) never runs it again, on any epoch or for any student distilled from the same teacher
and examples.

A store is a folder named by its content key (the teacher's weights and config, the examples' token ids, the
dtype): one safetensors shard per rank of the job that wrote it (each rank runs the teacher on every world-th
example, in the teacher's dtype: fp16/bf16 on a GPU), and ``manifest.json``, written last and atomically, with
every shard's sha256. A folder without a manifest is unfinished and is written again; a shard that does not match
its checksum, or a manifest of another teacher or other examples, is refused naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..config import ConfigError, Recipe, resolve_path
from ..data.batches import to_device
from ..models.outputs import Needs, encode
from ..runtime.files import sha256_of, write_atomic
from .examples import TaskCollator, TaskExamples, TaskView

MANIFEST = "manifest.json"
FORMAT = 1


def identity(teacher_fingerprint: str, examples: TaskExamples, dtype: str, labels: list[str]) -> dict:
    """What the stored outputs are outputs of: a store whose manifest says otherwise is not theirs."""
    return {
        "format": FORMAT,
        "teacher": teacher_fingerprint,
        "examples": examples.digest(),
        "count": len(examples.every),
        "dtype": dtype,
        "labels": list(labels),
    }


def key(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def location(recipe: Recipe, ident: dict) -> Path:
    """The folder: ``task.teacher_outputs`` when it names one, else the content-keyed one under outputs_dir."""
    given = recipe.task.teacher_outputs
    if given not in ("auto", "live"):
        return resolve_path(given)
    return resolve_path(recipe.task.outputs_dir) / key(ident)


def check(recipe: Recipe, folder: Path, ident: dict) -> bool:
    """True when ``folder`` holds finished outputs of this teacher on these examples; False when it holds none
    yet. A folder that holds another teacher's or other examples' outputs is refused, naming what differs; so is
    a folder named by ``task.teacher_outputs`` that holds none."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        if recipe.task.teacher_outputs not in ("auto", "live"):
            raise recipe.error("task.teacher_outputs", f"{folder} holds no stored teacher outputs (no {MANIFEST})")
        return False
    try:
        stored = json.loads(manifest.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(str(manifest), "", f"unreadable ({e}); delete the folder to compute them again") from None
    differs = [
        f"{k}: stored {_short(stored.get(k))}, this job {_short(v)}" for k, v in ident.items() if stored.get(k) != v
    ]
    if differs:
        what = {"teacher": "another teacher", "examples": "other examples (data, tokenizer or data.max_length)"}
        named = ", ".join(what.get(d.split(":")[0], d.split(":")[0]) for d in differs)
        raise recipe.error(
            "task.teacher_outputs", f"{folder} holds the outputs of {named}: " + "; ".join(differs)
        )  # fmt: skip
    return True


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:16] + "..." + text[-8:]


@torch.no_grad()
def compute(teacher: torch.nn.Module, examples: TaskExamples, folder: Path, ident: dict, per_token: bool,
            tokenizer, micro_batch: int, device, rank: int, world: int) -> None:  # fmt: skip
    """Every rank runs the teacher on its share (every world-th example), writes its shard, and rank 0 writes the
    manifest once every shard is whole. Collective: every rank calls it."""
    folder.mkdir(parents=True, exist_ok=True)
    view = TaskView(examples.every)
    mine = list(range(rank, len(view), world))
    mine.sort(key=lambda i: len(view.rows[i]["input_ids"]))  # similar lengths together: less padding
    collate = TaskCollator(tokenizer, per_token)
    needs = Needs(task_logits=True)
    index, lengths, values = [], [], []
    for start in range(0, len(mine), micro_batch):
        host = collate([view[(0, i)] for i in mine[start : start + micro_batch]])
        batch = to_device(host, device)
        out = encode(teacher, batch["input_ids"], batch["attention_mask"], needs, None, batch["padded"],
                     batch.get("token_type_ids")).task_logits  # fmt: skip
        for b, i in enumerate(host["sample_ids"].tolist()):
            n = int(host["attention_mask"][b].sum()) if per_token else 1  # read on the host: no device sync
            values.append(out[b, :n] if per_token else out[b : b + 1])
            index.append(i)
            lengths.append(n)
    classes = len(ident["labels"])
    tensors = {
        "index": torch.tensor(index, dtype=torch.long),
        "lengths": torch.tensor(lengths, dtype=torch.long),
        "values": torch.cat(values).contiguous().cpu() if values else torch.zeros(0, classes),
    }
    shard = folder / f"shard-{rank:05d}-of-{world:05d}.safetensors"
    partial = shard.with_suffix(f".partial{os.getpid()}")
    save_file(tensors, str(partial))
    os.replace(partial, shard)
    dist.barrier()
    if rank == 0:
        shards = sorted(folder.glob(f"shard-*-of-{world:05d}.safetensors"))
        manifest = {**ident, "shards": {p.name: sha256_of(p) for p in shards}}
        write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1))
    dist.barrier()


def load(folder: Path, count: int, per_token: bool) -> list[torch.Tensor]:
    """The stored logits of every example, by index ([tokens, C] per token, else [C]); each shard checked against
    its sha256 first."""
    manifest = json.loads((folder / MANIFEST).read_text())
    out: list[Optional[torch.Tensor]] = [None] * count
    for name, digest in manifest["shards"].items():
        path = folder / name
        if not path.is_file() or sha256_of(path) != digest:
            raise ConfigError(str(path), "task.teacher_outputs", "missing or changed since it was written (its "
                              f"sha256 is not the one {MANIFEST} records); delete {folder} to compute it again")  # fmt: skip
        shard = load_file(str(path))
        rows = torch.split(shard["values"], shard["lengths"].tolist())
        for i, x in zip(shard["index"].tolist(), rows):
            out[i] = x if per_token else x[0]
    missing = [i for i, x in enumerate(out) if x is None]
    if missing:
        raise ConfigError(str(folder), "task.teacher_outputs", f"holds no outputs for examples {missing[:5]}")
    return out


def all_ready(plan, device) -> bool:
    """Whether every rank found the stored outputs whole (computing them is collective: the ranks must agree)."""
    flag = torch.tensor([int(plan.task.ready)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def store_task_outputs(plan, teacher, tokenizer, ranks) -> list[torch.Tensor]:
    """The task outputs of the plan's teacher on every example: computed and stored first unless every rank found
    them whole; then read back, checksums checked. ``ranks``: the job's process group facts (rank, world, device)."""
    task = plan.task
    if teacher is not None:
        compute(teacher.to(ranks.device), task.examples, task.stored, task.ident, task.per_token, tokenizer,
                plan.recipe.train.micro_batch_size, ranks.device, ranks.rank, ranks.world)  # fmt: skip
        if ranks.rank == 0:
            print(f"[biodistill] teacher outputs stored in {task.stored} ({len(task.examples.every)} examples)",
                  file=sys.stderr, flush=True)  # fmt: skip
    return load(task.stored, len(task.examples.every), task.per_token)
