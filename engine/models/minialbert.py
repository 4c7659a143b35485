"""MiniALBERT (Nouriborji et al., 2022; the clinical-miniALBERT models): a recursive transformer.

One shared ALBERT layer is applied R times over factorised embeddings (width E, projected up to H);
each recursion i wraps the shared layer with its own pair of post-LN bottleneck adapters:

    h_0     = Projector(LN_emb(word[ids] + token_type[tt] + position))             E -> H
    a       = AttAdapter_i(h_i)                 Adapter(x) = LN(x + Up(GELU(Down(x))))
    b       = LN_attn(a + Dense(MultiHeadAttention(a)))
    c       = MlpAdapter_i(b)
    h_{i+1} = LN_full(c + FFN_out(GELU(FFN_in(c))))
    logits  = Projector_vocab(LN_vocab(GELU(Transform(h_R))))      (not tied to the embeddings)

Module names follow the published checkpoints' state-dict keys (``albert.albert.embeddings...``,
``albert.projector``, ``albert.att_adapters.{i}.block.{0,2}``, ``vocab_projector``...), so their files
load with ``from_pretrained`` unchanged; :func:`from_published` adds what their config.json lacks
(it says model_type "bert"). On CUDA the adapters run as one fused Triton kernel
(``biodistill.kernels.ops.bottleneck_adapter``); on CPU as the PyTorch reference.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MaskedLMOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from ...kernels.ops import bottleneck_adapter
from .attention import attend


class MiniAlbertConfig(PretrainedConfig):
    """The published clinical-miniALBERT-312 shape by default; ``num_hidden_layers`` is the number of
    recursions R of the one shared layer."""

    model_type = "minialbert"

    def __init__(
        self,
        vocab_size: int = 28996,
        embedding_size: int = 312,
        hidden_size: int = 768,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        use_adapter: bool = True,
        reduction_factor: int = 16,
        classifier_dropout_prob: float = 0.1,
        pad_token_id: int = 0,
        **kwargs,
    ):
        kwargs.setdefault("tie_word_embeddings", False)  # the vocabulary projector is its own matrix
        for legacy in ("num_hidden_groups", "inner_group_num"):  # ALBERT fields the published configs carry
            if kwargs.get(legacy, 1) != 1:
                raise ValueError(f"MiniALBERT shares one layer: {legacy} must be 1, got {kwargs[legacy]}")
            kwargs.pop(legacy, None)
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.vocab_size, self.embedding_size, self.hidden_size = vocab_size, embedding_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.intermediate_size, self.hidden_act = intermediate_size, hidden_act
        self.hidden_dropout_prob, self.attention_probs_dropout_prob = hidden_dropout_prob, attention_probs_dropout_prob
        self.max_position_embeddings, self.type_vocab_size = max_position_embeddings, type_vocab_size
        self.initializer_range, self.layer_norm_eps = initializer_range, layer_norm_eps
        self.use_adapter, self.reduction_factor = use_adapter, reduction_factor
        self.classifier_dropout_prob = classifier_dropout_prob
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}"
            )
        if hidden_size % reduction_factor:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of reduction_factor {reduction_factor}")


# ------------------------------------------------------------------------------------------ blocks


class BottleneckAdapter(nn.Module):
    """``LN(x + Up(GELU(Down(x))))``. ``block`` is kept as Sequential(Down, GELU, Up) so the weights sit at
    the published keys ``block.0`` / ``block.2``; forward calls the fused kernel with them instead."""

    def __init__(self, hidden: int, bottleneck: int, eps: float):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(hidden, bottleneck), nn.GELU(), nn.Linear(bottleneck, hidden))
        self.norm = nn.LayerNorm(hidden, eps=eps)
        # ZeRO-3 gathers a module's parameters when that module's forward runs; forward here reads its
        # children's weights without calling them, so they are declared as this module's own.
        from deepspeed.runtime.zero import register_external_parameter

        for parameter in self.parameters():
            register_external_parameter(self, parameter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.block[0], self.block[2]
        return bottleneck_adapter(
            x, down.weight, down.bias, up.weight, up.bias, self.norm.weight, self.norm.bias, self.norm.eps
        )


class MiniAlbertEmbeddings(nn.Module):
    def __init__(self, config: MiniAlbertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.embedding_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.embedding_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.embedding_size)
        self.LayerNorm = nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor]) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x + self.position_embeddings(positions)[None]))


class MiniAlbertAttention(nn.Module):
    is_causal = False  # read by the SDPA wrapper: an encoder

    def __init__(self, config: MiniAlbertConfig):
        super().__init__()
        h = config.hidden_size
        self.heads, self.head_dim = config.num_attention_heads, h // config.num_attention_heads
        self.query, self.key, self.value, self.dense = (nn.Linear(h, h) for _ in range(4))
        self.LayerNorm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.attention_dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.output_dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, output_attentions: bool):
        b, t, h = x.shape
        q, k, v = (
            proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2) for proj in (self.query, self.key, self.value)
        )
        probs = None
        if output_attentions:  # the probabilities are an output: compute them explicitly
            probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + bias, dim=-1)
            context = self.attention_dropout(probs) @ v
            context = context.transpose(1, 2)
        else:  # SDPA through the engine's attention function, which captures q, k, v for the attention terms
            p = self.attention_dropout.p if self.training else 0.0
            context, _ = attend(self, q, k, v, bias.to(q.dtype), dropout=p)
        context = context.reshape(b, t, h)
        return self.LayerNorm(x + self.output_dropout(self.dense(context))), probs


class MiniAlbertLayer(nn.Module):
    """The one shared layer (ALBERT's attention block and FFN); the adapters are passed in per recursion."""

    def __init__(self, config: MiniAlbertConfig):
        super().__init__()
        self.attention = MiniAlbertAttention(config)
        self.ffn = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_output = nn.Linear(config.intermediate_size, config.hidden_size)
        self.full_layer_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        if config.hidden_act != "gelu":
            raise ValueError(f"MiniALBERT uses the exact GELU; hidden_act {config.hidden_act!r} is not supported")

    def forward(self, h, bias, att_adapter, mlp_adapter, output_attentions: bool):
        a = att_adapter(h) if att_adapter is not None else h
        b, probs = self.attention(a, bias, output_attentions)
        c = mlp_adapter(b) if mlp_adapter is not None else b
        out = self.full_layer_layer_norm(c + self.dropout(self.ffn_output(F.gelu(self.ffn(c)))))
        return out, probs


class _LayerGroup(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.albert_layers = nn.ModuleList([MiniAlbertLayer(config)])


class _Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.albert_layer_groups = nn.ModuleList([_LayerGroup(config)])


class MiniAlbertBody(nn.Module):
    """The inner ALBERT body of the published checkpoints: embeddings, the shared layer, the pooler."""

    def __init__(self, config: MiniAlbertConfig):
        super().__init__()
        self.embeddings = MiniAlbertEmbeddings(config)
        self.encoder = _Encoder(config)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.pooler_activation = nn.Tanh()

    @property
    def layer(self) -> MiniAlbertLayer:
        return self.encoder.albert_layer_groups[0].albert_layers[0]


# ------------------------------------------------------------------------------------------ models


class MiniAlbertPreTrainedModel(PreTrainedModel):
    config_class = MiniAlbertConfig
    base_model_prefix = "albert"
    _keys_to_ignore_on_load_unexpected = [r"position_ids"]  # a buffer older transformers saved

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()

    def train_adapters_only(self) -> None:
        """The original ``trainAdaptersOnly``: freeze the projector and the ALBERT body (embeddings, shared
        layer, pooler); train the adapters and the task head. Adds adapters first if the model has none."""
        base = self.base_model
        if not base.config.use_adapter:
            base.add_adapters()
        self.requires_grad_(True)
        base.projector.requires_grad_(False)
        base.albert.requires_grad_(False)

    trainAdaptersOnly = train_adapters_only  # the name the published model card uses


class MiniAlbertModel(MiniAlbertPreTrainedModel):
    def __init__(self, config: MiniAlbertConfig):
        super().__init__(config)
        self.albert = MiniAlbertBody(config)
        self.projector = nn.Linear(config.embedding_size, config.hidden_size)
        self.att_adapters = self.mlp_adapters = None
        if config.use_adapter:
            self._build_adapters()
        self.post_init()

    def _build_adapters(self) -> None:
        c = self.config
        r = c.hidden_size // c.reduction_factor
        self.att_adapters = nn.ModuleList(
            BottleneckAdapter(c.hidden_size, r, c.layer_norm_eps) for _ in range(c.num_hidden_layers)
        )
        self.mlp_adapters = nn.ModuleList(
            BottleneckAdapter(c.hidden_size, r, c.layer_norm_eps) for _ in range(c.num_hidden_layers)
        )

    def add_adapters(self) -> None:
        self.config.use_adapter = True
        self._build_adapters()
        for module in (self.att_adapters, self.mlp_adapters):
            module.apply(self._init_weights)
            module.to(self.projector.weight.device, self.projector.weight.dtype)

    def get_input_embeddings(self):
        return self.albert.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.albert.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        return_dict: bool = True,
        **_,
    ) -> BaseModelOutputWithPooling:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.projector(self.albert.embeddings(input_ids, token_type_ids))
        # Keys only: padded query rows are computed and returned as they are; losses mask them. A 4-D mask is
        # already the additive bias (as transformers' models take it).
        if attention_mask.ndim == 4:
            bias = attention_mask.to(h.dtype)
        else:
            bias = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        hidden, maps = [h], []
        layer = self.albert.layer
        for i in range(self.config.num_hidden_layers):
            att = self.att_adapters[i] if self.att_adapters is not None else None
            mlp = self.mlp_adapters[i] if self.mlp_adapters is not None else None
            h, probs = layer(h, bias, att, mlp, output_attentions)
            hidden.append(h)
            maps.append(probs)
        pooled = self.albert.pooler_activation(self.albert.pooler(h[:, 0]))
        return BaseModelOutputWithPooling(
            last_hidden_state=h,
            pooler_output=pooled,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            attentions=tuple(maps) if output_attentions else None,
        )


class MiniAlbertForMaskedLM(MiniAlbertPreTrainedModel):
    def __init__(self, config: MiniAlbertConfig):
        super().__init__(config)
        self.albert = MiniAlbertModel(config)
        self.vocab_transform = nn.Linear(config.hidden_size, config.hidden_size)
        self.vocab_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.vocab_projector = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def mlm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.vocab_projector(self.vocab_layer_norm(F.gelu(self.vocab_transform(hidden))))

    def get_output_embeddings(self):
        return self.vocab_projector

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, **kwargs) -> MaskedLMOutput:
        out = self.albert(input_ids, attention_mask, token_type_ids, **kwargs)
        logits = self.mlm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class _Classifier(MiniAlbertPreTrainedModel):
    def __init__(self, config: MiniAlbertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.albert = MiniAlbertModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()


class MiniAlbertForSequenceClassification(_Classifier):
    """A label per sequence, from the first token's final hidden state (the pooler is not used)."""

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        out = self.albert(input_ids, attention_mask, token_type_ids, **kwargs)
        logits = self.classifier(self.dropout(out.last_hidden_state[:, 0]))
        loss = None
        if labels is not None:
            loss = (
                F.mse_loss(logits.squeeze(-1), labels.float())
                if self.num_labels == 1
                else F.cross_entropy(logits, labels.view(-1))
            )
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )


class MiniAlbertForTokenClassification(_Classifier):
    """A label per token (NER), from every token's final hidden state."""

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        out = self.albert(input_ids, attention_mask, token_type_ids, **kwargs)
        logits = self.classifier(self.dropout(out.last_hidden_state))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1), ignore_index=-100)
        return TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )


# ------------------------------------------------------------------------- registration, published

AutoConfig.register("minialbert", MiniAlbertConfig, exist_ok=True)
for _auto, _cls in (
    (AutoModel, MiniAlbertModel),
    (AutoModelForMaskedLM, MiniAlbertForMaskedLM),
    (AutoModelForSequenceClassification, MiniAlbertForSequenceClassification),
    (AutoModelForTokenClassification, MiniAlbertForTokenClassification),
):
    _auto.register(MiniAlbertConfig, _cls, exist_ok=True)


def is_published_minialbert(config: dict) -> bool:
    """A config.json written by the original code: model_type "bert", a MiniAlbert* architecture."""
    return any(str(a).startswith("MiniAlbert") for a in config.get("architectures") or [])


def published_to_config(config: dict) -> MiniAlbertConfig:
    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "transformers_version")}
    return MiniAlbertConfig(**fields)


def resolve_config(config: PretrainedConfig) -> PretrainedConfig:
    """A config AutoConfig read from a published miniALBERT checkpoint (a BertConfig, by its model_type)
    as the MiniAlbertConfig it is; any other config unchanged."""
    raw = config.to_dict()
    return published_to_config(raw) if is_published_minialbert(raw) else config


def from_published(path: str | Path, cls: type[MiniAlbertPreTrainedModel] = MiniAlbertForMaskedLM, **kwargs):
    """Load a checkpoint written by the original miniALBERT code (config.json says model_type "bert")
    or by this one. The weights load under their original key names; nothing is renamed."""
    raw = json.loads((Path(path) / "config.json").read_text())
    if is_published_minialbert(raw):
        # Config fields among the kwargs (num_labels=...) go to the config, as from_pretrained does.
        raw.update({k: kwargs.pop(k) for k in list(kwargs) if k == "num_labels" or k in raw})
        kwargs["config"] = published_to_config(raw)
    return cls.from_pretrained(path, **kwargs)
