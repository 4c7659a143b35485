"""Distillation loss terms behind one interface, and the module DeepSpeed trains.

Each term is an ``nn.Module`` built from its recipe entry; ``forward(student, teacher, batch)`` takes the
two models' :class:`~biodistill.engine.models.outputs.Outputs` and returns a scalar. A term declares what it
reads (``student_needs`` / ``teacher_needs``), so the models compute nothing more. Terms that own
parameters (the hidden-MSE projection) are trained with the student and dropped at export, because
they live in :class:`DistillationModel`, not in the student.

Layer maps (see ``config.LayerMap``): hidden states are numbered 0 (embeddings) .. L, attention maps
1 .. L. Multi-layer terms sum over their layer pairs, as TinyBERT and CompactBioBERT do.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.ops import temperature_kl
from .config import ConfigError, LossesConfig, LossTermConfig
from .models.outputs import (
    NOTHING,
    Needs,
    Outputs,
    attention_window,
    encode,
    hidden_size,
    num_heads,
    num_layers,
    score_definition,
)

_ATTN_EPS = 1e-12  # floor inside the logs of the attention KL, as the published scripts used


class TermContext:
    """What a term needs to know to build itself: both model configs and where its recipe entry is."""

    def __init__(
        self, cfg: LossTermConfig, losses: LossesConfig, student_config, teacher_config, key: str, source: str
    ):
        self.cfg, self.losses, self.key, self.source = cfg, losses, key, source
        self.student_config, self.teacher_config = student_config, teacher_config

    def error(self, field: str, message: str) -> ConfigError:
        return ConfigError(self.source, f"{self.key}.{field}" if field else self.key, message)

    def layer_map(self, attention: bool) -> list[tuple[int, int]]:
        spec = self.cfg.layer_map
        ns, nt = num_layers(self.student_config), num_layers(self.teacher_config)
        if spec == "last":
            return [(ns, nt)]
        if spec == "uniform":
            if nt % ns:
                raise self.error(
                    "layer_map", f"'uniform' needs teacher layers ({nt}) to be a multiple of student layers ({ns})"
                )
            return [(i, i * nt // ns) for i in range(1, ns + 1)]
        low = 1 if attention else 0
        pairs = [(int(s), int(t)) for s, t in spec]
        for s, t in pairs:
            if not (low <= s <= ns and low <= t <= nt):
                what = (
                    "attention maps are numbered 1..L" if attention else "hidden states are numbered 0 (embeddings)..L"
                )
                raise self.error(
                    "layer_map", f"pair [{s}, {t}] is out of range: student has {ns} layers, teacher {nt}; {what}"
                )
        return pairs


class LossTerm(nn.Module):
    student_needs = Needs()
    teacher_needs = Needs()

    def __init__(self, ctx: TermContext):
        super().__init__()
        self.name = ctx.cfg.kind

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> torch.Tensor:
        raise NotImplementedError


def _token_mask(batch: dict) -> torch.Tensor:
    return batch["attention_mask"].bool()


class MLMLoss(LossTerm):
    """Cross-entropy of the student's MLM head on the masked rows."""

    student_needs = Needs(logits=True)

    def forward(self, student, teacher, batch):
        labels = batch["row_labels"]
        total = F.cross_entropy(student.logits.float(), labels, ignore_index=-100, reduction="sum")
        # Divide on device (no .item() sync); a batch with no masked row gives 0, not NaN.
        return total / (labels != -100).sum().clamp(min=1)


class LogitKL(LossTerm):
    """T^2 * KL(softmax(t/T) || softmax(s/T)), batchmean over the logit rows (``losses.logit_rows``)."""

    student_needs = Needs(logits=True)
    teacher_needs = Needs(logits=True)

    def __init__(self, ctx):
        super().__init__(ctx)
        self.temperature = ctx.cfg.temperature or ctx.losses.temperature
        if ctx.student_config.vocab_size != ctx.teacher_config.vocab_size:
            raise ctx.error(
                "kind",
                f"{ctx.cfg.kind} needs one vocabulary: student {ctx.student_config.vocab_size}, "
                f"teacher {ctx.teacher_config.vocab_size}",
            )

    def forward(self, student, teacher, batch):
        return temperature_kl(student.logits, teacher.logits, self.temperature, reduction="batchmean")


class SoftCE(LogitKL):
    """Soft-target cross-entropy, T^2 * -sum softmax(t/T) log softmax(s/T), batchmean over the logit rows
    (TinyBERT's prediction loss). It differs from logit_kl by the teacher's entropy, a constant: same
    gradient, different value."""

    def forward(self, student, teacher, batch):
        t = self.temperature
        target = F.softmax(teacher.logits.float() / t, dim=-1)
        per_row = -(target * F.log_softmax(student.logits.float() / t, dim=-1)).sum(-1)
        return t * t * per_row.sum() / max(per_row.shape[0], 1)


class _HiddenTerm(LossTerm):
    student_needs = Needs(hidden_states=True)
    teacher_needs = Needs(hidden_states=True)

    def __init__(self, ctx, allow_projection: bool):
        super().__init__(ctx)
        self.pairs = ctx.layer_map(attention=False)
        hs, ht = hidden_size(ctx.student_config), hidden_size(ctx.teacher_config)
        self.projection: Optional[nn.Linear] = None
        if ctx.cfg.projection:
            if not allow_projection:
                raise ctx.error("projection", f"{ctx.cfg.kind} has no projection; use hidden_mse")
            self.projection = nn.Linear(hs, ht)  # one W for every layer pair, as in TinyBERT
        elif hs != ht:
            raise ctx.error("kind", f"student width {hs} != teacher width {ht}: use hidden_mse with projection: true")

    def layer_states(self, student: Outputs, teacher: Outputs):
        """Each layer pair's hidden states [B, T, H], the student's through the projection, both in fp32."""
        for s, t in self.pairs:
            hs = student.hidden_states[s]
            if self.projection is not None:
                hs = self.projection(hs.to(self.projection.weight.dtype))
            yield hs.float(), teacher.hidden_states[t].float()


def _token_mean(per_token: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean of a [B, T] tensor over the non-pad tokens. A weighted sum, not ``x[mask]``: boolean indexing has a
    data-dependent shape, which on a GPU makes the host wait for the device."""
    w = batch["attention_mask"].to(per_token.dtype)
    return (per_token * w).sum() / w.sum().clamp(min=1)


class HiddenCosine(_HiddenTerm):
    """Sum over layer pairs of the mean over non-pad tokens of 1 - cos(h_s, h_t)."""

    def __init__(self, ctx):
        super().__init__(ctx, allow_projection=False)

    def forward(self, student, teacher, batch):
        return sum(
            _token_mean(1 - F.cosine_similarity(s, t, dim=-1), batch) for s, t in self.layer_states(student, teacher)
        )


class HiddenMSE(_HiddenTerm):
    """Sum over layer pairs of the element-wise MSE over non-pad tokens, through an optional projection."""

    def __init__(self, ctx):
        super().__init__(ctx, allow_projection=True)

    def forward(self, student, teacher, batch):
        return sum(_token_mean((s - t).pow(2).mean(-1), batch) for s, t in self.layer_states(student, teacher))


class _AttentionTerm(LossTerm):
    student_needs = Needs(attentions=True)
    teacher_needs = Needs(attentions=True)
    source = "attentions"  # or "scores": the pre-softmax maps

    def __init__(self, ctx):
        super().__init__(ctx)
        self.pairs = ctx.layer_map(attention=True)
        hs, ht = num_heads(ctx.student_config), num_heads(ctx.teacher_config)
        if hs != ht:
            raise ctx.error("kind", f"attention terms compare head by head: student has {hs} heads, teacher {ht}")
        for s, t in self.pairs:
            seen = [_keys_seen(ctx.student_config, s), _keys_seen(ctx.teacher_config, t)]
            if seen[0] != seen[1]:
                raise ctx.error(
                    "layer_map",
                    f"pair [{s}, {t}]: student layer {s} attends to {seen[0]}, teacher layer {t} to {seen[1]}; "
                    "their maps cover different keys, so pair layers of the same kind",
                )

    def forward(self, student, teacher, batch):
        # Padded keys carry probability 0 in both maps; padded query rows are excluded.
        valid = _token_mask(batch)[:, None, :, None].float()
        total = 0
        for s, t in self.pairs:
            student_map = getattr(student, self.source)[s - 1].float()
            elem = self.elementwise(student_map, getattr(teacher, self.source)[t - 1].float())
            count = valid.sum() * elem.shape[1] * elem.shape[-1]
            total = total + (elem * valid).sum() / count.clamp(min=1)
        return total


def _keys_seen(config, layer: int) -> str:
    """The keys attention layer ``layer`` (1-based) of ``config``'s model reads, in words."""
    window = attention_window(config, layer - 1)
    if window is None:
        return "every key"
    return f"a local window of {window} keys either side ({config.model_type})"


class AttentionKL(_AttentionTerm):
    """KL(teacher || student) of post-softmax attention, element-wise mean over (batch, head, query, key)."""

    @staticmethod
    def elementwise(s, t):
        return t * (torch.log(t + _ATTN_EPS) - torch.log(s + _ATTN_EPS))


class AttentionMSE(_AttentionTerm):
    """MSE of post-softmax attention probabilities, element-wise mean over valid query rows."""

    @staticmethod
    def elementwise(s, t):
        return (s - t).pow(2)


class AttentionScoreMSE(AttentionMSE):
    """MSE of pre-softmax attention scores with padded keys zeroed, as TinyBERT's general distillation."""

    student_needs = Needs(scores=True)
    teacher_needs = Needs(scores=True)
    source = "scores"

    def __init__(self, ctx):
        super().__init__(ctx)
        try:
            student, teacher = score_definition(ctx.student_config), score_definition(ctx.teacher_config)
        except ValueError as e:
            raise ctx.error("kind", str(e)) from None
        if student != teacher:
            raise ctx.error(
                "kind",
                f"attention_score_mse compares pre-softmax scores, and these differ in kind: the student's "
                f"({ctx.student_config.model_type}) are {student}, the teacher's ({ctx.teacher_config.model_type}) "
                f"{teacher}; compare post-softmax maps across families (attention_kl, attention_mse)",
            )


LOSSES: dict[str, type[LossTerm]] = {
    "mlm": MLMLoss,
    "logit_kl": LogitKL,
    "soft_ce": SoftCE,
    "hidden_cosine": HiddenCosine,
    "hidden_mse": HiddenMSE,
    "attention_kl": AttentionKL,
    "attention_mse": AttentionMSE,
    "attention_score_mse": AttentionScoreMSE,
}


ATTENTION_TERMS = ("attention_kl", "attention_mse", "attention_score_mse")


def attention_maps_note(recipe, student_config, teacher_config, element_bytes: int, device_bytes=None):
    """What attention terms hold in memory, in words, when it matters (over 1 GiB), else None; a ConfigError
    naming ``data.max_length`` when the maps alone outgrow ``device_bytes``.

    A term that reads attention maps or scores gets every layer's ``[B, heads, T, T]`` of both models (eager
    attention materialises them, and transformers returns all layers, not only the mapped ones): memory
    quadratic in the sequence, which at ModernBERT's 8k positions is hundreds of GiB."""
    terms = [t.kind for t in recipe.losses.terms if t.kind in ATTENTION_TERMS]
    if not terms:
        return None
    micro, length = recipe.train.micro_batch_size, recipe.data.max_length
    sizes = [
        (role, num_layers(c), num_heads(c), num_layers(c) * num_heads(c) * micro * length**2 * element_bytes)
        for role, c in (("teacher", teacher_config), ("student", student_config))
        if c is not None
    ]
    total = sum(size for *_, size in sizes)
    if total < 2**30 and device_bytes is None:
        return None
    each = " and ".join(f"{size / 2**30:.1f} GiB for the {role}'s ({layers} layers x {heads} heads)"
                        for role, layers, heads, size in sizes)  # fmt: skip
    note = (
        f"{', '.join(terms)} keep every layer's T x T attention maps per head: at data.max_length {length} and "
        f"train.micro_batch_size {micro}, {each} in {element_bytes}-byte precision, before any other activation"
    )
    if device_bytes is not None and total > device_bytes:
        raise ConfigError(
            recipe.source,
            "data.max_length",
            f"{note}; the device has {device_bytes / 2**30:.1f} GiB. Lower data.max_length or "
            "train.micro_batch_size, or use hidden-state and logit terms, which stay linear in T",
        )
    return note if total >= 2**30 else None


def build_terms(losses: LossesConfig, student_config, teacher_config, source: str) -> list[LossTerm]:
    terms = []
    for i, cfg in enumerate(losses.terms):
        ctx = TermContext(cfg, losses, student_config, teacher_config or student_config, f"losses.terms[{i}]", source)
        if teacher_config is None and cfg.kind != "mlm":
            raise ctx.error("kind", f"{cfg.kind} needs a teacher (teacher.path)")
        terms.append(LOSSES[cfg.kind](ctx))
    return terms


class DistillationModel(nn.Module):
    """What DeepSpeed trains: the student and the loss terms' own parameters.

    ``forward`` returns the weighted total loss, the unweighted per-term values ``[n_terms]`` (detached,
    for logging) and the student's outputs (evaluation reads them).
    """

    def __init__(self, student: nn.Module, terms: list[LossTerm], weights: list[float]):
        super().__init__()
        self.student = student
        self.terms = nn.ModuleList(terms)
        self.weights = list(weights)
        self.student_needs = Needs()
        self.teacher_needs = Needs()
        for term in terms:
            self.student_needs |= term.student_needs
            self.teacher_needs |= term.teacher_needs

    @property
    def term_names(self) -> list[str]:
        return [t.name for t in self.terms]

    def forward(self, batch: dict, teacher: Outputs, extra: Needs = NOTHING):
        needs = self.student_needs | extra
        student = encode(
            self.student, batch["input_ids"], batch["attention_mask"], needs, batch["rows"], batch.get("padded", True)
        )
        loss, values = self.combine(student, teacher, batch)
        return loss, values, student

    def combine(self, student: Outputs, teacher: Outputs, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The weighted total of the terms on both models' outputs, and the detached per-term values."""
        values = [term(student, teacher, batch) for term in self.terms]
        loss = sum(w * v for w, v in zip(self.weights, values))
        return loss, torch.stack([v.detach().float() for v in values])
