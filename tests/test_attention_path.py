"""Attention terms without maps, in the engine: every family's queries and keys captured while it runs SDPA
(models/attention.py), each attention term on that fused path equal to the maps path (eager attention's
maps, the score taps) in value and gradient; MiniLMv2's relation term against a materialised computation;
the path each term takes, why, and what it holds at 8,192 tokens; and SDPA with dropout on a CPU, in blocks of
query rows that backward recomputes with the same dropout masks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import LargestTensor
from test_families import config as family_config
from test_families import model as family_model
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from biodistill.engine.config import ConfigError, LossesConfig, LossTermConfig, Recipe, _convert
from biodistill.engine.losses import attention_notes, build_terms
from biodistill.engine.models import attention
from biodistill.engine.models.minialbert import MiniAlbertConfig
from biodistill.engine.models.outputs import attn_implementation, encode
from biodistill.engine.models.published import published_config
from biodistill.engine.models.students import student_config

# Small random models of each family that captures, no dropout (both paths see the same maps), weights 10x the
# usual init scale (peaked attention, so that every term is far from 0).
SHAPES = {
    "bert": lambda n: dict(
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=48,
        num_hidden_layers=n,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ),  # fmt: skip
    "distilbert": lambda n: dict(dim=32, n_heads=4, hidden_dim=48, n_layers=n, dropout=0.0, attention_dropout=0.0),
    "mobilebert": lambda n: dict(
        hidden_size=64,
        true_hidden_size=16,
        intra_bottleneck_size=16,
        embedding_size=16,
        num_attention_heads=4,
        intermediate_size=32,
        num_hidden_layers=n,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ),  # fmt: skip
    "minialbert": lambda n: dict(
        embedding_size=24,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=48,
        num_hidden_layers=n,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ),  # fmt: skip
}
TERMS = ["attention_kl", "attention_mse", "attention_score_mse"]


def configs(family):
    """``(student, teacher, layer_map)``: 2 student layers against 4 teacher layers."""
    if family == "modernbert":  # global, local against the teacher's global 1 and local 2
        return family_config(family, 2), family_config(family, 4), [[1, 1], [2, 2]]
    if family == "minialbert":
        make = lambda n: MiniAlbertConfig(vocab_size=97, initializer_range=0.2, **SHAPES[family](n))  # noqa: E731
    else:
        make = lambda n: AutoConfig.for_model(  # noqa: E731
            family, vocab_size=97, max_position_embeddings=64, initializer_range=0.2, **SHAPES[family](n)
        )
    return make(2), make(4), "uniform"


def built(config, needs, seed):
    """The model as the engine builds it for ``needs`` (models/outputs.py: attn_implementation)."""
    torch.manual_seed(seed)
    implementation = attn_implementation(needs, config)
    kwargs = {"attn_implementation": implementation} if implementation else {}
    return AutoModelForMaskedLM.from_config(config, **kwargs)


def batch(B=3, T=12, vocab=97):
    g = torch.Generator().manual_seed(5)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 9:], mask[2, 5:] = 0, 0
    return {"input_ids": torch.randint(5, vocab, (B, T), generator=g), "attention_mask": mask, "rows": None}


def term_and_gradient(family, kind, path):
    student_cfg, teacher_cfg, layer_map = configs(family)
    losses = LossesConfig(attention_path=path, terms=[LossTermConfig(kind=kind, layer_map=layer_map)])
    (term,) = build_terms(losses, student_cfg, teacher_cfg, "test.yaml")
    student = built(student_cfg, term.student_needs, seed=0).train()
    teacher = built(teacher_cfg, term.teacher_needs, seed=1).eval()
    b = batch()
    with torch.no_grad():
        t = encode(teacher, b["input_ids"], b["attention_mask"], term.teacher_needs)
    s = encode(student, b["input_ids"], b["attention_mask"], term.student_needs)
    value = term(s, t, b)
    value.backward()
    grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    return term, student, s, value.detach(), grads


@pytest.mark.parametrize("kind", TERMS)
@pytest.mark.parametrize("family", ["bert", "distilbert", "mobilebert", "modernbert", "minialbert"])
def test_the_fused_path_equals_the_maps_path(family, kind):
    fused, student, out, value, grads = term_and_gradient(family, kind, "auto")
    assert fused.path == "fused", fused.why
    assert out.attentions is None and out.scores is None and out.captured  # queries and keys, no maps
    if family != "minialbert":  # MiniALBERT calls the capturing attention itself
        assert student.config._attn_implementation == attention.NAME
    maps, _, _, expected, expected_grads = term_and_gradient(family, kind, "maps")
    assert maps.path == "maps"
    assert value.item() > 1e-4  # a real difference between two random models
    torch.testing.assert_close(value, expected, rtol=2e-5, atol=1e-7)
    scale = expected_grads.abs().max().item()  # fp32 sums of different orders: relative to the largest gradient
    torch.testing.assert_close(grads, expected_grads, rtol=1e-4, atol=1e-5 * scale)


def test_relation_kl_is_minilmv2s_with_different_widths_and_heads():
    """Student 32 wide with 4 heads, teacher 64 wide with 2 heads, 8 relation heads: the query, key and value
    relations of the teachers' last layer against the student's, materialised here in float64."""
    student_cfg, teacher_cfg, _ = configs("bert")
    teacher_cfg.hidden_size, teacher_cfg.num_attention_heads = 64, 2
    losses = LossesConfig(terms=[LossTermConfig(kind="relation_kl", layer_map="last", relation_heads=8)])
    (term,) = build_terms(losses, student_cfg, teacher_cfg, "test.yaml")
    student, teacher = built(student_cfg, term.student_needs, 0), built(teacher_cfg, term.teacher_needs, 1).eval()
    b = batch()
    with torch.no_grad():
        t = encode(teacher, b["input_ids"], b["attention_mask"], term.teacher_needs)
        s = encode(student, b["input_ids"], b["attention_mask"], term.student_needs)
        value = term(s, t, b)
        valid = b["attention_mask"].bool()
        expected = 0
        hs = student.bert(**{k: b[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True).hidden_states
        ht = teacher.bert(**{k: b[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True).hidden_states
        for relation in ("query", "key", "value"):
            xs = getattr(student.bert.encoder.layer[1].attention.self, relation)(hs[1]).double()
            xt = getattr(teacher.bert.encoder.layer[3].attention.self, relation)(ht[3]).double()
            logs = []
            for x in (xs, xt):  # [B, T, width] -> 8 heads -> relations over the valid keys
                heads = x.view(3, 12, 8, -1).transpose(1, 2)
                r = heads @ heads.transpose(-1, -2) / math.sqrt(heads.shape[-1])
                logs.append(torch.log_softmax(r.masked_fill(~valid[:, None, None, :], float("-inf")), -1))
            kl = torch.where(valid[:, None, None, :], logs[1].exp() * (logs[1] - logs[0]), 0).sum(-1)  # [B, 8, T]
            expected += kl.permute(0, 2, 1)[valid].mean()
    assert value.item() > 0.01 and value.item() == pytest.approx(expected.item(), rel=2e-5)
    assert s.captured[1].value is not None and 0 not in s.captured  # only the mapped layer, with its values
    with pytest.raises(ConfigError) as e:
        build_terms(LossesConfig(terms=[LossTermConfig(kind="relation_kl", relation_heads=6)]), student_cfg,
                    teacher_cfg, "test.yaml")  # fmt: skip
    assert e.value.key == "losses.terms[0].relation_heads"
    assert "6 relation heads do not divide the student's attention width 32 (bert)" in e.value.message


def test_deberta_keeps_the_maps_path_and_says_why():
    deberta = family_config("deberta-v2", 2)
    (term,) = build_terms(LossesConfig(terms=[LossTermConfig(kind="attention_kl")]), deberta, deberta, "t.yaml")
    assert term.path == "maps"
    assert term.why == "deberta-v2 computes its scores inside its own attention module: no queries and keys to capture"
    with pytest.raises(ConfigError) as e:
        build_terms(LossesConfig(attention_path="fused", terms=[LossTermConfig(kind="attention_kl")]), deberta,
                    deberta, "t.yaml")  # fmt: skip
    assert e.value.key == "losses.attention_path" and "fused needs both models' queries and keys" in e.value.message
    with pytest.raises(ConfigError) as e:
        build_terms(LossesConfig(terms=[LossTermConfig(kind="relation_kl")]), deberta, deberta, "t.yaml")
    assert e.value.key == "losses.terms[0].kind" and "relation_kl reads captured queries" in e.value.message


def test_modernbert_at_8k_tokens_starts_on_the_fused_path():
    """The start-up lines at ModernBERT's 8,192 positions: linear in T on the fused path; the maps path is
    still refused where its maps outgrow the device, naming data.max_length."""
    teacher = published_config("thomas-sounack/BioClinical-ModernBERT-base")
    raw = {
        "teacher": {"path": "t"}, "student": {"teacher_layers": [0, 3, 6, 9, 12, 15]},
        "data": {"train_files": ["c.jsonl"], "max_length": 8192}, "train": {"micro_batch_size": 4},
        "losses": {"terms": [{"kind": "attention_kl", "layer_map": "last"}]},
    }  # fmt: skip
    recipe = _convert(Recipe, raw, "", "r.yaml", {})
    student = student_config(recipe, teacher)
    terms = build_terms(recipe.losses, student, teacher, "r.yaml")
    (note,) = attention_notes(recipe, terms, student, teacher, 2, device_bytes=141 * 2**30)
    assert note == (
        "attention_kl: fused path (both models' queries and keys are captured while SDPA runs): the attention "
        "kernel on captured queries and keys, both models on SDPA/flash, linear in T; 0.10 GiB at "
        "data.max_length 8192 and train.micro_batch_size 4 in 2-byte precision"
    )
    recipe.losses.attention_path = "maps"
    terms = build_terms(recipe.losses, student, teacher, "r.yaml")
    assert attention_notes(recipe, terms, student, teacher, 2)[0].startswith("attention_kl: maps path")
    with pytest.raises(ConfigError) as e:
        attention_notes(recipe, terms, student, teacher, 2, device_bytes=141 * 2**30)
    assert e.value.key == "data.max_length" and "168.0 GiB of maps; the device has 141.0 GiB" in e.value.message
    # a second term on the same maps holds no second set: the refusal counts them once
    recipe.losses.terms.append(LossTermConfig(kind="attention_mse", layer_map="last"))
    terms = build_terms(recipe.losses, student, teacher, "r.yaml")
    with pytest.raises(ConfigError) as e:
        attention_notes(recipe, terms, student, teacher, 2, device_bytes=141 * 2**30)
    assert "attention_mse: maps path" in e.value.message and "168.0 GiB of maps" in e.value.message


class _Encoder(torch.nn.Module):
    is_causal = False


def test_cpu_attention_with_dropout_runs_in_blocks_and_replays_its_masks(monkeypatch):
    """On a CPU, SDPA with dropout takes the math path ([B, H, T, T] four times over). In blocks of 8 query rows
    the largest tensor is one block's; the output and gradients are those of the same blocks run plainly
    under the same seed (backward recomputes each block with its own dropout mask); without dropout, and
    for anything that fits one block, it is SDPA itself."""
    B, H, T, d = 2, 2, 64, 8
    monkeypatch.setattr(attention, "BLOCKED_ABOVE", 4 * B * H * 16 * T)  # a 64 x 64 map is blocked
    monkeypatch.setattr(attention, "BLOCK_BYTES", 4 * B * H * 8 * T)  # 8 rows a block
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, d, generator=g) for _ in range(3))
    mask = torch.zeros(B, 1, 1, T)
    mask[1, ..., 50:] = torch.finfo(torch.float32).min

    def grads(fn):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        torch.manual_seed(7)
        out = fn(*leaves)
        out.backward(torch.ones_like(out))
        return out.detach(), [x.grad for x in leaves]

    def blocks(qq, kk, vv):  # the same blocks and dropout draws, nothing recomputed
        parts = [F.scaled_dot_product_attention(qq[:, :, i : i + 8], kk, vv, attn_mask=mask, dropout_p=0.3)
                 for i in range(0, T, 8)]  # fmt: skip
        return torch.cat(parts, dim=2).transpose(1, 2)

    with LargestTensor() as seen:
        out, got = grads(lambda qq, kk, vv: attention.attend(_Encoder(), qq, kk, vv, mask, dropout=0.3)[0])
    assert seen.most <= B * H * 8 * T, seen.most
    want_out, want = grads(blocks)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    plain = sdpa_attention_forward(_Encoder(), q, k, v, mask, dropout=0.0)[0]
    assert torch.equal(attention.attend(_Encoder(), q, k, v, mask, dropout=0.0)[0], plain)


def test_the_engine_loads_capturing_families_with_the_capturing_attention(tmp_path):
    """A teacher directory loads as the engine loads it: SDPA through models/attention.py, not eager."""
    from conftest import make_bert

    from biodistill.engine.models.outputs import Needs
    from biodistill.engine.models.teacher import load_teacher

    path = make_bert(tmp_path / "t", layers=2, hidden=32)
    raw = {"teacher": {"path": str(path)}, "data": {"train_files": ["c.jsonl"]},
           "losses": {"terms": [{"kind": "attention_kl"}]}}  # fmt: skip
    recipe = _convert(Recipe, raw, "", "r.yaml", {})
    teacher = load_teacher(recipe, Needs(queries_keys=frozenset({1})), torch.device("cpu"))
    assert teacher.config._attn_implementation == attention.NAME
    maps = load_teacher(recipe, Needs(attentions=True), torch.device("cpu"))
    assert maps.config._attn_implementation == "eager"
    assert AutoModel.from_pretrained(path).config._attn_implementation == "sdpa"  # nothing global changed
    _ = family_model  # the families' own builder stays importable for these tests
