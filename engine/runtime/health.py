"""No job hangs forever: a heartbeat per rank in the job's rendezvous store, and a watchdog that ends
every rank once one has failed.

The failure modes of a long data-parallel job, and what ends each:

- a rank raises (a bug, a full disk, a collective that timed out or lost its peer): :meth:`Health.fail`
  names the rank at fault, posts ``abort`` in the store and exits; every other rank's watchdog sees the
  post within one beat and exits too, wherever its main thread is blocked;
- a rank dies (SIGKILL, OOM killer, node loss): its peers' next collective fails at once (the socket
  closes) and they take the path above; the heartbeats say which rank went silent;
- a rank stalls (a wedged device, a hung filesystem): its peers' collective times out after
  ``train.collective_timeout`` seconds; the heartbeats show it behind the others, which names it;
- every rank stalls, or one stalls outside any collective: each rank's watchdog notices its own main
  thread made no progress for ``train.collective_timeout`` seconds and aborts the job;
- rank 0 dies: the store lives in its process; a watchdog that cannot reach it names rank 0 and exits;
- the launcher ends the job after a rank failed (DeepSpeed's launcher SIGTERMs every rank about a second
  after one exits non-zero): the survivors' SIGTERM names the rank that died (:meth:`Health.peer_failed`),
  so the report does not depend on whether a survivor's collective failed first. Any other SIGTERM (the
  scheduler, a user) is a preemption, not a failure: ``preempt.py`` saves and exits "resume me".

Heartbeats go through ``torch.distributed``'s own TCPStore (the one every rank rendezvoused on), so this
works under the deepspeed launcher, pdsh, mpirun and Slurm alike, on gloo and NCCL.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import traceback
from typing import Optional

import torch.distributed as dist

from . import preempt
from .distributed import release_shared_memory


class JobError(RuntimeError):
    """A failure every rank meets together (and agrees on): reported once, by rank 0."""


class Health:
    def __init__(self, rank: int, world: int, timeout: float):
        self.rank, self.world, self.timeout = rank, world, timeout
        # A beat every few seconds costs the store nothing; fast enough to name a dead rank promptly.
        self.interval = max(0.2, min(5.0, timeout / 10))
        base = dist.distributed_c10d._get_default_store()
        self.store = dist.PrefixStore(f"biodistill/health/{os.environ.get('MASTER_PORT', '')}/", base)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.progress, self.step, self.phase = 0, 0, "start"
        self.last_progress = time.monotonic()
        self._stop = threading.Event()
        # The watchdog and a failing main thread must not both report; re-entrant, because a report may
        # end in another (fail -> _exit) on the same thread.
        self._lock = threading.RLock()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> Health:
        self._beat()
        self._thread = threading.Thread(target=self._watch, name="biodistill-watchdog", daemon=True)
        self._thread.start()
        if (preemption := preempt.current()) is not None:
            preemption.failure = self.peer_failed
        return self

    def peer_failed(self) -> Optional[str]:
        """Why the launcher is ending this rank, if a rank failed: its posted report, or a rank on this
        host whose process is gone (the launcher only acts on its own ranks). Answered at once, from the
        store and /proc; None when every rank is alive (then the signal is a preemption)."""
        try:
            if self.store.check(["abort"]):
                return self.store.get("abort").decode()
            beats = {r: self._read(r) for r in range(self.world) if r != self.rank}
        except Exception:  # noqa: BLE001  the store lives in rank 0
            return self._store_lost()
        dead = sorted(r for r, b in beats.items() if b is not None and b["host"] == self.host and not _alive(b["pid"]))
        return "; ".join(f"rank {r} (pid {beats[r]['pid']} on {self.host}) died" for r in dead) or None

    def stop(self) -> None:
        """End the watchdog and wait for it: a daemon thread caught inside a store call while the process
        group is destroyed and the interpreter exits aborts the process ("terminate called without an
        active exception")."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval + 5.0)  # one beat; a dead store fails its call sooner
        if (preemption := preempt.current()) is not None:
            preemption.failure = None

    def mark(self, step: int, phase: str) -> None:
        """The main thread reached ``phase`` of ``step``. Every rank marks the same sequence of phases, so
        a rank with fewer marks than its peers is the one holding them up."""
        self.progress += 1
        self.step, self.phase = step, phase
        self.last_progress = time.monotonic()

    # ----------------------------------------------------------------------------------- reporting

    def fail(self, error: BaseException, quiet: bool = False) -> None:
        """This rank failed: name who is at fault, tell every rank, exit. Never returns."""
        detail = f"{type(error).__name__}: {_first_line(error)}"
        self._if_preempting(detail)
        kind = _collective_failure(error)
        if kind is None and not isinstance(error, JobError):  # a bug: its traceback is the report
            traceback.print_exception(error, file=sys.stderr)
        cause = self.diagnose(stalled=kind == "timeout") if kind else ""
        where = f"rank {self.rank} failed at step {self.step} ({self.phase})"
        message = f"{cause}; {where}: {detail}" if cause else f"{where}: {detail}"
        self._post_abort(message)
        self._exit(message, quiet)

    def diagnose(self, stalled: bool) -> str:
        """The ranks that died, from their heartbeats and (same host) their processes; with ``stalled``
        (a collective timed out), else the ranks that fell behind the others. Empty if none is found."""
        deadline = time.monotonic() + 3 * self.interval
        while True:
            try:
                beats = {r: self._read(r) for r in range(self.world) if r != self.rank}
            except Exception:  # noqa: BLE001  any store failure means the same thing
                return self._store_lost()
            now = time.time()
            dead = {
                r: b
                for r, b in beats.items()
                if b is None or now - b["time"] > 3 * self.interval or (b["host"] == self.host and not _alive(b["pid"]))
            }
            if dead:
                return "; ".join(
                    f"rank {r} died (never reported)"
                    if b is None
                    else f"rank {r} (pid {b['pid']} on {b['host']}) died; its last heartbeat, {now - b['time']:.1f} s "
                    f"before, was at step {b['step']} ({b['phase']})"
                    for r, b in sorted(dead.items())
                )
            if stalled:  # beats are fresh after a timeout: progress counts compare like for like
                beats[self.rank] = {"progress": self.progress, "step": self.step, "phase": self.phase}
                low = min(b["progress"] for b in beats.values())
                if low < max(b["progress"] for b in beats.values()):
                    return "; ".join(
                        f"rank {r} stalled at step {b['step']} ({b['phase']}) while the others went on"
                        for r, b in sorted(beats.items())
                        if b["progress"] == low
                    )
            if time.monotonic() > deadline:  # a remote death shows only once its beats stop
                return ""
            time.sleep(self.interval)

    # ------------------------------------------------------------------------------------ internals

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
                if self.store.check(["abort"]):
                    self._exit(f"stopping: {self.store.get('abort').decode()}")
            except Exception:  # noqa: BLE001  the store is unreachable
                if self.rank != 0 and not self._stop.is_set():
                    self._exit(self._store_lost())
            if time.monotonic() - self.last_progress > self.timeout:
                cause = self.diagnose(stalled=True)
                message = (
                    f"rank {self.rank} made no progress for {self.timeout:.0f} s (train.collective_timeout) "
                    f"at step {self.step} ({self.phase})" + (f"; {cause}" if cause else "")
                )
                self._post_abort(message)
                self._exit(message)

    def _beat(self) -> None:
        record = {
            "progress": self.progress,
            "step": self.step,
            "phase": self.phase,
            "time": time.time(),
            "host": self.host,
            "pid": self.pid,
        }
        self.store.set(f"beat/{self.rank}", json.dumps(record))

    def _read(self, rank: int) -> Optional[dict]:
        key = f"beat/{rank}"
        return json.loads(self.store.get(key)) if self.store.check([key]) else None

    def _post_abort(self, message: str) -> None:
        try:
            self.store.compare_set("abort", "", message)  # the first report wins; later ones are echoes
        except Exception:  # noqa: BLE001  the store is gone: the peers' watchdogs notice that themselves
            pass

    def _store_lost(self) -> str:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        return f"rank 0 died or its host is unreachable (the job's rendezvous store at {where}, in rank 0, is gone)"

    def _if_preempting(self, message: str) -> None:
        """This rank was stopping for a preemption: a peer that ran out of grace (or this rank's own clock)
        is what ended the collective, and "resume me" is still the truth: say that and exit with it."""
        preemption = preempt.current()
        if preemption is not None and preemption.deadline is not None:
            preemption.exit_now(f"at step {self.step} ({self.phase}): {message}")

    def _exit(self, message: str, quiet: bool = False) -> None:
        self._if_preempting(message)
        with self._lock:
            if not quiet:
                print(f"biodistill: error: rank {self.rank}: {message}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            if self.rank == 0:  # the store lives here: let the peers read why before it goes
                time.sleep(2 * self.interval)
            release_shared_memory()
            # Not sys.exit: the main thread may be blocked in a collective that will never return, and
            # interpreter shutdown would wait on it.
            os._exit(1)


def _collective_failure(error: BaseException) -> Optional[str]:
    """ "timeout" (a peer too slow), "lost" (a peer gone) or None (not a collective's failure)."""
    text = f"{type(error).__name__} {error}".lower()
    if "timed out" in text or "timeout" in text:
        return "timeout"
    if isinstance(error, dist.DistError) or any(s in text for s in ("gloo", "nccl", "connection", "peer", "socket")):
        return "lost"
    return None


def _alive(pid: int) -> bool:
    """Whether a process on this host still runs; a killed one its parent has not reaped yet (a zombie)
    counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no procfs (macOS): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:500] if text else "(no message)"
