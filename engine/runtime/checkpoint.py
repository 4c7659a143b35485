"""Checkpoints (DeepSpeed's own format, plus our client state) and the final Hugging Face export."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)

from . import faults
from .files import replace_dir, sha256_of, write_atomic
from .health import JobError

log = logging.getLogger(__name__)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


META = "biodistill.json"  # the job shape and data position, beside DeepSpeed's files in every tag
STUDENT_MARKER = "distillation.json"  # in every student export: what it was distilled from, and that it is ours


class CheckpointError(JobError):
    """A save that could not be completed; the message says which checkpoint is still the latest."""


def save(
    engine, directory: str, step: int, consumed: int, recipe: dict, extra: Optional[dict] = None,
    data_state: Optional[dict] = None, keep: int = 0,
) -> str:  # fmt: skip
    """Save at ``directory/step{step}``, whole or not at all, then move ``latest`` to it.

    DeepSpeed writes into ``.step{step}.tmp``; once every rank's files are there, rank 0 adds
    ``biodistill.json``, renames the folder to ``step{step}`` and only then replaces ``latest``. A job
    killed at any moment leaves ``latest`` naming a complete checkpoint; what an interrupted save left
    is a dot-folder the next save removes. Every rank's RNG state (and stream position, when
    streaming) goes into the client state: DeepSpeed writes it only from the ranks that write model
    states, so we gather them first. ``extra`` is more client state (the trainer's counters).
    ``keep`` > 0 deletes all but the newest ``keep`` complete checkpoints, after ``latest`` moved.
    A failed write (disk full, I/O error) raises CheckpointError on every rank and leaves the
    previous checkpoint and ``latest`` as they were.
    """
    root, tag, rank = Path(directory), f"step{step}", dist.get_rank()
    tmp = f".{tag}.tmp"
    faults.hit("save.begin", step)
    refuse_nonfinite(engine.module, step, root, f"checkpoint {root / tag}")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step*.tmp"):  # left by a save that was killed
            shutil.rmtree(stale)
    world = dist.get_world_size()
    states = [None] * world
    dist.all_gather_object(states, (rng_state(), data_state))  # also orders the clean-up before the writes
    micro = engine.train_micro_batch_size_per_gpu()
    job = {
        "step": step,
        "world_size": world,
        "micro_batch_size": micro,
        "grad_accum": engine.gradient_accumulation_steps(),
        "consumed_samples": consumed * micro * world,  # the position in the (world-independent) sample order
        "zero_stage": engine.zero_optimization_stage(),
        "bf16": engine.bfloat16_enabled(),
        "recipe": recipe,  # what it was made from: a resume that differs is told, or refused (runtime/resume.py)
    }
    client = {
        "step": step,
        "consumed_micro_batches": consumed,
        "rng": [rng for rng, _ in states],
        "data": [data for _, data in states],
        "recipe": recipe,
        **(extra or {}),
        # What ds_to_universal requires to re-shard the optimizer states for another world size.
        UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE},
    }
    failure, written = [None], False
    try:
        with _file_failpoints(engine, step):
            engine.save_checkpoint(directory, tag=tmp, client_state=client, save_latest=False)
        written = True
        faults.hit("save.shards", step)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        failure[0] = f"rank {rank}: {type(e).__name__}: {_first_line(e)} ({_free(root)})"
        if not written:  # DeepSpeed's file writes follow its collectives; its save ends with a barrier
            dist.barrier()  # the ranks whose writes succeeded are waiting in it
    failures = [None] * world
    dist.all_gather_object(failures, failure[0])  # every rank's files are on disk, or we all know why not
    failure = [next((f for f in failures if f), None)]
    if rank == 0:
        if failure[0] is None:
            try:
                _publish(root, tmp, tag, job, step, keep)
            except OSError as e:
                failure[0] = f"rank 0: {type(e).__name__}: {e}"
        if failure[0] is not None:
            shutil.rmtree(root / tmp, ignore_errors=True)  # frees the space; `latest` never named it
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise CheckpointError(f"saving checkpoint {root / tag} failed: {failure[0]}; {_previous(root)}")
    return tag


def _publish(root: Path, tmp: str, tag: str, job: dict, step: int, keep: int) -> None:
    """Rank 0: record every file's size and sha256, declare ``tmp`` complete, rename it to ``tag``, move
    ``latest``, prune old tags."""
    job = {**job, "files": digests(root / tmp)}
    write_atomic(root / tmp / META, json.dumps(job, indent=2))
    faults.hit("save.meta", step)
    if (root / tag).exists():  # saved before by a run killed before `latest` moved to it
        _remove(root, tag)
    os.rename(root / tmp, root / tag)
    _fsync_dir(root)
    faults.hit("save.renamed", step)
    write_atomic(root / "latest", tag)
    faults.hit("save.latest", step)
    if keep > 0:
        for old in complete_tags(root)[:-keep]:
            faults.hit("save.prune", step)
            _remove(root, old)


def digests(folder: Path) -> dict[str, list]:
    """``{relative path: [bytes, sha256]}`` of every file under ``folder``: what a resume checks the checkpoint
    against, so that a file cut short or changed is named before anything loads it."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != META):
        out[str(path.relative_to(folder))] = [path.stat().st_size, sha256_of(path)]
    return out


def damage(folder: Path, files: dict[str, list]) -> Optional[str]:
    """What is wrong with the files of the checkpoint ``folder`` against the sizes and sha256 its save recorded
    (None: whole). Sizes first, so a cut file is named without reading the others."""
    for name, (size, _) in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} is {path.stat().st_size:,} bytes, {size:,} when it was saved (cut short or overwritten)"
    for name, (_, sha) in files.items():
        if sha256_of(folder / name) != sha:
            return f"{folder / name} does not have the sha256 it was saved with (changed on disk)"
    return None


def _remove(root: Path, tag: str) -> None:
    # Renamed out of sight first: a half-deleted folder must never look like a checkpoint.
    doomed = root / f".{tag}.old"
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(root / tag, doomed)
    shutil.rmtree(doomed)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else "(no message)"


def _free(root: Path) -> str:
    try:
        return f"{shutil.disk_usage(root).free / 2**20:.1f} MiB free on the filesystem of {root}"
    except OSError:
        return f"{root} unreadable"


def _previous(root: Path) -> str:
    try:
        found = find(str(root))
    except FileNotFoundError:
        found = None
    return f"the latest complete checkpoint is still {root / found[0]}" if found else "no earlier checkpoint exists"


def complete_tags(root: Path) -> list[str]:
    """Complete ``step*`` checkpoints under ``root``, oldest first."""
    tags = [p.name for p in root.glob("step*") if p.name[4:].isdigit() and (p / META).is_file()]
    return sorted(tags, key=lambda t: int(t[4:]))


@contextlib.contextmanager
def _file_failpoints(engine, step: int):
    """Pass the ``save.file`` failpoint after each file DeepSpeed's checkpoint engine writes."""
    ce = engine.checkpoint_engine
    original = ce.save

    def save_then_hit(*args, **kwargs):
        result = original(*args, **kwargs)
        faults.hit("save.file", step)
        return result

    ce.save = save_then_hit
    try:
        yield
    finally:
        ce.save = original


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable: a power cut after it must not undo it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def find(directory: str, tag: Optional[str] = None) -> Optional[tuple[str, dict]]:
    """``(tag, job)`` of the checkpoint to resume from (``tag``, else the one ``latest`` names); None
    when the directory has no checkpoint yet. Raises FileNotFoundError naming what is missing."""
    root = Path(directory)
    if tag is None:
        if not (root / "latest").is_file():
            return None
        tag = (root / "latest").read_text().strip()
    if not (root / tag).is_dir():
        raise FileNotFoundError(f"checkpoint {tag!r} not found in {directory}")
    if not (root / tag / META).is_file():
        raise FileNotFoundError(
            f"checkpoint {root / tag} is incomplete (no {META}): its save was interrupted; resume from an earlier tag"
        )
    job = json.loads((root / tag / META).read_text())
    wrong = damage(root / tag, job.get("files", {}))
    if wrong is not None:
        whole = next(
            (t for t in reversed(complete_tags(root)) if int(t[4:]) < job["step"] and whole_tag(root, t)), None
        )
        instead = (
            f"the newest whole checkpoint before it is {whole}: --resume {whole}"
            if whole
            else "no earlier checkpoint is whole"
        )
        raise FileNotFoundError(f"checkpoint {root / tag} is damaged: {wrong}; {instead}")
    return tag, job


def whole_tag(root: Path, tag: str) -> bool:
    """Whether checkpoint ``tag`` is complete and every file is as its save recorded."""
    meta = root / tag / META
    return meta.is_file() and damage(root / tag, json.loads(meta.read_text()).get("files", {})) is None


def needs_universal(directory: str, tag: str, job: dict, world: int) -> bool:
    """True when ``tag`` was written by another world size and holds ZeRO-partitioned optimizer states
    (ZeRO 1-3, or the bf16 optimizer): those must be re-sharded. ZeRO-0 fp32 keeps the whole optimizer
    state in one file and loads on any world size as it is."""
    return job["world_size"] != world and any((Path(directory) / tag).glob("*optim_states.pt"))


def to_universal(directory: str, tag: str) -> str:
    """Convert ``tag`` to DeepSpeed's universal checkpoint format (once; rank 0 converts while the others
    wait) and return the converted tag. The conversion appears whole or not at all."""
    out_tag = f"{tag}_universal"
    root = Path(directory)
    failure = [None]
    if dist.get_rank() == 0 and not (root / out_tag / META).is_file():
        try:
            _convert_to_universal(root, tag, out_tag)
        except Exception as e:  # every rank must hear of it, or the others would wait at the next collective forever
            failure[0] = f"{type(e).__name__}: {e}"
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise RuntimeError(f"converting checkpoint {root / tag} to DeepSpeed's universal format failed: {failure[0]}")
    return out_tag


def _convert_to_universal(root: Path, tag: str, out_tag: str) -> None:
    tmp = root / f".{out_tag}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    # A separate process: the converter forks workers, which a rank with a live device context must not.
    workers = str(max(1, min(8, os.cpu_count() or 1)))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(root / tag)]
    cmd += ["--output_folder", str(tmp), "--num_extract_workers", workers, "--num_merge_workers", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (root / "latest_universal").unlink(missing_ok=True)  # it names the temporary folder; `latest` stays ours
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(proc.stderr[-3000:])
    job = json.loads((root / tag / META).read_text())
    job["files"] = digests(tmp)  # the converted files' own, for a resume from this tag
    write_atomic(tmp / META, json.dumps(job, indent=2))  # written last: its presence marks a finished conversion
    shutil.rmtree(root / out_tag, ignore_errors=True)
    os.rename(tmp, root / out_tag)


def load(engine, directory: str, tag: str) -> dict:
    """Load ``tag`` into the engine and restore this rank's RNG; returns the client state."""
    path, client = engine.load_checkpoint(directory, tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load a checkpoint from {directory} (tag {tag})")
    states = client["rng"]
    set_rng_state(states[dist.get_rank() % len(states)])
    return client


def gathered_state_dict(engine, module: torch.nn.Module) -> dict:
    """The module's full state dict on rank 0 (CPU tensors), gathered from ZeRO-3 partitions when needed;
    an empty dict elsewhere. Every rank must call it."""
    gather = contextlib.nullcontext()
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    with gather:
        sd = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if dist.get_rank() == 0 else {}
    return sd


def weights_digest(engine, module: torch.nn.Module) -> str:
    """sha256 of the module's full parameters on this rank (gathered under ZeRO-3; every rank calls it).
    Data-parallel replicas must agree bit for bit; comparing digests across ranks proves they do."""
    params = list(module.named_parameters())
    gather = contextlib.nullcontext()
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None)
    digest = hashlib.sha256()
    with gather:
        for name, p in params:
            digest.update(name.encode())
            digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def nonfinite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of the parameters of ``module`` that hold inf or NaN on any rank (each rank reads its own ZeRO-3
    partition); every rank calls it and gets the same list. One device-to-host read a call: save points only."""
    params = [(name, _owned(p)) for name, p in module.named_parameters()]
    flags = torch.stack([~torch.isfinite(t).all() if t.numel() else torch.zeros((), dtype=torch.bool, device=t.device)
                         for _, t in params]).int()  # fmt: skip
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [name for (name, _), bad in zip(params, flags.tolist()) if bad]


def _owned(p: torch.Tensor) -> torch.Tensor:
    """This rank's values of ``p``: all of it, or under ZeRO-3 its partition without the padding that makes the
    partitions equal (ZeRO-3 never writes the padding: it holds whatever memory held, NaN included)."""
    part = getattr(p, "ds_tensor", None)
    if part is None:
        return p
    size = getattr(part, "ds_numel", part.numel())
    start = size * dist.get_rank(group=getattr(p, "ds_process_group", None))
    return part.reshape(-1)[: max(0, min(size, p.ds_numel - start))]


class NonFiniteWeights(JobError):
    """The student's weights hold inf or NaN: nothing is saved or exported over the last good files."""


def refuse_nonfinite(module: torch.nn.Module, step: int, directory: Path, what: str) -> None:
    """Raise NonFiniteWeights on every rank when ``module``'s weights are not finite, naming them and the
    checkpoint that is still the latest good one."""
    bad = nonfinite_parameters(module)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise NonFiniteWeights(
            f"step {step}: the student's weights are not finite ({', '.join(bad[:3])}{more}): the {what} was not "
            f"written; {_previous(directory)}. A learning rate too large for this model (optim.lr) is the usual cause"
        )


def export(state_dict: dict, student: torch.nn.Module, tokenizer, out_dir: str, record: dict,
           card: str = "") -> Path:  # fmt: skip
    """Write the student as a Hugging Face directory (config, safetensors, tokenizer, ``record`` as distillation.json
    and ``card`` as README.md), whole or not at all: it is written beside the target and renamed into place,
    replacing only a previous student export (runtime/files.py). Rank 0 only."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    # save_pretrained empties the dict it is given (transformers 5 frees tensors as shards are written).
    student.save_pretrained(tmp, state_dict=dict(state_dict), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if card:
        (tmp / "README.md").write_text(card, encoding="utf-8")
    (tmp / STUDENT_MARKER).write_text(json.dumps(record, indent=1, default=str))  # last: marks a whole export
    replace_dir(tmp, out, STUDENT_MARKER, "student export")
    return out
