"""Teacher loading and the three student builders, on small models and the real MiniLM teacher."""

from __future__ import annotations

import pytest
import torch
from conftest import MINILM, make_bert, recipe_dict

from biodistill.engine.config import ConfigError, Recipe, _convert
from biodistill.engine.models.outputs import Needs, encode
from biodistill.engine.models.students import build_student
from biodistill.engine.models.teacher import load_teacher


def recipe(teacher, tmp_path, terms=({"kind": "mlm"},), **sections) -> Recipe:
    raw = recipe_dict(teacher, tmp_path / "c.jsonl", tmp_path, list(terms), **sections)
    return _convert(Recipe, raw, "", "test.yaml", {})


def test_teacher_is_frozen_in_eval_mode_and_gives_only_what_is_asked(tiny_teacher, tmp_path):
    teacher = load_teacher(recipe(tiny_teacher, tmp_path), Needs(attentions=True), torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.config._attn_implementation == "eager"
    ids = torch.randint(1000, 2000, (2, 12))
    out = encode(teacher, ids, torch.ones_like(ids), Needs(attentions=True))
    assert out.hidden_states is None and out.logits is None and len(out.attentions) == 4
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, 12))
    again = encode(teacher, ids, torch.ones_like(ids), Needs(attentions=True))
    assert torch.equal(out.attentions[-1], again.attentions[-1])  # no dropout


def test_real_minilm_teacher_loads_offline_and_refuses_logit_terms(tmp_path):
    r = recipe(MINILM, tmp_path)
    teacher = load_teacher(r, Needs(hidden_states=True), torch.device("cpu"))
    assert teacher.config.num_hidden_layers == 6 and teacher.config.hidden_size == 384
    with pytest.raises(ConfigError, match="no trained masked-LM head") as e:
        load_teacher(r, Needs(logits=True), torch.device("cpu"))
    assert e.value.key == "teacher.path"
    with pytest.raises(ConfigError, match="cannot load a model") as e:
        load_teacher(recipe(tmp_path / "missing", tmp_path), Needs(), torch.device("cpu"))
    assert e.value.key == "teacher.path"


def test_student_from_teacher_layers_copies_exactly(tiny_teacher, tmp_path):
    r = recipe(tiny_teacher, tmp_path, student={"teacher_layers": [3, 1]})
    teacher = load_teacher(r, Needs(logits=True), torch.device("cpu"))
    student = build_student(r, Needs(logits=True), teacher)
    assert student.config.num_hidden_layers == 2
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for s_i, t_i in [(0, 3), (1, 1)]:
        for name in ["attention.self.query.weight", "output.dense.bias", "attention.output.LayerNorm.weight"]:
            assert torch.equal(s_sd[f"bert.encoder.layer.{s_i}.{name}"], t_sd[f"bert.encoder.layer.{t_i}.{name}"])
    for name in ["bert.embeddings.word_embeddings.weight", "cls.predictions.transform.dense.weight"]:
        assert torch.equal(s_sd[name], t_sd[name])
    with pytest.raises(ConfigError, match="has 4 layers") as e:
        build_student(recipe(tiny_teacher, tmp_path, student={"teacher_layers": [0, 4]}), Needs(), teacher)
    assert e.value.key == "student.teacher_layers"


def test_student_from_config_and_from_checkpoint(tiny_teacher, tmp_path):
    r = recipe(
        tiny_teacher,
        tmp_path,
        student={"init": "config", "overrides": {"hidden_size": 32, "num_hidden_layers": 3, "intermediate_size": 64}},
    )
    teacher = load_teacher(r, Needs(), torch.device("cpu"))
    student = build_student(r, Needs(), teacher)
    assert (student.config.hidden_size, student.config.num_hidden_layers) == (32, 3)
    with pytest.raises(ConfigError, match="has no field 'hiden_size'") as e:
        build_student(
            recipe(tiny_teacher, tmp_path, student={"init": "config", "overrides": {"hiden_size": 3}}), Needs(), teacher
        )
    assert e.value.key == "student.overrides.hiden_size"

    ckpt = make_bert(tmp_path / "ckpt", layers=2, hidden=32, seed=9)
    cont = build_student(recipe("", tmp_path, student={"init": "checkpoint", "path": str(ckpt)}), Needs(), None)
    from transformers import AutoModelForMaskedLM

    ref = AutoModelForMaskedLM.from_pretrained(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(cont.state_dict().values(), ref.state_dict().values()))


@pytest.mark.parametrize(
    "family, attn",
    [("bert", "eager"), ("bert", "sdpa"), ("distilbert", "eager"), ("distilbert", "sdpa"), ("minialbert", "eager")],
)
def test_masks_decided_on_the_host_compute_what_the_model_computes(family, attn, tmp_path):
    """encode gives the model no mask for an unpadded batch and a prepared 4-D one for a padded batch (no host
    read of the mask inside the forward): the outputs are those of the model's own forward on the 2-D mask."""
    from transformers import AutoModelForMaskedLM, BertConfig, DistilBertConfig

    from biodistill.engine.models.minialbert import MiniAlbertConfig

    small = dict(vocab_size=300, max_position_embeddings=32)
    config = {
        "bert": BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **small),
        "distilbert": DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, **small),
        "minialbert": MiniAlbertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, embedding_size=16, **small),
    }[family]  # fmt: skip
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(config).eval()
    ids = torch.randint(5, 300, (3, 10))
    needs = Needs(hidden_states=True, attentions=attn == "eager")
    for mask, padded in (
        (torch.ones_like(ids), False),
        (torch.tensor([[1] * 10, [1] * 6 + [0] * 4, [1] * 3 + [0] * 7]), True),
    ):
        with torch.no_grad():
            ours = encode(model, ids, mask, needs, padded=padded)
            theirs = model.base_model(
                ids, attention_mask=mask, output_hidden_states=True, output_attentions=needs.attentions
            )
        valid = mask.bool()  # padded query rows are not compared: no loss reads them
        for a, b in zip(ours.hidden_states, theirs.hidden_states):
            torch.testing.assert_close(a[valid], b[valid], rtol=1e-5, atol=1e-6)
        for a, b in zip(ours.attentions or (), theirs.attentions or ()):
            torch.testing.assert_close(a.transpose(1, 2)[valid], b.transpose(1, 2)[valid], rtol=1e-5, atol=1e-6)


def test_model_card_of_a_published_recipe_names_its_teacher_method_and_citation():
    """A card as the published ones read: Hugging Face metadata (base model, tags) that huggingface_hub parses, the
    initialisation, the architecture and parameters, the terms, and the citation of the method it reproduces."""
    from huggingface_hub import ModelCard
    from transformers import BertConfig

    from biodistill.engine.models.card import model_card

    record = {
        "recipe": "distilclinicalbert", "recipe_file": "configs/distilclinicalbert.yaml",
        "teacher": "emilyalsentzer/Bio_ClinicalBERT",
        "student": {"init": "teacher_layers", "teacher_layers": [1, 3, 5, 7, 9, 11], "path": ""},
        "losses": {"temperature": 2.0, "terms": [{"kind": "mlm", "weight": 2.0, "layer_map": "last"},
                                                 {"kind": "logit_kl", "weight": 5.0, "layer_map": "last"}]},
        "data": {"train_files": ["NOTEEVENTS.csv.gz"], "dataset": "", "max_length": 256},
        "steps": 1000, "global_batch": 192, "precision": "bfloat16",
    }  # fmt: skip
    config = BertConfig(num_hidden_layers=6, vocab_size=28996)
    text = model_card(record, config, 65_800_000, True, {"before": {"loss/total": 3.0}, "after": {"loss/total": 1.5}})
    card = ModelCard(text)
    assert card.data.base_model == "emilyalsentzer/Bio_ClinicalBERT" and "clinical" in card.data.tags
    assert (
        "reproducing DistilClinicalBERT" in card.text and "layers [1, 3, 5, 7, 9, 11] (0-indexed), copied" in card.text
    )
    assert "bert, 6 layers, hidden size 768, 12 attention heads, vocabulary 28,996: 65,800,000 parameters" in card.text
    assert "| `logit_kl` | 5 | last | 2.0 |" in card.text and "| loss/total | 3.0000 | 1.5000 |" in card.text
    assert "Lightweight transformers for clinical natural language processing" in card.text
    assert "Citation" not in model_card({**record, "recipe": "demo-minilm"}, config, 1, True)  # reproduces nothing
