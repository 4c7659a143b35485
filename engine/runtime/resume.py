"""Resuming a job: which checkpoint it continues, whether that checkpoint fits this job's shape, and
the position (step, sequences consumed, skip counters, stream state) that loading it restores."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from ..config import ConfigError, Recipe
from . import checkpoint, preflight
from .distributed import Dist


@dataclass
class Position:
    """Where a job stands: what a checkpoint saves besides DeepSpeed's states, and what a resume restores."""

    step: int = 0
    consumed: int = 0  # micro-batches this rank has drawn
    skips: dict = field(default_factory=lambda: {"nonfinite_loss": 0, "teacher_nonfinite": 0})
    skips_in_a_row: int = 0
    stream_state: Optional[dict] = None  # this rank's stream position (data.streaming)


def find_checkpoint(recipe: Recipe, resume: Optional[str], found: Optional[tuple[str, dict]],
                    dist: Dist) -> Optional[tuple[str, dict]]:  # fmt: skip
    """The checkpoint ``--resume`` names (or the latest), ``found`` by the start-up checks as ``(tag, job)``: said,
    and checked against this world, before anything is built."""
    directory = Path(recipe.train.output_dir) / "checkpoints"
    if found is None:
        if resume is not None and dist.is_main:
            tqdm.write(f"[biodistill] --resume: no checkpoint in {directory}; starting from step 0")
        return None
    tag, job = found
    if dist.is_main and "recipe" in job:
        _, noted = preflight.recipe_changes(job["recipe"], recipe)
        for key, before, now in noted:
            tqdm.write(f"[biodistill] --resume: {key} was {before!r} in {directory / tag}, is {now!r} now")
    if recipe.data.streaming and job["world_size"] != dist.world:
        raise ConfigError(
            "--resume", "data.streaming",
            f"{directory / tag} was written by {job['world_size']} ranks; a stream's per-rank position "
            f"resumes only on the same world size, not {dist.world} (prepare a cache to change it)",
        )  # fmt: skip
    return found


def tag_to_load(directory: Path, tag: str, job: dict, world: int, ds_config: dict) -> str:
    """The tag this engine loads: ``tag`` itself, or, for a checkpoint of another world size with
    partitioned optimizer states, its conversion to DeepSpeed's universal format (set in ``ds_config``)."""
    if not checkpoint.needs_universal(str(directory), tag, job, world):
        return tag
    ds_config.setdefault("checkpoint", {})["load_universal"] = True
    return checkpoint.to_universal(str(directory), tag)


def load_checkpoint(engine, directory: Path, tag: str, job: dict, micro_batch: int, grad_accum: int, dist: Dist,
         streaming: bool, position: Position) -> Position:  # fmt: skip
    """Load ``tag`` into the engine and return the position it restores; refuses another global batch."""
    global_batch = micro_batch * grad_accum * dist.world
    written = job["micro_batch_size"] * job["grad_accum"] * job["world_size"]
    if global_batch != written:
        raise ConfigError(
            "--resume", "train.global_batch_size",
            f"{directory / tag} was written with a global batch of {written} sequences "
            f"({job['micro_batch_size']} x {job['grad_accum']} accumulation x {job['world_size']} ranks); this job's "
            f"is {global_batch}: set train.global_batch_size {written} so no sequence is skipped or repeated",
        )  # fmt: skip
    client = checkpoint.load(engine, str(directory), tag)
    restored = Position(
        step=job["step"],
        # The position is kept in sequences: on another world size it is another count of micro-batches.
        consumed=job["consumed_samples"] // (micro_batch * dist.world),
        skips=dict(client.get("skips", position.skips)),
        skips_in_a_row=client.get("skips_in_a_row", 0),
    )
    if streaming:
        states = client.get("data") or [None]
        if states[dist.rank] is None:
            raise ConfigError(
                "--resume", "data.streaming",
                f"{directory / tag} has no stream position for rank {dist.rank}: it was not written by a streaming job",
            )  # fmt: skip
        restored.stream_state = states[dist.rank]
    if dist.is_main:
        moved = f" (written by {job['world_size']} ranks)" if job["world_size"] != dist.world else ""
        tqdm.write(f"[biodistill] resumed from {directory / tag} at step {restored.step}{moved}")
    return restored
