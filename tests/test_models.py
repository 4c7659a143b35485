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
