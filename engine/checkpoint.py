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
import time
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


def save(engine, directory: str, step: int, consumed: int, recipe: dict, data_state: Optional[dict] = None) -> str:
    """Save at ``directory/step{step}``, then write its ``biodistill.json`` and move ``latest`` to it.

    Every rank's RNG state (and stream position, when streaming) goes into the client state: DeepSpeed
    writes it only from the ranks that write model states, so we gather them first. ``latest`` moves
    last and by rename, so it only ever names a checkpoint whose files are all written.
    """
    world = dist.get_world_size()
    states = [None] * world
    dist.all_gather_object(states, (rng_state(), data_state))
    tag = f"step{step}"
    micro = engine.train_micro_batch_size_per_gpu()
    job = {
        "step": step,
        "world_size": world,
        "micro_batch_size": micro,
        "grad_accum": engine.gradient_accumulation_steps(),
        "consumed_samples": consumed * micro * world,  # the position in the (world-independent) sample order
        "zero_stage": engine.zero_optimization_stage(),
        "bf16": engine.bfloat16_enabled(),
    }
    client = {
        "step": step,
        "consumed_micro_batches": consumed,
        "rng": [rng for rng, _ in states],
        "data": [data for _, data in states],
        "recipe": recipe,
        # What ds_to_universal requires to re-shard the optimizer states for another world size.
        UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE},
    }
    engine.save_checkpoint(directory, tag=tag, client_state=client, save_latest=False)
    dist.barrier()  # every rank's shards are on disk before the checkpoint is declared complete
    if dist.get_rank() == 0:
        write_atomic(Path(directory) / tag / META, json.dumps(job, indent=2))
        write_atomic(Path(directory) / "latest", tag)
    dist.barrier()
    return tag


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` whole: written beside it, flushed, renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    return tag, json.loads((root / tag / META).read_text())


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
    shutil.copy(root / tag / META, tmp / META)  # copied last: its presence marks a finished conversion
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


def export(state_dict: dict, student: torch.nn.Module, tokenizer, out_dir: str) -> Path:
    """Write the student as a Hugging Face directory (config, safetensors, tokenizer), whole or not at
    all: it is written beside the target and renamed into place. Rank 0 only."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    # save_pretrained empties the dict it is given (transformers 5 frees tensors as shards are written).
    student.save_pretrained(tmp, state_dict=dict(state_dict), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    old = out.parent / f".{out.name}.old-{int(time.time())}"
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out
