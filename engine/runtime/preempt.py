"""Preemption: a signalled job saves the step it reached and exits with "resume me" (75).

Clusters end jobs with signals. Slurm sends SIGTERM to every process of the job at its time limit and on
preemption, then SIGKILL after ``KillWait`` (30 s by default); ``sbatch --signal=B:USR1@300`` warns the
batch script five minutes earlier, and ``launch/slurm.sbatch`` forwards that warning to the ranks as
SIGUSR1. Either signal, on any rank, starts the same sequence:

1. that rank posts a stop request in the job's rendezvous store (the TCPStore every rank already met on,
   and the watchdog beats into), naming the signal and its sender;
2. at every decision point (each optimiser-step boundary, each held-out batch) every rank asks the store
   "stop here?" with ``compare_set``: the first rank to reach a point fixes the answer for all of them,
   so every rank stops at the same point, with no collective and no rank waiting on another;
3. every rank writes one checkpoint through the atomic save path (data position and RNG included, so
   ``--resume`` continues bit for bit) and exits with :data:`PREEMPTED`.

Bounded: each rank gives the step boundary plus the save ``train.preempt_grace`` seconds from the moment it
learnt of the request; past that it exits with :data:`PREEMPTED` anyway, without the checkpoint, and says
which checkpoint a resume will use (the atomic save leaves ``latest`` naming a whole one). A second signal
exits at once the same way. Outside the training loop (start-up, the final evaluation, save and export)
there is no step to finish: a signal exits at once, saying so.

The signals are taken by a thread blocked in ``sigwaitinfo``, not by a Python handler: a handler runs only
when the main thread next executes bytecode, which a rank blocked in a collective or a long kernel does
not; and ``sigwaitinfo`` says who sent the signal. That matters because DeepSpeed's launcher, when it is
itself signalled (a ``kill`` of the whole process group, Slurm signalling every process), SIGTERMs every
rank it started: that copy of the scheduler's signal is the launcher forwarding it, never "a second
signal"; nor is anything within ``BURST`` seconds of the first (the same signal through a wrapper that
passes it on). The mask is set before torch starts a thread (threads inherit it); forked children get the
default disposition back. The thread still needs the GIL: a native call that holds it while it waits on
a peer (DeepSpeed's CPU shared-memory set-up does, inside ``init_distributed``) delays the exit until it
returns, or until DeepSpeed's launcher SIGKILLs its ranks 30 s after its own SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): "a temporary failure; the user is invited to retry": resume me
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
DEFAULT_GRACE = 25.0  # under Slurm's default KillWait of 30 s
# Signals this soon after the first are copies of it, not a second one: a whole process group signalled
# at once reaches a rank directly and again through each wrapper that passes it on.
BURST = 2.0
REQUEST = "request"


class Preempted(BaseException):
    """The ranks agreed to stop and wrote their checkpoint (``tag``). A BaseException: no ``except
    Exception`` on the way out may take it for a failure."""

    def __init__(self, tag: Optional[str], step: int, seconds: float):
        super().__init__(f"preempted at step {step}")
        self.tag, self.step, self.seconds = tag, step, seconds


class Preemption:
    def __init__(self):
        self.rank = int(os.environ.get("RANK", "0"))
        self.grace = DEFAULT_GRACE
        self.checkpoints: Optional[Path] = None  # where `latest` lives, once the recipe is read
        self.store = None
        self.phase = "start"  # "start" | "train" | "final"
        self.step = 0
        self.signals: list[str] = []  # this rank's signals, as "SIGTERM from pid 123"
        self.deadline: Optional[float] = None
        self.first_at = 0.0
        self.saved = False  # the preemption checkpoint is written: nothing left to lose
        self.failure: Optional[Callable[[], Optional[str]]] = None  # the watchdog's "did a peer fail?"
        self._lock = threading.RLock()
        self._made: list[str] = []  # decision keys since the last step boundary, and before it
        self._deletable: list[str] = []

    # ----------------------------------------------------------------------------------- set-up

    def install(self) -> Preemption:
        """Take SIGTERM and SIGUSR1 on a thread from now on. Call before torch or DeepSpeed start threads."""
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        # A thread started before the mask was set could still take one: then a handler does the same.
        self._handlers = {signum: signal.signal(signum, lambda s, frame: self._received(s, None)) for signum in SIGNALS}
        self._closed = False
        self._listener = threading.Thread(target=self._listen, name="biodistill-signals", daemon=True)
        self._listener.start()
        return self

    def uninstall(self) -> None:
        """Give the signals back as they were. The mask matters beyond this job: a process started from
        here (a test suite's next subprocess) inherits it, and would never see SIGTERM or SIGUSR1."""
        self._closed = True
        signal.pthread_kill(self._listener.ident, signal.SIGUSR1)  # wakes the listener, which then returns
        self._listener.join()
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)

    def configure(self, output_dir: str, grace: float) -> None:
        self.checkpoints, self.grace = Path(output_dir) / "checkpoints", grace

    def attach(self, store, rank: int) -> None:
        """The job's store exists (the process group is up): requests go through it from now on."""
        import torch.distributed as dist

        with self._lock:
            prefix = f"biodistill/preempt/{os.environ.get('MASTER_PORT', '')}/"
            self.store, self.rank = dist.PrefixStore(prefix, store), rank

    def enter(self, phase: str, step: int) -> None:
        with self._lock:
            self.phase, self.step = phase, step
            if self.signals and phase != "train":
                self.exit_now(f"during {_PHASES[phase]}")

    # ------------------------------------------------------------------------------------ signals

    def _listen(self) -> None:
        while True:
            info = signal.sigwaitinfo(SIGNALS)
            if self._closed:
                return
            self._received(info.si_signo, info.si_pid)

    def _received(self, signum: int, sender: Optional[int]) -> None:
        name = signal.Signals(signum).name
        forwarded = sender is not None and sender == os.getppid()
        with self._lock:
            if self.saved or (self.signals and (forwarded or time.monotonic() - self.first_at < BURST)):
                return  # nothing left to lose, or copies of the first signal (the launcher's, a wrapper's)
            if forwarded and (self.deadline is not None or self.requested()):
                # The job is stopping: a peer that saved and exited 75 first makes the launcher end the rest.
                return
            if forwarded and self.failure is not None and (cause := self.failure()):
                # DeepSpeed's launcher ends the other ranks once one exits non-zero: a failure, not a preemption.
                print(f"biodistill: error: rank {self.rank}: {cause}; rank {self.rank} was ended by its launcher "
                      f"at step {self.step}", file=sys.stderr, flush=True)  # fmt: skip
                _exit(1)
            if self.signals:
                self.exit_now(f"on a second signal ({name})")
            who = "the launcher (it was signalled)" if forwarded else f"pid {sender}" if sender else "a sender"
            self.signals.append(f"{name} from {who}")
            self.first_at = time.monotonic()
            if self.phase != "train" or self.store is None:
                self.exit_now(f"during {_PHASES[self.phase]}")
            self._post()
            self._start_clock()

    def _post(self) -> None:
        record = {"signal": self.signals[0], "rank": self.rank, "host": socket.gethostname(), "step": self.step}
        try:
            self.store.compare_set(REQUEST, "", json.dumps(record))  # the first request is the one reported
        except Exception:  # noqa: BLE001  the store is gone: this rank's own clock still ends it
            pass

    def _start_clock(self) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + self.grace
            threading.Thread(target=self._clock, name="biodistill-grace", daemon=True).start()

    def _clock(self) -> None:
        time.sleep(max(0.0, self.deadline - time.monotonic()))
        with self._lock:
            if self.saved:  # written; only the exit itself is slow
                _exit()
            self.exit_now(
                f"the step boundary and the save did not finish within train.preempt_grace = {self.grace:g} s "
                f"(at step {self.step})"
            )

    # ---------------------------------------------------------------------------------- decisions

    def requested(self) -> Optional[dict]:
        """The job's stop request (from any rank), or None."""
        if self.store is None:
            return None
        try:
            if self.store.check([REQUEST]):
                return json.loads(self.store.get(REQUEST))
        except Exception:  # noqa: BLE001  the store is gone; the caller's collective will say so
            pass
        return None

    def stop_here(self, point: str, boundary: bool = False) -> bool:
        """Whether the job stops at ``point``: the same answer on every rank, fixed by the first rank to
        reach it. Every rank passes the same points in the same order (each step boundary; each held-out
        batch, of which every rank has the same count). At a ``boundary`` rank 0 deletes the keys of
        points every rank has passed: they all entered the step just finished, whose collectives needed
        them, so each passed the previous boundary and everything before it."""
        if self.store is None:
            return bool(self.signals)
        key = f"decide/{point}"
        mine = "stop" if self.signals or self.requested() else "go"
        verdict = self.store.compare_set(key, "", mine).decode()
        if boundary and self.rank == 0:
            for old in self._deletable:
                self.store.delete_key(old)
            self._deletable, self._made = [*self._made, key], []
        else:
            self._made.append(key)
        if verdict == "stop":
            with self._lock:
                self._start_clock()  # this rank's grace counts from when it learnt of the request
        return verdict == "stop"

    def checkpoint_written(self) -> None:
        with self._lock:
            self.saved = True

    # --------------------------------------------------------------------------------- reporting

    def summary(self, tag: Optional[str], step: int, seconds: float) -> str:
        """Rank 0's last line of a preempted job: what ended it, at which step, what was written."""
        request = self.requested() or {"signal": self.signals[0] if self.signals else "a signal", "rank": self.rank}
        signame, _, sender = request["signal"].partition(" from ")
        by = "the scheduler's warning, forwarded" if signame == "SIGUSR1" else "the scheduler or a user"
        written = (
            f"wrote checkpoint {self.checkpoints / tag} in {seconds:.1f} s"
            if tag
            else f"checkpoint {self.checkpoints / f'step{step}'} was already written"
        )
        return (
            f"biodistill: preempted: the job was ended by {signame} ({by}; first seen on rank {request['rank']}, "
            f"from {sender}) at step {step}; {written}; the same command with --resume continues from it "
            f"(exit code {PREEMPTED}: resume me)"
        )

    def unsaved(self, why: str) -> str:
        return f"preempted {why}; exiting without a new checkpoint: {self.resume_point()}"

    def resume_point(self) -> str:
        latest = self.checkpoints / "latest" if self.checkpoints else None
        if latest is not None and latest.is_file():
            return f"a resume will use {self.checkpoints / latest.read_text().strip()}"
        return "no checkpoint exists yet: a resume starts from step 0"

    def exit_now(self, why: str) -> None:
        if self.saved:  # this rank's checkpoint is written: whatever ends it now costs nothing
            _exit()
        print(f"biodistill: rank {self.rank}: {self.unsaved(why)} (exit code {PREEMPTED})", file=sys.stderr, flush=True)
        _exit()


_PHASES = {
    "start": "start-up (before the first training step): nothing to save",
    "train": "training",
    "final": "the final evaluation, checkpoint and export (after the last step)",
}


def _exit(code: int = PREEMPTED) -> None:
    from .distributed import release_shared_memory

    sys.stdout.flush()
    release_shared_memory()
    # Not sys.exit: the main thread may be blocked in a collective that will never return.
    os._exit(code)


def _defaults_in_child() -> None:
    """A forked child (a tokenising pool's worker) is not a rank: it takes the signals the default way."""
    if _current is not None:
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


os.register_at_fork(after_in_child=_defaults_in_child)
_current: Optional[Preemption] = None


@contextlib.contextmanager
def installed() -> Iterator[Preemption]:
    """The process's preemption handling while the block runs (the CLI's whole run). Processes started
    with subprocess meanwhile (DeepSpeed's op builds, Triton's assembler) inherit the blocked mask: short
    tools, which finish by themselves. Nested, the outer installation stays in charge."""
    global _current
    if _current is not None:
        yield _current
        return
    _current = Preemption().install()
    try:
        yield _current
    finally:
        _current.uninstall()
        _current = None


def current() -> Optional[Preemption]:
    """The installed handling, or None where the engine runs without the CLI (a test driving a Trainer)."""
    return _current
