"""The shapes of the published checkpoints the recipes name, so a recipe can be planned, counted and
smoke-tested on a machine that cannot download them.

Only configs live here, never weights: a real run still loads the checkpoint itself, and fails with a
message naming ``teacher.path`` / ``student.path`` when it cannot. Each entry is the checkpoint's
``config.json`` reduced to what differs from the transformers defaults of its model type.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

_BIOBERT = {"model_type": "bert", "vocab_size": 28996}  # BERT-base shape with the cased 28,996 WordPiece vocab
_DISTILBERT_CASED = {"model_type": "distilbert", "vocab_size": 28996}
_MOBILEBERT = {"model_type": "mobilebert", "classifier_activation": False}  # 24 layers, 128-d embeddings, 4 FFNs
_TINYBERT_4L = {
    "model_type": "bert",
    "vocab_size": 30522,
    "hidden_size": 312,
    "num_hidden_layers": 4,
    "num_attention_heads": 12,
    "intermediate_size": 1200,
}

# ModernBERT-base: the transformers defaults (22 layers, 768 wide, global attention every third layer, a
# 128-token local window elsewhere, 8,192 positions, 50,368-token BPE vocabulary).
_MODERNBERT_BASE = {"model_type": "modernbert"}
# DeBERTa-v3-base: 12 layers, 768 wide, disentangled attention over 256 log-bucketed relative positions, no
# absolute position embeddings, 128,100-token SentencePiece vocabulary.
_DEBERTA_V3_BASE = {
    "model_type": "deberta-v2",
    "vocab_size": 128100,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "pooler_hidden_size": 768,
    "max_position_embeddings": 512,
    "relative_attention": True,
    "position_buckets": 256,
    "norm_rel_ebd": "layer_norm",
    "share_att_key": True,
    "pos_att_type": ["p2c", "c2p"],
    "layer_norm_eps": 1e-7,
    "max_relative_positions": -1,
    "position_biased_input": False,
    "type_vocab_size": 0,
}

PUBLISHED: dict[str, dict] = {
    # teachers
    "dmis-lab/biobert-base-cased-v1.2": _BIOBERT,
    "dmis-lab/biobert-v1.1": _BIOBERT,
    "emilyalsentzer/Bio_ClinicalBERT": _BIOBERT,
    "thomas-sounack/BioClinical-ModernBERT-base": _MODERNBERT_BASE,  # ModernBERT-base continued on PubMed+notes
    "answerdotai/ModernBERT-base": _MODERNBERT_BASE,
    "microsoft/deberta-v3-base": _DEBERTA_V3_BASE,
    # initial checkpoints of the continual-learning recipes
    "distilbert-base-cased": _DISTILBERT_CASED,
    "distilbert/distilbert-base-cased": _DISTILBERT_CASED,
    "huawei-noah/TinyBERT_General_4L_312D": _TINYBERT_4L,
    "google/mobilebert-uncased": _MOBILEBERT,
    # the published compact models, as starting points of the clinical recipes
    "nlpie/bio-distilbert-cased": _DISTILBERT_CASED,
    "nlpie/bio-tinybert": _TINYBERT_4L,
    "nlpie/bio-mobilebert": _MOBILEBERT,
    "nlpie/distil-biobert": {**_BIOBERT, "num_hidden_layers": 6},
    "nlpie/compact-biobert": {**_BIOBERT, "num_hidden_layers": 6},
    "nlpie/tiny-biobert": {**_TINYBERT_4L, "vocab_size": 28996},
    # MiniALBERT (engine/minialbert.py): the published config.json files say model_type "bert".
    "nlpie/clinical-miniALBERT-312": {"model_type": "minialbert"},
    "nlpie/clinical-miniALBERT-128": {"model_type": "minialbert", "embedding_size": 128, "vocab_size": 30522},
}


def published_config(name: str) -> PretrainedConfig | None:
    """The config of a published checkpoint by its hub name, or None for a name not listed here."""
    if name not in PUBLISHED:
        return None
    fields = dict(PUBLISHED[name])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)
