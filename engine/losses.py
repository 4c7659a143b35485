"""Distillation loss terms behind one interface, and the module DeepSpeed trains.

Each term is an ``nn.Module`` built from its recipe entry; ``forward(student, teacher, batch)`` takes the
two models' :class:`~biodistill.engine.models.outputs.Outputs` and returns a scalar. A term declares what it
reads (``student_needs`` / ``teacher_needs``), so the models compute nothing more, and what its kind needs of
the recipe (a teacher, the MLM head). Terms that own parameters (the hidden-MSE projection) are trained with
the student and dropped at export, because they live in the :class:`~biodistill.engine.distiller.Distiller`,
not in the student. The registry ``LOSSES`` is the one place a kind is named.

Layer maps (see ``config.LayerMap``): hidden states are numbered 0 (embeddings) .. L, attention maps
1 .. L. Multi-layer terms sum over their layer pairs, as TinyBERT and CompactBioBERT do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.ops import attention_divergence, temperature_kl
from ..kernels.reference import KL_FLOOR
from .config import ConfigError, LossesConfig, LossTermConfig
from .models.outputs import (
    CAPTURE_TYPES,
    Needs,
    Outputs,
    attention_width,
    attention_window,
    hidden_size,
    num_heads,
    num_layers,
    score_definition,
)


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
    """One distillation term. The class says what the kind needs, so that nothing else names kinds: the outputs
    it reads of each model (``student_needs`` / ``teacher_needs``; a term whose needs depend on its options sets
    them in ``__init__``), whether it reads a teacher at all (``uses_teacher``) and the student's MLM head
    (``uses_mlm_head``); and :meth:`check` validates its recipe entry before any model exists."""

    student_needs = Needs()
    teacher_needs = Needs()
    uses_teacher = True
    uses_mlm_head = False
    uses_task = False  # reads the task head: only in a task recipe (task.path)

    def __init__(self, ctx: TermContext):
        super().__init__()
        self.name = ctx.cfg.kind

    @classmethod
    def check(cls, cfg: LossTermConfig, error: Callable[[str, str], ConfigError]) -> None:
        """This term's options, from its recipe entry alone; ``error(field, message)`` names the key."""
        if cfg.temperature is not None and cfg.temperature <= 0:
            raise error("temperature", "must be > 0")
        if isinstance(cfg.layer_map, str):
            if cfg.layer_map not in ("last", "uniform"):
                raise error(
                    "layer_map",
                    f"must be 'last', 'uniform' or a list of [student, teacher] pairs, got {cfg.layer_map!r}",
                )
            return
        if not cfg.layer_map:
            raise error("layer_map", "an empty list pairs no layers: give [[student, teacher], ...]")
        for j, pair in enumerate(cfg.layer_map):
            if len(pair) != 2 or min(pair) < 0:
                raise error(f"layer_map[{j}]", f"must be a [student, teacher] pair of layer numbers >= 0, got {pair}")

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> torch.Tensor:
        raise NotImplementedError


def _token_mask(batch: dict) -> torch.Tensor:
    return batch["attention_mask"].bool()


class MLMLoss(LossTerm):
    """Cross-entropy of the student's MLM head on the masked rows."""

    student_needs = Needs(logits=True)
    uses_teacher = False
    uses_mlm_head = True

    def forward(self, student, teacher, batch):
        labels = batch["row_labels"]
        total = F.cross_entropy(student.logits.float(), labels, ignore_index=-100, reduction="sum")
        # Divide on device (no .item() sync); a batch with no masked row gives 0, not NaN.
        return total / (labels != -100).sum().clamp(min=1)


class LogitKL(LossTerm):
    """T^2 * KL(softmax(t/T) || softmax(s/T)), batchmean over the logit rows (``losses.logit_rows``)."""

    student_needs = Needs(logits=True)
    teacher_needs = Needs(logits=True)
    uses_mlm_head = True

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


class TaskKL(LossTerm):
    """T^2 * KL(softmax(t/T) || softmax(s/T)) of the task heads' logits: per token over the non-pad tokens (ner),
    per example otherwise; batchmean over those rows. The teacher's logits are live or stored."""

    student_needs = Needs(task_logits=True)
    teacher_needs = Needs(task_logits=True)
    uses_task = True

    def __init__(self, ctx):
        super().__init__(ctx)
        self.temperature = ctx.cfg.temperature or ctx.losses.temperature

    def forward(self, student, teacher, batch):
        s, t = student.task_logits, teacher.task_logits
        mask = batch["attention_mask"].bool() if s.ndim == 3 else None
        return temperature_kl(s, t, self.temperature, reduction="batchmean", mask=mask)


class TaskCE(LossTerm):
    """Cross-entropy of the student's task head on the gold labels, where there are any (an unlabeled sentence's
    labels are all -100); a batch without one gives 0."""

    student_needs = Needs(task_logits=True)
    uses_teacher = False
    uses_task = True

    def forward(self, student, teacher, batch):
        labels = batch["labels"]
        logits = student.task_logits.float().flatten(0, -2)
        total = F.cross_entropy(logits, labels.flatten(), ignore_index=-100, reduction="sum")
        return total / (labels != -100).sum().clamp(min=1)


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
    """A term on attention maps, taken one of two ways (``losses.attention_path``, decided once per term):

    - fused: from each mapped layer's queries and keys, captured while both models run SDPA/flash
      (models/attention.py), by ``kernels.ops.attention_divergence``: the Triton kernel on a GPU, the blocked
      PyTorch path on a CPU, either without a T x T tensor;
    - maps: every layer's ``[B, heads, T, T]`` maps (or scores) from eager attention (the scores tap for some
      families), for the families whose attention cannot be captured (DeBERTa's disentangled scores).

    Both compute the same value: the per-row sum over keys (padded keys and keys outside a local window carry
    probability 0 in both maps), averaged over valid query rows x heads x T, as the published scripts' mean
    over (batch, head, query, key) did. The fused path compares the attention distributions themselves; in
    training, the maps transformers returns for the student are after attention dropout (zeroed and rescaled
    entries), so the two paths agree exactly only without attention dropout."""

    source = "attentions"  # what the maps path reads: post-softmax maps, or "scores" (pre-softmax)
    divergence = ""  # what the fused path computes (kernels.reference.ATTENTION_KINDS): each term says

    def __init__(self, ctx):
        super().__init__(ctx)
        self.pairs = ctx.layer_map(attention=True)
        hs, ht = num_heads(ctx.student_config), num_heads(ctx.teacher_config)
        if hs != ht:
            raise ctx.error("kind", f"attention terms compare head by head: student has {hs} heads, teacher {ht}")
        self.windows = []
        for s, t in self.pairs:
            seen = [_keys_seen(ctx.student_config, s), _keys_seen(ctx.teacher_config, t)]
            if seen[0] != seen[1]:
                raise ctx.error(
                    "layer_map",
                    f"pair [{s}, {t}]: student layer {s} attends to {seen[0]}, teacher layer {t} to {seen[1]}; "
                    "their maps cover different keys, so pair layers of the same kind",
                )
            self.windows.append(attention_window(ctx.student_config, s - 1))
        self.path, self.why = attention_path(ctx)
        if self.path == "fused":
            self.student_needs = Needs(queries_keys=frozenset(s - 1 for s, _ in self.pairs))
            self.teacher_needs = Needs(queries_keys=frozenset(t - 1 for _, t in self.pairs))
        else:
            self.student_needs = self.teacher_needs = Needs(**{self.source: True})

    def forward(self, student, teacher, batch):
        valid = _token_mask(batch)  # padded keys and padded query rows are out
        T = valid.shape[1]
        total = 0
        for (s, t), window in zip(self.pairs, self.windows):
            if self.path == "fused":
                a, b = student.captured[s - 1], teacher.captured[t - 1]
                per_row = attention_divergence(a.query, a.key, b.query, b.key, self.divergence, key_mask=valid,
                                               rows=valid, window=window, scale_s=a.scaling, scale_t=b.scaling)  # fmt: skip
                heads, summed = per_row.shape[1], per_row.sum()
            else:
                student_map = getattr(student, self.source)[s - 1].float()
                elem = self.elementwise(student_map, getattr(teacher, self.source)[t - 1].float())
                heads, summed = elem.shape[1], (elem * valid[:, None, :, None]).sum()
            total = total + summed / (valid.sum() * heads * T).clamp(min=1)
        return total

    def memory(self, micro_batch: int, length: int, element_bytes: int, student_config, teacher_config) -> int:
        """Bytes this term makes the step hold beyond what the models' own SDPA forwards hold."""
        if self.path == "maps":  # every layer of both models, whatever the layer map (transformers returns all)
            return sum(num_layers(c) * num_heads(c) * micro_batch * length**2 * element_bytes
                       for c in (student_config, teacher_config))  # fmt: skip
        # The teacher's captured queries and keys (the student's are its SDPA's own, kept for backward anyway)
        # and the kernel's three fp32 statistics a row, per layer pair.
        tokens, heads = micro_batch * length, num_heads(teacher_config)
        per_pair = tokens * (2 * attention_width(teacher_config) * element_bytes + 3 * 4 * heads)
        return len(self.pairs) * per_pair


def attention_path(ctx: TermContext) -> tuple[str, str]:
    """``("fused" | "maps", why)`` for an attention term: ``losses.attention_path``, with "auto" resolved."""
    asked = ctx.losses.attention_path
    if asked == "maps":
        return "maps", "losses.attention_path is maps"
    outside = sorted({c.model_type for c in (ctx.student_config, ctx.teacher_config)} - CAPTURE_TYPES)
    if outside:
        why = (
            f"{', '.join(outside)} computes its scores inside its own attention module: no queries and keys to capture"
        )
        if asked == "fused":
            raise ConfigError(
                ctx.source,
                "losses.attention_path",
                f"fused needs both models' queries and keys, but {why}; use auto or maps",
            )
        return "maps", why
    return "fused", "both models' queries and keys are captured while SDPA runs"


def _keys_seen(config, layer: int) -> str:
    """The keys attention layer ``layer`` (1-based) of ``config``'s model reads, in words."""
    window = attention_window(config, layer - 1)
    if window is None:
        return "every key"
    return f"a local window of {window} keys either side ({config.model_type})"


class AttentionKL(_AttentionTerm):
    """KL(teacher || student) of post-softmax attention, element-wise mean over (batch, head, query, key), with
    the published scripts' 1e-12 floor inside both logs (a student probability far below it is not pushed up)."""

    divergence = "kl_floor"

    @staticmethod
    def elementwise(s, t):
        return t * (torch.log(t + KL_FLOOR) - torch.log(s + KL_FLOOR))


class AttentionMSE(_AttentionTerm):
    """MSE of post-softmax attention probabilities, element-wise mean over valid query rows."""

    divergence = "mse"

    @staticmethod
    def elementwise(s, t):
        return (s - t).pow(2)


class AttentionScoreMSE(AttentionMSE):
    """MSE of pre-softmax attention scores with padded keys zeroed, as TinyBERT's general distillation."""

    source = "scores"
    divergence = "score_mse"

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


class RelationKL(LossTerm):
    """MiniLMv2's multi-head self-attention relation distillation (Wang et al., 2021).

    For each relation X in ``relations`` (query, key, value) of a layer pair, both models' X ``[B, T, width]`` is
    split into ``relation_heads`` heads of width / relation_heads (so the two models may differ in width and in
    attention heads), R = softmax(X_h X_h^T / sqrt(d_r)) over the valid keys, and the term is the sum over
    relations of KL(R_teacher || R_student) per query row, averaged over valid rows and relation heads.
    MiniLMv2 distils one teacher layer (the last for base-size teachers, an upper-middle one for large ones)
    into the student's last. Computed by the attention kernel with (q, k) = (X, X): no T x T tensor."""

    @classmethod
    def check(cls, cfg, error):
        super().check(cfg, error)
        if not cfg.relations or len(set(cfg.relations)) != len(cfg.relations):
            raise error("relations", f"must list query, key and/or value, each once, got {cfg.relations}")
        if cfg.relation_heads < 0:
            raise error("relation_heads", f"must be >= 0 (0: the teacher's heads), got {cfg.relation_heads}")

    def __init__(self, ctx):
        super().__init__(ctx)
        self.pairs = ctx.layer_map(attention=True)
        self.relations = list(ctx.cfg.relations)
        self.heads = ctx.cfg.relation_heads or num_heads(ctx.teacher_config)
        for role, config in (("student", ctx.student_config), ("teacher", ctx.teacher_config)):
            width = attention_width(config)
            if width % self.heads:
                raise ctx.error(
                    "relation_heads",
                    f"{self.heads} relation heads do not divide the {role}'s attention width {width} "
                    f"({config.model_type}); pick a common divisor of both models' widths",
                )
        self.path, self.why = attention_path(ctx)
        if self.path != "fused":
            raise ctx.error("kind", f"relation_kl reads captured queries, keys and values, and here {self.why}")
        student_layers, teacher_layers = (frozenset(pair[i] - 1 for pair in self.pairs) for i in (0, 1))
        with_values = "value" in self.relations
        self.student_needs = Needs(queries_keys=student_layers, values=student_layers if with_values else frozenset())
        self.teacher_needs = Needs(queries_keys=teacher_layers, values=teacher_layers if with_values else frozenset())

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, heads, T, d]`` -> ``[B, relation_heads, T, heads * d / relation_heads]``."""
        B, H, T, d = x.shape
        return x.transpose(1, 2).reshape(B, T, self.heads, H * d // self.heads).transpose(1, 2)

    def forward(self, student, teacher, batch):
        valid = _token_mask(batch)
        total = 0
        for s, t in self.pairs:
            a, b = student.captured[s - 1], teacher.captured[t - 1]
            for relation in self.relations:
                xs, xt = self.split(getattr(a, relation)), self.split(getattr(b, relation))
                per_row = attention_divergence(xs, xs, xt, xt, "kl", key_mask=valid, rows=valid)
                total = total + per_row.sum() / (valid.sum() * self.heads).clamp(min=1)
        return total

    def memory(self, micro_batch: int, length: int, element_bytes: int, student_config, teacher_config) -> int:
        """The teacher's captured X per relation and pair, and the kernel's row statistics."""
        per_relation = micro_batch * length * (attention_width(teacher_config) * element_bytes + 3 * 4 * self.heads)
        return len(self.pairs) * len(self.relations) * per_relation


LOSSES: dict[str, type[LossTerm]] = {
    "mlm": MLMLoss,
    "logit_kl": LogitKL,
    "soft_ce": SoftCE,
    "hidden_cosine": HiddenCosine,
    "hidden_mse": HiddenMSE,
    "attention_kl": AttentionKL,
    "attention_mse": AttentionMSE,
    "attention_score_mse": AttentionScoreMSE,
    "relation_kl": RelationKL,
    "task_kl": TaskKL,
    "task_ce": TaskCE,
}


def attention_notes(recipe, terms: list[LossTerm], student_config, teacher_config, element_bytes: int,
                    device_bytes=None) -> list[str]:  # fmt: skip
    """One line per attention or relation term: the path it takes, why, and what it holds in memory at this
    ``data.max_length`` and micro-batch; a ConfigError naming ``data.max_length`` when the maps path's maps
    alone outgrow ``device_bytes``. The maps path is quadratic in T (eager attention materialises every layer's
    ``[B, heads, T, T]`` of both models: at ModernBERT's 8k positions, hundreds of GiB); the fused path is linear."""
    micro, length = recipe.train.micro_batch_size, recipe.data.max_length
    notes, maps_notes, maps = [], [], {}
    for term in terms:
        if not isinstance(term, (_AttentionTerm, RelationKL)):
            continue
        size = term.memory(micro, length, element_bytes, student_config, teacher_config)
        if term.path == "maps":
            how = "eager attention's T x T maps of every layer of both models, quadratic in T"
        else:
            how = "the attention kernel on captured queries and keys, both models on SDPA/flash, linear in T"
        notes.append(
            f"{term.name}: {term.path} path ({term.why}): {how}; {size / 2**30:.2f} GiB at data.max_length {length} "
            f"and train.micro_batch_size {micro} in {element_bytes}-byte precision"
        )
        if term.path == "maps":
            maps_notes.append(notes[-1])
            maps[term.source] = size  # terms reading the same maps (or scores) share one set
    if device_bytes is not None and sum(maps.values()) > device_bytes:
        raise recipe.error(
            "data.max_length",
            f"{'; '.join(maps_notes)}. That is {sum(maps.values()) / 2**30:.1f} GiB of maps; the device has "
            f"{device_bytes / 2**30:.1f} GiB. Lower data.max_length or train.micro_batch_size, use "
            "losses.attention_path auto (linear in T where both families allow it), or hidden-state and logit terms",
        )
    return notes


def needs_teacher(losses: LossesConfig) -> bool:
    """Whether any term reads the teacher (an MLM-only recipe has no teacher, or uses it only to copy layers)."""
    return any(LOSSES[t.kind].uses_teacher for t in losses.terms)


def validate_terms(recipe) -> None:
    """Every term of ``recipe`` by its class: a known kind, its own options, and what the kinds need of the rest
    of the recipe (a teacher, the student's MLM head). Before any model config is read."""
    for i, term in enumerate(recipe.losses.terms):
        key = f"losses.terms[{i}]"

        def error(field: str, message: str, key=key) -> ConfigError:
            return recipe.error(f"{key}.{field}", message)

        if term.kind not in LOSSES:
            raise error("kind", f"unknown loss {term.kind!r}; known: {', '.join(LOSSES)}")
        LOSSES[term.kind].check(term, error)
    teacher = needs_teacher(recipe.losses)
    if teacher and not recipe.teacher.path:
        raise recipe.error("teacher.path", "a teacher is required by the loss terms")
    if recipe.teacher.placement != "replicated" and not teacher:
        raise recipe.error(
            "teacher.placement",
            f"{recipe.teacher.placement!r} places a teacher that no loss term uses; drop it or add a distillation term",
        )
    head = sorted({t.kind for t in recipe.losses.terms if LOSSES[t.kind].uses_mlm_head})
    task = sorted({t.kind for t in recipe.losses.terms if LOSSES[t.kind].uses_task})
    if recipe.is_task and head:
        raise recipe.error("losses.terms", f"{', '.join(head)} read(s) the MLM head; a task recipe's models carry the "
                           "task's head instead: use task_kl / task_ce")  # fmt: skip
    if recipe.is_task and not task:
        raise recipe.error("losses.terms", "a task recipe (task.path) trains the task head: add task_kl or task_ce")
    if task and not recipe.is_task:
        raise recipe.error("task.path", f"the {', '.join(task)} term(s) read a task head: name the task's data")
    if head and not recipe.student.mlm_head:
        raise recipe.error("student.mlm_head", f"the {', '.join(head)} term(s) need the MLM head")


def build_terms(losses: LossesConfig, student_config, teacher_config, source: str) -> list[LossTerm]:
    terms = []
    for i, cfg in enumerate(losses.terms):
        ctx = TermContext(cfg, losses, student_config, teacher_config or student_config, f"losses.terms[{i}]", source)
        if teacher_config is None and LOSSES[cfg.kind].uses_teacher:
            raise ctx.error("kind", f"{cfg.kind} needs a teacher (teacher.path)")
        terms.append(LOSSES[cfg.kind](ctx))
    return terms
