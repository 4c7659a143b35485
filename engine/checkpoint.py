"""Checkpoints (DeepSpeed's own format, plus our client state) and the final Hugging Face export."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

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


def save(engine, directory: str, step: int, consumed: int, recipe: dict, data_state: Optional[dict] = None) -> str:
    """Save at ``directory/step{step}``. Every rank's RNG state (and stream position, when streaming)
    goes into the client state: DeepSpeed writes it only from the ranks that write model states, so we
    gather them first."""
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, (rng_state(), data_state))
    tag = f"step{step}"
    client = {
        "step": step,
        "consumed_micro_batches": consumed,
        "rng": [rng for rng, _ in states],
        "data": [data for _, data in states],
        "recipe": recipe,
    }
    engine.save_checkpoint(directory, tag=tag, client_state=client)
    return tag


def load(engine, directory: str, tag: Optional[str] = None) -> Optional[dict]:
    """Load ``tag`` (default: the ``latest`` one) into the engine; None when there is no checkpoint."""
    if tag is None and not (Path(directory) / "latest").is_file():
        return None
    if tag is not None and not (Path(directory) / tag).is_dir():
        raise FileNotFoundError(f"checkpoint {tag!r} not found in {directory}")
    path, client = engine.load_checkpoint(directory, tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load a checkpoint from {directory} (tag {tag or 'latest'})")
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
