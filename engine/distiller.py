"""One distillation forward: the frozen teacher, its vocabulary map, the student and the loss terms, in one object.

:class:`Distiller` is the module DeepSpeed trains. Its parameters are the student's and the terms' own (the
hidden-MSE projection); the teacher is held beside them, not registered as a submodule, so it is in neither the
optimizer nor the checkpoint, and ZeRO never partitions it (a partitioned or offloaded teacher has its own
inference engine, ``models/teacher.place_teacher``). One call, ``distiller(batch)``, runs the teacher (no grad,
in its own dtype), the student, and every term, and returns::

    loss       the weighted total (what backward reads)
    values     [n_terms], each term unweighted and detached (what the logs read)
    nonfinite  a 0-d bool on the device: the teacher's outputs hold inf or NaN (the skip guard's verdict)
    student    the student's Outputs (held-out evaluation reads them)
    teacher    the teacher's Outputs

Training and held-out evaluation (:meth:`Distiller.heldout`) call the same forward. A batch goes loader ->
trainer -> Distiller -> models and terms -> kernels, and back to the trainer as these five values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .data.batches import to_device
from .losses import LossTerm
from .models.outputs import NOTHING, Needs, Outputs, encode, hidden_size
from .runtime import faults


class Distiller(nn.Module):
    def __init__(self, student: nn.Module, terms: list[LossTerm], weights: list[float],
                 teacher: Optional[nn.Module] = None, vocab_map=None):  # fmt: skip
        super().__init__()
        self.student = student
        self.terms = nn.ModuleList(terms)
        self.weights = list(weights)
        self._teacher = (teacher,)  # a tuple: not a submodule (no optimizer state, no checkpoint, no ZeRO)
        self.vocab_map = vocab_map  # student ids -> teacher ids (teacher.vocab_map: by_token), or None
        self.student_needs, self.teacher_needs = Needs(), Needs()
        for term in terms:
            self.student_needs |= term.student_needs
            self.teacher_needs |= term.teacher_needs

    @property
    def teacher(self) -> Optional[nn.Module]:
        return self._teacher[0]

    @property
    def term_names(self) -> list[str]:
        return [t.name for t in self.terms]

    def teacher_outputs(self, batch: dict, extra: Needs = NOTHING, step: Optional[int] = None) -> Outputs:
        """The teacher's outputs in its own dtype (fp16/bf16 on a GPU): each loss term upcasts what it reads
        and accumulates in fp32, instead of an fp32 copy of every hidden state and attention map here."""
        if "teacher_logits" in batch:  # a task recipe's stored outputs: the teacher does not run
            return Outputs(task_logits=batch["teacher_logits"])
        if self.teacher is None:
            return Outputs()
        ids = batch["input_ids"] if self.vocab_map is None else self.vocab_map.inputs(batch["input_ids"])
        with torch.no_grad():
            needs, padded = self.teacher_needs | extra, batch.get("padded", True)
            out = encode(self.teacher, ids, batch["attention_mask"], needs, batch["rows"], padded,
                         batch.get("token_type_ids"))  # fmt: skip
        if out.logits is not None and self.vocab_map is not None:
            out.logits = self.vocab_map.logits(out.logits)
        if out.logits is not None and step is not None:  # training steps only: a failpoint names the step
            out.logits = faults.poison("teacher.outputs", out.logits, step)
        return out

    def forward(self, batch: dict, extra: Needs = NOTHING, step: Optional[int] = None):
        """``(loss, values, nonfinite, student, teacher)`` for one micro-batch (see the module docstring);
        ``extra`` asks both models for more outputs than the terms read (evaluation's hidden states)."""
        teacher = self.teacher_outputs(batch, extra, step)
        student = encode(
            self.student, batch["input_ids"], batch["attention_mask"], self.student_needs | extra, batch["rows"],
            batch.get("padded", True), batch.get("token_type_ids"),
        )  # fmt: skip
        loss, values = self.combine(student, teacher, batch)
        return loss, values, _nonfinite(teacher, batch["input_ids"].device), student, teacher

    def combine(self, student: Outputs, teacher: Outputs, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The weighted total of the terms on both models' outputs, and the detached per-term values."""
        values = [term(student, teacher, batch) for term in self.terms]
        loss = sum(w * v for w, v in zip(self.weights, values))
        return loss, torch.stack([v.detach().float() for v in values])

    @torch.no_grad()
    def heldout(self, forward: Callable, batches: Iterable[dict], device: torch.device,
                before: Callable[[int], bool] = lambda i: False) -> Optional[dict[str, float]]:  # fmt: skip
        """Held-out loss terms and teacher-student agreement, averaged over every rank's batches. ``forward`` is
        this module as the trainer runs it (its DeepSpeed engine, in eval mode); ``before(i)`` is called before
        batch i and returns True to stop there (a preemption: every rank stops at the same batch, before the
        reduction), and then the result is None."""
        names = ["loss/total", *(f"loss/{n}" for n in self.term_names)]
        names += ["agreement/hidden_cosine", "agreement/top1", "student/mlm_loss", "student/task_accuracy"]
        same_width = self.teacher is not None and hidden_size(self.teacher.config) == hidden_size(self.student.config)
        sums, counts = torch.zeros(len(names)), torch.zeros(len(names))
        for i, batch in enumerate(batches):
            if before(i):
                return None
            batch = to_device(batch, device)
            loss, values, _, student, teacher = forward(batch, Needs(hidden_states=True))
            extra = agreement(batch, student, teacher, same_width)
            row = torch.cat([loss.detach().float().reshape(1).cpu(), values.cpu(), extra])
            sums += torch.nan_to_num(row)
            counts += ~row.isnan()
        stats = torch.cat([sums, counts])
        dist.all_reduce(stats)
        sums, counts = stats.chunk(2)
        return {n: (s / c).item() for n, s, c in zip(names, sums, counts) if c > 0}


def agreement(batch: dict, student: Outputs, teacher: Outputs, same_width: bool) -> torch.Tensor:
    """[hidden cosine, top-1 agreement, student MLM loss, student task accuracy] on one batch; NaN where one does
    not apply: the cosine of the last hidden states over non-pad tokens (same widths only), how often the argmax
    tokens (a task's argmax labels, per token or example) agree, the student's own cross-entropy at the masked
    rows, and how often its task labels are the gold ones (where there are gold labels)."""
    nan = float("nan")
    cosine = top1 = mlm = accuracy = nan
    if teacher.hidden_states is not None and same_width:
        mask = batch["attention_mask"].bool()
        cosine = (
            F.cosine_similarity(
                student.hidden_states[-1][mask].float(), teacher.hidden_states[-1][mask].float(), dim=-1
            )
            .mean()
            .item()
        )
    if student.logits is not None and teacher.logits is not None and len(batch["rows"]):
        top1 = (student.logits.argmax(-1) == teacher.logits.argmax(-1)).float().mean().item()
    if student.logits is not None and (batch["row_labels"] != -100).any():
        mlm = F.cross_entropy(student.logits.float(), batch["row_labels"], ignore_index=-100).item()
    if student.task_logits is not None:
        predicted = student.task_logits.argmax(-1)
        counted = (
            batch["attention_mask"].bool() if predicted.ndim == 2 else torch.ones_like(predicted, dtype=torch.bool)
        )
        if teacher.task_logits is not None:
            top1 = (predicted == teacher.task_logits.argmax(-1))[counted].float().mean().item()
        gold = batch["labels"] != -100
        if gold.any():
            accuracy = (predicted == batch["labels"])[gold].float().mean().item()
    return torch.tensor([cosine, top1, mlm, accuracy])


def _nonfinite(outputs: Outputs, device=None) -> torch.Tensor:
    """True (a 0-d tensor on the outputs' device, or ``device`` when there are none; no sync) when the
    teacher's outputs hold inf or NaN.

    Only the last layer of each kind is read: a non-finite value anywhere in an encoder's forward reaches
    it (each position's row is carried forward by the residual stream, and into every position that
    attends to it; LayerNorm turns an inf into NaN, it never makes it finite), so the earlier layers add
    nothing but a full pass over every hidden state and T x T map."""
    groups = (outputs.hidden_states, outputs.attentions, outputs.scores, outputs.logits, outputs.task_logits)
    tensors = [x[-1] if isinstance(x, tuple) else x for x in groups if x is not None]
    if outputs.captured:  # the deepest captured layer's queries (a relation-only recipe reads nothing else)
        tensors.append(outputs.captured[max(outputs.captured)].query)
    if not tensors:
        return torch.zeros((), dtype=torch.bool, device=device)
    return torch.stack([~torch.isfinite(t).all() for t in tensors]).any()
