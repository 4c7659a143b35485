"""Non-finite micro-batches, decided on the device: the step never waits on the host to skip one.

A micro-batch whose student loss or teacher outputs hold inf/NaN on any rank must not reach the weights,
and every rank must treat it alike or the replicas' gradient reductions stop pairing up. Deciding that
on the host (read the flags, then branch) stalls the GPU once per micro-step. Instead, per micro-batch:

  1. each rank writes its two flags (loss, teacher) into its row of a [world, 2] tensor; one all-reduce
     (enqueued on the stream, no host wait) gives every rank the same verdict;
  2. every rank still runs backward, and a hook on each trainable parameter zeroes that parameter's
     gradient when the verdict is "skip" (``masked_fill``, not a multiply: NaN x 0 is NaN). Gradients are
     zeroed at the parameters, below every place a NaN can arise (the loss, a term, the student's own
     activations), so the step's other micro-batches are untouched and the replicas stay in lockstep;
  3. the verdicts of the log window accumulate in a device buffer that the host reads at log, save and
     end points (:meth:`SkipGuard.flush`): counts, the per-batch warnings, and the stop after
     ``train.max_consecutive_skips`` in a row.

A skipped micro-batch counts as consumed (no replacement is drawn: drawing one would need the verdict on
the host), so the data order, and with it a resume, stays exact. Its loss and tokens are left out of the
logged means.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Optional

import torch
import torch.distributed as dist

from .health import JobError
from .resume import Position

log = logging.getLogger("biodistill")

WHAT = {  # the kinds Position.skips counts
    "nonfinite_loss": "student loss",
    "teacher_nonfinite": "teacher outputs (an fp16 teacher overflowing?)",
}


class SkipGuard:
    def __init__(self, params, rank: int, world: int, device, capacity: int = 64):
        self.rank, self.world, self.device = rank, world, device
        self.flags = torch.zeros(capacity, world, 2, device=device)  # one row per micro-batch of the window
        self.where: list[tuple[int, int, dict]] = []  # host side of each row: step, micro-batch, batch names
        self.skip = torch.zeros((), dtype=torch.bool, device=device)  # this micro-batch's verdict
        self.hooks = [p.register_hook(self._gate) for p in params if p.requires_grad]

    def _gate(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.masked_fill(self.skip, 0)

    def check(self, loss: torch.Tensor, teacher_nonfinite: torch.Tensor, step: int, micro: int, names: dict):
        """The all-ranks verdict on this micro-batch, as a 0-d bool tensor on the device (True = keep it);
        arms the gradient gate for its backward."""
        row = torch.zeros(self.world, 2, device=self.device)
        row[self.rank, 0] = (~torch.isfinite(loss.detach())).any().float()
        row[self.rank, 1] = teacher_nonfinite.float()
        dist.all_reduce(row)
        n = len(self.where)
        if n == self.flags.shape[0]:  # a longer log window than foreseen: grow (a host decision, no sync)
            self.flags = torch.cat([self.flags, torch.zeros_like(self.flags)])
        self.flags[n] = row
        self.where.append((step, micro, names))
        self.skip = row.any()
        return ~self.skip

    def flush(self, pos: Position, max_in_a_row: int, name_of: Callable[[dict], str]) -> None:
        """Read the window's verdicts (one host read): count them into ``pos``, warn for this rank's own
        skips, and raise JobError once ``max_in_a_row`` micro-batches in a row were skipped. Every rank
        flushes at the same points and reads the same verdicts, so the collective below pairs up."""
        if not self.where:
            return
        flags = self.flags[: len(self.where)].cpu().bool()
        where, self.where = self.where, []
        for (step, micro, names), row in zip(where, flags):
            if not row.any():
                pos.skips_in_a_row = 0
                continue
            kind = "teacher_nonfinite" if row[:, 1].any() else "nonfinite_loss"
            pos.skips[kind] += 1
            pos.skips_in_a_row += 1
            if row[self.rank].any():
                log.warning(
                    "rank %d: step %d: non-finite %s on %s; its gradients zeroed on every rank (%d in a row, %d in all)",
                    self.rank, step, WHAT[kind], name_of(names), pos.skips_in_a_row, sum(pos.skips.values()),
                )  # fmt: skip
            if pos.skips_in_a_row >= max_in_a_row:
                batch_names: list[Optional[str]] = [None] * self.world
                dist.all_gather_object(batch_names, name_of(names))
                ranks = row.any(1).nonzero().flatten().tolist()
                raise JobError(
                    f"step {step} (micro-batch {micro}): {pos.skips_in_a_row} micro-batches in a row had a "
                    f"non-finite {WHAT[kind]} (train.max_consecutive_skips = {max_in_a_row}); the last on "
                    + ", ".join(f"rank {i}: {batch_names[i]}" for i in ranks)
                )

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
