"""What the engine asks of a Hugging Face encoder: hidden states, attention maps (post-softmax, or the
pre-softmax scores TinyBERT matches), and LM-head logits at selected rows only.

Running the LM head over every token builds an N x V logit tensor (8 x 256 tokens x 29k vocab is 240 MB
in fp32 per model); the published recipes only use logits at the MLM-masked rows, about 15% of them.
So we run the model's body, gather the rows, and apply the head to those rows alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from . import minialbert  # noqa: F401  (registers MiniALBERT with the Auto classes)


@dataclass(frozen=True)
class Needs:
    """The outputs the active loss terms consume; nothing else is computed or kept."""

    logits: bool = False
    hidden_states: bool = False
    attentions: bool = False
    scores: bool = False  # pre-softmax attention scores

    def __or__(self, other: Needs) -> Needs:
        return Needs(*(a or b for a, b in zip(self.astuple(), other.astuple())))

    def astuple(self) -> tuple[bool, ...]:
        return (self.logits, self.hidden_states, self.attentions, self.scores)


NOTHING = Needs()


@dataclass
class Outputs:
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None  # L+1 x [B, T, H]; 0 is the embedding output
    attentions: Optional[tuple[torch.Tensor, ...]] = None  # L x [B, heads, T, T], post-softmax
    logits: Optional[torch.Tensor] = None  # [rows, V] at the selected rows only
    scores: Optional[tuple[torch.Tensor, ...]] = None  # L x [B, heads, T, T], QK^T/sqrt(d), padded keys 0


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
) -> Outputs:
    """Run ``model``'s body and, when ``needs.logits``, its MLM head at the flat token indices ``rows``.

    ``rows`` indexes ``[B*T]`` (flattened batch and time); the logits come back as ``[len(rows), V]``.
    ``padded`` (known on the host, from the collator) says whether any token is padding; see model_mask.
    """
    pairs = query_key_modules(model) if needs.scores else []
    captured: dict[nn.Module, list[torch.Tensor]] = {m: [] for pair in pairs for m in pair}
    hooks = [module.register_forward_hook(lambda m, _i, out: captured[m].append(out)) for module in captured]
    try:
        out = model.base_model(
            input_ids=input_ids,
            attention_mask=model_mask(model, attention_mask, padded),
            output_hidden_states=needs.hidden_states,
            output_attentions=needs.attentions,
            return_dict=True,
        )
    finally:
        for hook in hooks:
            hook.remove()
    scores = None
    if needs.scores:
        calls = {m: iter(outs) for m, outs in captured.items()}  # the i-th pair reads each module's i-th call
        projections = [(next(calls[q]), next(calls[k])) for q, k in pairs]
        scores = _scores(projections, attention_mask, num_heads(model.config))
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
    )


# Model types whose forward builds its attention mask with transformers' create_bidirectional_mask alone
# (or, MiniALBERT, as plain key padding), so that a prepared 4-D mask is taken as it is. Others keep the 2-D
# mask: ModernBERT derives its local layers' sliding window from it, DeBERTa builds its own pairwise mask.
_PREPARED_MASK_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "mobilebert", "albert", "electra", "minialbert"}
)


def model_mask(model: nn.Module, attention_mask: torch.Tensor, padded: bool) -> Optional[torch.Tensor]:
    """The mask ``model``'s forward is given. From a 2-D mask, transformers decides whether it may skip the
    mask by reading it on the host (``padding_mask.all()``): a host-device sync in every forward. So the
    engine decides on the host instead: no mask when no token is padding (attention may then take the
    flash path), else, for the model types above, a prepared ``[B, 1, 1, T]`` additive mask in the model's
    dtype, which their mask functions take as it is, for eager and SDPA attention alike."""
    if not padded:
        return None
    if model.config.model_type not in _PREPARED_MASK_TYPES:
        return attention_mask
    dtype = next(model.parameters()).dtype
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def query_key_modules(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    model_type = model.config.model_type
    if model_type not in _QUERY_KEY:
        raise ValueError(f"no attention-score adapter for model_type '{model_type}'; known: {', '.join(_QUERY_KEY)}")
    return _QUERY_KEY[model_type](model.base_model)


def _scores(
    projections: list[tuple[torch.Tensor, torch.Tensor]], attention_mask, heads: int
) -> tuple[torch.Tensor, ...]:
    """Pre-softmax scores QK^T/sqrt(d) per layer from each layer's (query, key) projection outputs.

    TinyBERT adds the -10000 mask and then zeroes every entry <= -100; zeroing the padded keys of the
    unmasked scores is the same thing without the accident of zeroing a genuinely low score.
    """
    out = []
    for q, k in projections:
        keep = attention_mask[:, None, None, :].to(q.dtype)
        b, t, width = q.shape
        q = q.view(b, t, heads, width // heads).transpose(1, 2)
        k = k.view(b, t, heads, width // heads).transpose(1, 2)
        out.append(torch.matmul(q, k.transpose(-1, -2)) * (width // heads) ** -0.5 * keep)
    return tuple(out)


def attn_implementation(needs: Needs) -> Optional[str]:
    # SDPA and flash kernels never materialise the probabilities, so attention terms need eager attention.
    return "eager" if needs.attentions else None


def num_layers(config) -> int:
    return config.num_hidden_layers


def hidden_size(config) -> int:
    return config.hidden_size if hasattr(config, "hidden_size") else config.dim


def num_heads(config) -> int:
    return config.num_attention_heads


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
