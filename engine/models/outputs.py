"""What the engine asks of a Hugging Face encoder: hidden states, each attention layer's queries, keys and
values (models/attention.py captures them while SDPA runs), attention maps (post-softmax, or the pre-softmax
scores TinyBERT matches, as each family's own attention computes them: the path that needs eager attention),
and LM-head logits at selected rows only. The per-family knowledge lives in the tables below, keyed by
``model_type``: a family missing from one fails at start, by name, never silently.

Running the LM head over every token builds an N x V logit tensor (8 x 256 tokens x 29k vocab is 240 MB
in fp32 per model); the published recipes only use logits at the MLM-masked rows, about 15% of them.
So we run the model's body, gather the rows, and apply the head to those rows alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import minialbert  # noqa: F401  (registers MiniALBERT with the Auto classes)
from .attention import NAME as CAPTURING_ATTENTION
from .attention import Capture, Captured, capturing


@dataclass(frozen=True)
class Needs:
    """The outputs the active loss terms consume; nothing else is computed or kept."""

    logits: bool = False
    hidden_states: bool = False
    attentions: bool = False  # every layer's maps: eager attention
    scores: bool = False  # every layer's pre-softmax attention scores
    queries_keys: frozenset[int] = frozenset()  # attention layers (0-based) whose queries and keys are captured
    values: frozenset[int] = frozenset()  # ... and whose values too
    task_logits: bool = False  # the task head's logits (a task recipe's models: [B, T, C] ner, [B, C] otherwise)

    def __or__(self, other: Needs) -> Needs:
        return Needs(*(getattr(self, f.name) | getattr(other, f.name) for f in fields(self)))


NOTHING = Needs()


@dataclass
class Outputs:
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None  # L+1 x [B, T, H]; 0 is the embedding output
    attentions: Optional[tuple[torch.Tensor, ...]] = None  # L x [B, heads, T, T], post-softmax
    logits: Optional[torch.Tensor] = None  # [rows, V] at the selected rows only
    scores: Optional[tuple[torch.Tensor, ...]] = None  # L x [B, heads, T, T], QK^T/sqrt(d), padded keys 0
    captured: Optional[dict[int, Captured]] = None  # attention layer (0-based) -> its [B, heads, T, d] q, k, v
    task_logits: Optional[torch.Tensor] = None  # the task head's: [B, T, C] per token (ner), [B, C] per example


# model_type -> the MLM head as a callable on [rows, H] hidden states. An explicit table: a model type
# missing here fails loudly at start (see mlm_head) rather than silently computing full logits.
_MLM_HEADS: dict[str, Callable[[nn.Module], Callable[[torch.Tensor], torch.Tensor]]] = {
    "bert": lambda m: m.cls,
    "mobilebert": lambda m: m.cls,
    "roberta": lambda m: m.lm_head,
    "xlm-roberta": lambda m: m.lm_head,
    "camembert": lambda m: m.lm_head,
    "albert": lambda m: m.predictions,
    "distilbert": lambda m: nn.Sequential(m.vocab_transform, m.activation, m.vocab_layer_norm, m.vocab_projector),
    "minialbert": lambda m: m.mlm_head,
    "electra": lambda m: nn.Sequential(m.generator_predictions, m.generator_lm_head),
    "modernbert": lambda m: nn.Sequential(m.head, m.decoder),
    # DeBERTa-v2/v3: the legacy BERT-style head, or the newer one that reads the tied word embeddings.
    "deberta-v2": lambda m: (
        m.cls if m.legacy else (lambda h: m.lm_predictions(h, m.deberta.embeddings.word_embeddings))
    ),
}


def _bert_query_key(base: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    return [(m.attention.self.query, m.attention.self.key) for m in base.encoder.layer]


# model_type -> the (query, key) projections of every layer, in order, for the pre-softmax scores.
_QUERY_KEY: dict[str, Callable[[nn.Module], list[tuple[nn.Module, nn.Module]]]] = {
    "bert": _bert_query_key,
    "mobilebert": _bert_query_key,
    "roberta": _bert_query_key,
    "distilbert": lambda base: [(m.attention.q_lin, m.attention.k_lin) for m in base.transformer.layer],
    # One shared layer applied R times: the same modules fire once per recursion.
    "minialbert": lambda base: (
        [(base.albert.layer.attention.query, base.albert.layer.attention.key)] * base.config.num_hidden_layers
    ),
}


def has_mlm_head(model: nn.Module) -> bool:
    return model is not model.base_model


def mlm_head(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    model_type = model.config.model_type
    if model_type not in _MLM_HEADS:
        raise ValueError(f"no masked-LM head adapter for model_type '{model_type}'; known: {', '.join(_MLM_HEADS)}")
    return _MLM_HEADS[model_type](model)


def encode(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    needs: Needs,
    rows: Optional[torch.Tensor] = None,
    padded: bool = True,
    token_type_ids: Optional[torch.Tensor] = None,
) -> Outputs:
    """Run ``model``'s body and, when ``needs.logits``, its MLM head at the flat token indices ``rows``; or, when
    ``needs.task_logits``, the whole task model (body and task head, as the family's own forward applies it).

    ``rows`` indexes ``[B*T]`` (flattened batch and time); the logits come back as ``[len(rows), V]``.
    ``padded`` (known on the host, from the collator) says whether any token is padding; see model_mask.
    ``token_type_ids``: a pair task's segments (None: all zeros, as the models default).
    """
    tap = score_tap(model) if needs.scores else None
    capture = Capture(needs.queries_keys, needs.values) if needs.queries_keys else None
    try:
        body = model if needs.task_logits else model.base_model
        segments = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        with capturing(capture):
            out = body(
                input_ids=input_ids,
                attention_mask=model_mask(model, attention_mask, padded),
                output_hidden_states=needs.hidden_states,
                output_attentions=needs.attentions,
                return_dict=True,
                **segments,
            )
        scores = tap.scores(attention_mask) if tap is not None else None
    finally:
        if tap is not None:
            tap.close()
    if capture is not None and capture.calls != num_layers(model.config):
        raise RuntimeError(
            f"{model.config.model_type}: {capture.calls} attention layer(s) reached the capturing attention "
            f"function, of {num_layers(model.config)}; the model was not built with attn_implementation "
            f"{CAPTURING_ATTENTION!r} (models/outputs.py, attn_implementation)"
        )
    logits = None
    if needs.logits:
        if rows is None:
            raise ValueError("logits were asked for without the rows to compute them at")
        hidden = out.last_hidden_state.flatten(0, 1).index_select(0, rows)
        logits = mlm_head(model)(hidden)
    return Outputs(
        hidden_states=out.hidden_states if needs.hidden_states else None,
        attentions=out.attentions if needs.attentions else None,
        logits=logits,
        scores=scores,
        captured=capture.layer if capture is not None else None,
        task_logits=out.logits if needs.task_logits else None,
    )


# Model types whose forward builds its attention mask with transformers' create_bidirectional_mask alone
# (or, MiniALBERT, as plain key padding), so that a prepared 4-D mask is taken as it is. Others keep the 2-D
# mask: ModernBERT derives its local layers' sliding window from it, DeBERTa builds its own pairwise mask.
# DeBERTa is always given it: without one it reads input_ids on the host to warn about unmasked padding.
_PREPARED_MASK_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "mobilebert", "albert", "electra", "minialbert"}
)


_ALWAYS_MASKED_TYPES = frozenset({"deberta-v2"})


def model_mask(model: nn.Module, attention_mask: torch.Tensor, padded: bool) -> Optional[torch.Tensor]:
    """The mask ``model``'s forward is given. From a 2-D mask, transformers decides whether it may skip the
    mask by reading it on the host (``padding_mask.all()``): a host-device sync in every forward. So the
    engine decides on the host instead: no mask when no token is padding (attention may then take the
    flash path), else, for the model types above, a prepared ``[B, 1, 1, T]`` additive mask in the model's
    dtype, which their mask functions take as it is, for eager and SDPA attention alike."""
    if model.config.model_type in _ALWAYS_MASKED_TYPES:
        return attention_mask
    if not padded:
        return None
    if model.config.model_type not in _PREPARED_MASK_TYPES:
        return attention_mask
    dtype = next(model.parameters()).dtype
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


# ------------------------------------------------------------------------------- pre-softmax scores


class _ProjectionTap:
    """Scores from each layer's query and key projections, QK^T/sqrt(d): all the BERT family's attention
    computes before its softmax (positions enter at the embeddings), so SDPA or flash attention may run.

    TinyBERT adds the -10000 mask and then zeroes every entry <= -100; zeroing the padded keys of the
    unmasked scores is the same thing without the accident of zeroing a genuinely low score.
    """

    def __init__(self, model: nn.Module):
        self.pairs = _QUERY_KEY[model.config.model_type](model.base_model)
        self.heads = num_heads(model.config)
        self.captured: dict[nn.Module, list[torch.Tensor]] = {m: [] for pair in self.pairs for m in pair}
        self.hooks = [
            module.register_forward_hook(lambda m, _i, out: self.captured[m].append(out)) for module in self.captured
        ]

    def scores(self, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        calls = {m: iter(outs) for m, outs in self.captured.items()}  # the i-th pair reads each module's i-th call
        out = []
        for query, key in self.pairs:
            q, k = next(calls[query]), next(calls[key])
            keep = attention_mask[:, None, None, :].to(q.dtype)
            b, t, width = q.shape
            q = q.view(b, t, self.heads, width // self.heads).transpose(1, 2)
            k = k.view(b, t, self.heads, width // self.heads).transpose(1, 2)
            out.append(torch.matmul(q, k.transpose(-1, -2)) * (width // self.heads) ** -0.5 * keep)
        return tuple(out)

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


_SOFTMAXES = (F.softmax, torch.softmax, torch.Tensor.softmax)


class _SoftmaxInputs(TorchFunctionMode):
    """Records what every softmax inside one attention module's forward is applied to."""

    def __init__(self):
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _SOFTMAXES:
            self.inputs.append(args[0])
        return func(*args, **(kwargs or {}))


class _SoftmaxTap:
    """Scores read where the family's own attention takes its softmax: the very tensor it normalises.

    For families whose scores are more than QK^T/sqrt(d) of two projections, so that re-deriving them
    would re-implement the family: DeBERTa's disentangled attention adds content-to-position and
    position-to-content terms and scales by sqrt(3d); ModernBERT rotates queries and keys inside the
    module (RoPE, with a different base for its global and local layers) and masks its local layers to a
    window. Needs eager attention: SDPA and flash never hold the scores. Entries the family masks (padded
    keys and queries, keys outside a local layer's window) are zeroed, as the projection tap zeroes padded
    keys, so that a masked entry (a dtype's lowest value) never meets another model's in a difference.
    """

    def __init__(self, model: nn.Module):
        self.config = model.config
        self.modules = _SOFTMAX_INPUTS[model.config.model_type](model.base_model)
        self.calls: dict[nn.Module, list[list[torch.Tensor]]] = {m: [] for m in self.modules}
        self.open: list[_SoftmaxInputs] = []
        self.hooks = []
        for module in self.modules:
            self.hooks.append(module.register_forward_pre_hook(self._enter))
            self.hooks.append(module.register_forward_hook(self._exit))

    def _enter(self, module, _args):
        self.open.append(_SoftmaxInputs().__enter__())

    def _exit(self, module, _args, _out):
        mode = self.open.pop()
        mode.__exit__(None, None, None)
        self.calls[module].append(mode.inputs)

    def scores(self, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        t = attention_mask.shape[-1]
        valid = attention_mask.bool()
        pairwise = valid[:, None, :, None] & valid[:, None, None, :]
        out = []
        for layer, module in enumerate(self.modules):
            inputs = self.calls[module][0] if self.calls[module] else []
            if len(inputs) != 1:
                raise RuntimeError(
                    f"{self.config.model_type} layer {layer}: expected one softmax inside "
                    f"{type(module).__name__}, saw {len(inputs)}; its attention is not the eager path the "
                    "pre-softmax scores are read from"
                )
            keep = pairwise
            window = attention_window(self.config, layer)
            if window is not None:
                i = torch.arange(t, device=valid.device)
                keep = keep & ((i[:, None] - i[None, :]).abs() <= window)
            out.append(torch.where(keep, inputs[0], 0))
        return tuple(out)

    def close(self) -> None:
        while self.open:  # a forward that raised inside an attention module
            self.open.pop().__exit__(None, None, None)
        for hook in self.hooks:
            hook.remove()


# model_type -> each layer's attention module, whose one softmax normalises that layer's scores.
_SOFTMAX_INPUTS: dict[str, Callable[[nn.Module], list[nn.Module]]] = {
    "modernbert": lambda base: [layer.attn for layer in base.layers],
    "deberta-v2": lambda base: [layer.attention.self for layer in base.encoder.layer],
}


def _modernbert_window(config, layer: int) -> Optional[int]:
    # A local layer sees keys within sliding_window (half of local_attention) on either side, inclusive.
    return config.sliding_window if config.layer_types[layer] == "sliding_attention" else None


# model_type -> the half-width of a layer's attention window, or None for a global layer.
_SCORE_WINDOW: dict[str, Callable[..., Optional[int]]] = {"modernbert": _modernbert_window}


def score_tap(model: nn.Module):
    """Hooks on ``model`` that read each layer's pre-softmax scores during the next forward; ``close()`` them."""
    model_type = model.config.model_type
    if model_type in _SOFTMAX_INPUTS:
        return _SoftmaxTap(model)
    score_definition(model.config)  # a model type without an adapter fails here, by name
    return _ProjectionTap(model)


def attention_window(config, layer: int) -> Optional[int]:
    """The half-width of the keys layer ``layer`` (0-based) attends to, or None when it attends to all."""
    return _SCORE_WINDOW.get(config.model_type, lambda *_: None)(config, layer)


def score_definition(config) -> str:
    """What the model's pre-softmax attention score is, in words (two models' scores compare only when these
    are equal); a ValueError for a model type the engine cannot read scores from."""
    if config.model_type in _SCORE_DEFINITIONS:
        return _SCORE_DEFINITIONS[config.model_type]
    if config.model_type in _QUERY_KEY:
        return "QK^T/sqrt(d), positions added to the embeddings"
    known = ", ".join([*_QUERY_KEY, *_SOFTMAX_INPUTS])
    raise ValueError(f"no attention-score adapter for model_type '{config.model_type}'; known: {known}")


_SCORE_DEFINITIONS = {
    "modernbert": "QK^T/sqrt(d) of rotated queries and keys (RoPE inside attention)",
    "deberta-v2": "disentangled attention, QK^T plus content-to-position and position-to-content terms over sqrt(3d)",
}


# Families whose attention layers call transformers' AttentionInterface (MiniALBERT calls models/attention.py's
# function itself): their queries, keys and values can be captured while SDPA runs. Not DeBERTa-v2/v3, whose
# disentangled attention computes its own scores.
_INTERFACE_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "mobilebert", "albert", "electra", "modernbert"}
)
CAPTURE_TYPES = _INTERFACE_TYPES | {"minialbert"}


def attn_implementation(needs: Needs, config) -> Optional[str]:
    """ "eager" when a term needs what only eager attention holds (SDPA and flash never materialise the
    probabilities, nor the scores a family's softmax reads); else the capturing SDPA of models/attention.py for
    the families that call their attention through transformers' interface; else None (the model's default)."""
    if needs.attentions or (needs.scores and config.model_type in _SOFTMAX_INPUTS):
        return "eager"
    return CAPTURING_ATTENTION if config.model_type in _INTERFACE_TYPES else None


def num_layers(config) -> int:
    return config.num_hidden_layers


def hidden_size(config) -> int:
    return config.hidden_size if hasattr(config, "hidden_size") else config.dim


def num_heads(config) -> int:
    return config.num_attention_heads


def attention_width(config) -> int:
    """The width of a layer's queries, keys and values, all heads together: MobileBERT attends in its
    bottleneck width (``true_hidden_size``), every other family in its hidden width."""
    return getattr(config, "true_hidden_size", None) or hidden_size(config)


# RoBERTa's position ids start after the padding index: 514 embeddings hold 512 tokens.
_POSITION_OFFSET_TYPES = ("roberta", "xlm-roberta", "camembert")


def position_limit(config) -> Optional[int]:
    """The longest sequence the model has position embeddings for, or None when it has no such limit."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return None
    if getattr(config, "model_type", "") in _POSITION_OFFSET_TYPES:
        limit -= (getattr(config, "pad_token_id", None) or 0) + 1
    return limit
