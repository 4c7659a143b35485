"""Failpoints: named places in the engine where a test (or an engineer chasing a bug) can make a rank
die, hang, fail an I/O call or produce a non-finite tensor, on purpose and at an exact moment.

The fault-injection suite uses them to kill a real job mid-save, stall one rank or poison one batch,
then checks what the engine does about it. They are off unless ``BIODISTILL_FAILPOINTS`` is set, and
then cost one dict lookup per call. The variable holds ``;``-separated entries::

    POINT[@STEP][#HIT][:RANK]=ACTION

``save.file@8#2:1=kill`` kills rank 1 after the second file of the step-8 checkpoint is written.
STEP is the training step being run (or saved); HIT counts the calls at that point and step (from 1);
RANK defaults to every rank. Actions: ``kill`` (SIGKILL: no handler, no cleanup, like the OOM
killer or a node failure), ``stall`` (hang forever, like a wedged collective or filesystem),
``ioerror`` (raise EIO), ``nan`` (the tensor passed through :func:`poison` becomes NaN), ``sigterm``
(SIGTERM to the rank's whole process group, launcher included, as a scheduler ends a job: start the job in
a session of its own) and ``sigusr1`` (SIGUSR1 to this rank alone, as Slurm's forwarded warning reaches
it); after either the rank goes on 2.5 s later (past the copies of a signal), its signal thread having had it.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import ConfigError

ENV = "BIODISTILL_FAILPOINTS"
ACTIONS = ("kill", "stall", "ioerror", "nan", "sigterm", "sigusr1")
POINTS = (
    "train.start",  # every rank has joined the process group, nothing is built yet (start-up)
    "train.micro",  # after the teacher and student forwards of a micro-batch, before its backward
    "train.step",  # after the optimizer step, before the step is counted
    "train.loss",  # nan: the student loss of a micro-batch
    "train.weights",  # nan: the student's first weight after an optimizer step (what a diverged update leaves)
    "teacher.outputs",  # nan: the teacher's outputs for a micro-batch (an fp16 overflow, in effect)
    "eval.batch",  # each held-out batch of an evaluation
    "save.begin",  # a checkpoint save starts
    "save.file",  # after each file DeepSpeed writes into the checkpoint
    "save.shards",  # this rank's DeepSpeed files are all written
    "save.meta",  # biodistill.json written into the temporary tag
    "save.renamed",  # the tag renamed into place, `latest` not yet moved
    "save.latest",  # `latest` moved
    "save.prune",  # before each old checkpoint is deleted (train.keep_checkpoints)
    "export.begin",  # the final Hugging Face export starts
)
_ENTRY = re.compile(r"^(?P<point>[a-z_.]+)(@(?P<step>\d+))?(#(?P<hit>\d+))?(:(?P<rank>\d+))?=(?P<action>[a-z0-9]+)$")


@dataclass(frozen=True)
class Failpoint:
    point: str
    action: str
    step: Optional[int] = None
    hit: Optional[int] = None
    rank: Optional[int] = None


def parse(spec: str) -> list[Failpoint]:
    """Entries of ``BIODISTILL_FAILPOINTS``; a malformed one raises ConfigError naming it."""
    out = []
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        m = _ENTRY.match(entry)
        if m is None:
            raise ConfigError("environment", ENV, f"{entry!r} is not POINT[@STEP][#HIT][:RANK]=ACTION")
        if m["point"] not in POINTS:
            raise ConfigError("environment", ENV, f"{entry!r}: unknown point; known: {', '.join(POINTS)}")
        if m["action"] not in ACTIONS:
            raise ConfigError("environment", ENV, f"{entry!r}: unknown action; known: {', '.join(ACTIONS)}")
        num = {k: int(m[k]) if m[k] else None for k in ("step", "hit", "rank")}
        out.append(Failpoint(m["point"], m["action"], **num))
    return out


_armed: list[Failpoint] = []
_hits: Counter = Counter()


def arm(spec: Optional[str] = None) -> None:
    """Arm the failpoints of ``spec`` (default: the environment variable); the CLI calls it at start."""
    _armed[:] = parse(os.environ.get(ENV, "") if spec is None else spec)
    _hits.clear()


def _triggered(point: str, step: Optional[int], actions: tuple[str, ...]) -> Optional[Failpoint]:
    if not _armed:
        return None
    _hits[point, step] += 1
    rank = int(os.environ.get("RANK", "0"))
    for fp in _armed:
        if (
            fp.point == point
            and fp.action in actions
            and fp.step in (None, step)
            and fp.hit in (None, _hits[point, step])
            and fp.rank in (None, rank)
        ):
            return fp
    return None


def hit(point: str, step: Optional[int] = None) -> None:
    """Pass a failpoint: kill, stall or raise here when one is armed for it."""
    fp = _triggered(point, step, ("kill", "stall", "ioerror", "sigterm", "sigusr1"))
    if fp is None:
        return
    rank = os.environ.get("RANK", "0")
    # Announced with a timestamp, so a test can time what the job does after it.
    print(f"biodistill: failpoint {point} (step {step}) on rank {rank}: {fp.action} at {time.time():.3f}",
          file=sys.stderr, flush=True)  # fmt: skip
    if fp.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fp.action in ("sigterm", "sigusr1"):
        if fp.action == "sigterm":
            os.killpg(os.getpgid(0), signal.SIGTERM)
        else:  # the launcher does not take SIGUSR1 (launch/common.sh ignores it): the ranks do
            os.kill(os.getpid(), signal.SIGUSR1)
        from .preempt import BURST

        time.sleep(BURST + 0.5)  # a failpoint's next signal is then a second one, never a copy of this
        return
    if fp.action == "stall":
        threading.Event().wait()  # forever; only the job's watchdog or the launcher ends this rank
    raise OSError(errno.EIO, f"injected I/O error at failpoint {point} (step {step})")


def poison(point: str, tensor: torch.Tensor, step: Optional[int] = None) -> torch.Tensor:
    """``tensor``, or a NaN copy of it when a ``nan`` failpoint is armed here."""
    if _triggered(point, step, ("nan",)) is None:
        return tensor
    return tensor * float("nan")


def poison_weights(point: str, parameters, step: Optional[int] = None) -> None:
    """Make the first of ``parameters`` NaN in place (this rank's ZeRO-3 partition of it) when a ``nan`` failpoint
    is armed here."""
    if _triggered(point, step, ("nan",)) is None:
        return
    first = next(iter(parameters))
    with torch.no_grad():
        getattr(first, "ds_tensor", first).fill_(float("nan"))
