"""``teacher.vocab_map: by_token``: a student checkpoint with its own tokenizer distils from a teacher
whose ids differ; the teacher reads mapped ids and its logits come back over the student's vocabulary."""

from __future__ import annotations

import pytest
import torch
from conftest import launch, recipe_dict, summary, swapped_student, write_recipe
from transformers import AutoModelForMaskedLM, AutoTokenizer

from biodistill.engine.config import load_recipe
from biodistill.engine.data.tokenise import VocabMap
from biodistill.engine.models.outputs import Needs, encode

TERMS = [{"kind": "mlm"}, {"kind": "logit_kl", "weight": 2.0}, {"kind": "hidden_mse", "layer_map": [[2, 4]]}]


@pytest.fixture(scope="module")
def student(tmp_path_factory, tiny_teacher):
    """The teacher's first two layers saved as a checkpoint, with tokens 2000 and 2001 swapped in its tokenizer."""
    path = tmp_path_factory.mktemp("swapped") / "student"
    model = AutoModelForMaskedLM.from_pretrained(tiny_teacher)
    model.bert.encoder.layer = model.bert.encoder.layer[:2]
    model.config.num_hidden_layers = 2
    model.save_pretrained(path)
    return swapped_student(path)


def test_mapped_teacher_sees_its_own_ids_and_answers_in_the_students(student, tiny_teacher):
    s_tok, t_tok = AutoTokenizer.from_pretrained(student), AutoTokenizer.from_pretrained(tiny_teacher)
    vmap = VocabMap(s_tok, t_tok, 30522)
    assert vmap.coverage == 1.0
    text = "the patient was given antibiotics to treat the infection"
    s_ids, t_ids = s_tok(text, return_tensors="pt")["input_ids"], t_tok(text, return_tensors="pt")["input_ids"]
    assert not torch.equal(s_ids, t_ids)  # "was" and "to" have each other's ids
    assert torch.equal(vmap.inputs(s_ids), t_ids)
    teacher = AutoModelForMaskedLM.from_pretrained(tiny_teacher).eval()
    rows = torch.arange(t_ids.numel())
    with torch.no_grad():
        out = encode(teacher, vmap.inputs(s_ids), torch.ones_like(s_ids), Needs(logits=True), rows)
    mapped = vmap.logits(out.logits)
    assert torch.equal(mapped[:, 2000], out.logits[:, 2001]) and torch.equal(mapped[:, 2001], out.logits[:, 2000])
    assert torch.equal(mapped[:, :2000], out.logits[:, :2000])


def test_preflight_accepts_a_mapped_student(student, tiny_teacher, tiny_corpus, tmp_path):
    from biodistill.engine.plan import make_plan  # the start-up checks

    recipe = recipe_dict(
        tiny_teacher, tiny_corpus, tmp_path, TERMS, student={"init": "checkpoint", "path": str(student)}
    )
    recipe["student"].pop("teacher_layers", None)
    recipe["teacher"]["vocab_map"] = "by_token"
    make_plan(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)), None)


@pytest.mark.multirank
def test_a_mapped_student_distils_in_a_real_job(student, tiny_teacher, tiny_corpus, tmp_path):
    recipe = recipe_dict(
        tiny_teacher, tiny_corpus, tmp_path, TERMS,
        student={"init": "checkpoint", "path": str(student)}, train={"max_steps": 4, "export": False},
    )  # fmt: skip
    recipe["student"].pop("teacher_layers", None)
    recipe["teacher"]["vocab_map"] = "by_token"
    proc = launch(write_recipe(tmp_path / "r.yaml", recipe), ranks=1)
    assert proc.returncode == 0
    before = summary(tmp_path / "run")["before"]
    # The student is the teacher's first two layers: through the map it agrees with the teacher as a copy does.
    assert before["agreement/top1"] > 0.3 and before["loss/logit_kl"] < 1.0
    assert summary(tmp_path / "run")["skipped"]["teacher_nonfinite"] == 0
