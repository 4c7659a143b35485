"""Loss terms against independent float64 computations; logits only at the selected rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM

from biodistill.engine.config import ConfigError, LossesConfig, LossTermConfig
from biodistill.engine.distiller import Distiller
from biodistill.engine.losses import build_terms
from biodistill.engine.models.outputs import Needs, attn_implementation, encode
from biodistill.kernels.ops import temperature_kl


def kl_float64(s, t, T):
    p = torch.softmax(t.double() / T, -1)
    q = torch.softmax(s.double() / T, -1)
    terms = torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p))
    return T * T * terms.sum(-1)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_temperature_kl_matches_float64(dtype, tol):
    s, t = torch.randn(41, 1271) * 3, torch.randn(41, 1271) * 3
    t[:, -7:] = float("-inf")  # a padded vocabulary
    s_in, t_in = s.to(dtype).requires_grad_(), t.to(dtype)
    per_row = temperature_kl(s_in, t_in, 2.0, reduction="none")
    expected = kl_float64(s_in.detach(), t_in, 2.0)
    torch.testing.assert_close(per_row.double(), expected, atol=tol, rtol=tol)
    loss = temperature_kl(s_in, t_in, 2.0)  # batchmean
    loss.backward()
    grad = 2.0 * (torch.softmax(s_in.detach().double() / 2, -1) - torch.softmax(t_in.double() / 2, -1)) / 41
    torch.testing.assert_close(s_in.grad.double(), grad, atol=tol / 10, rtol=tol)
    assert temperature_kl(s_in, t_in, 2.0, reduction="sum").item() == pytest.approx(expected.sum().item(), rel=tol)


def test_temperature_kl_edge_cases():
    empty = torch.zeros(0, 50, requires_grad=True)
    loss = temperature_kl(empty, torch.zeros(0, 50), 2.0)
    assert loss.item() == 0 and not torch.isnan(loss)
    big = torch.randn(3, 100) * 1e4
    assert torch.isfinite(temperature_kl(big, big.flip(0), 1.0))
    assert temperature_kl(big, big, 1.0).abs().item() < 1e-4
    no_t2 = temperature_kl(big / 1e4, big.flip(0) / 1e4, 2.0, scale_t2=False)
    assert no_t2.item() == pytest.approx(temperature_kl(big / 1e4, big.flip(0) / 1e4, 2.0).item() / 4, rel=1e-5)


def bert(layers, hidden, heads=4, vocab=97, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    return BertForMaskedLM(cfg).eval()


def batch(B=3, L=10, vocab=97):
    ids = torch.randint(5, vocab, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    labels = torch.full((B, L), -100)
    labels[0, 2], labels[1, 5], labels[2, 1] = 11, 12, 13
    rows = (labels != -100).flatten().nonzero().squeeze(1)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "rows": rows,
        "row_labels": labels.flatten()[rows],
    }


def terms_for(specs, student, teacher, **losses):
    cfg = LossesConfig(terms=[LossTermConfig(**s) for s in specs], **losses)
    return build_terms(cfg, student.config, teacher.config, "test.yaml")


def attend_as_built(model: Distiller, student, teacher):
    """Give both models the attention the engine builds them with for these terms (eager for the maps path,
    the capturing SDPA for the fused one)."""
    for m, needs in ((student, model.student_needs), (teacher, model.teacher_needs)):
        m.set_attn_implementation(attn_implementation(needs, m.config) or "sdpa")


@pytest.mark.parametrize("path", ["maps", "fused"])
def test_every_term_matches_an_independent_computation(path):
    student, teacher, b = bert(2, 32), bert(4, 32, seed=1), batch()
    specs = [
        {"kind": "mlm"},
        {"kind": "logit_kl"},
        {"kind": "hidden_cosine", "layer_map": "uniform"},
        {"kind": "hidden_mse", "layer_map": [[0, 0], [2, 4]]},
        {"kind": "attention_kl", "layer_map": "last"},
        {"kind": "attention_mse", "layer_map": [[1, 2]]},
    ]
    terms = terms_for(specs, student, teacher, attention_path=path)
    model = Distiller(student, terms, [2.0, 5.0, 1.0, 1.0, 1.0, 1.0], teacher)
    if path == "maps":
        assert model.student_needs == Needs(True, True, True) and model.teacher_needs == Needs(True, True, True)
    else:  # the layers' queries and keys instead of every layer's maps
        assert model.student_needs == Needs(True, True, queries_keys=frozenset({0, 1}))
        assert model.teacher_needs == Needs(True, True, queries_keys=frozenset({1, 3}))
    attend_as_built(model, student, teacher)
    with torch.no_grad():
        loss, values, *_ = model(b)
        student.set_attn_implementation("eager"), teacher.set_attn_implementation("eager")  # the maps, below
        so = student(
            b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True, output_attentions=True
        )
        to = teacher(
            b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True, output_attentions=True
        )
    m = b["attention_mask"].bool()
    sl, tl = so.logits[m & (b["labels"] != -100)].double(), to.logits[m & (b["labels"] != -100)].double()
    expected = [
        F.cross_entropy(sl, b["labels"][b["labels"] != -100]),
        kl_float64(sl, tl, 2.0).mean(),
        sum(
            (1 - F.cosine_similarity(so.hidden_states[i][m].double(), to.hidden_states[2 * i][m].double(), -1)).mean()
            for i in (1, 2)
        ),
        sum(
            ((so.hidden_states[s][m].double() - to.hidden_states[t][m].double()) ** 2).mean()
            for s, t in [(0, 0), (2, 4)]
        ),
    ]
    for s_layer, t_layer, kind in [(2, 4, "kl"), (1, 2, "mse")]:
        sa, ta = so.attentions[s_layer - 1].double(), to.attentions[t_layer - 1].double()
        elem = ta * ((ta + 1e-12).log() - (sa + 1e-12).log()) if kind == "kl" else (sa - ta) ** 2
        rows = [elem[bi, :, q, :] for bi in range(3) for q in range(10) if m[bi, q]]  # valid query rows only
        expected.append(torch.stack(rows).mean())
    torch.testing.assert_close(values.double(), torch.stack(expected), rtol=1e-4, atol=1e-6)
    weights = torch.tensor([2.0, 5.0, 1, 1, 1, 1], dtype=torch.float64)
    assert loss.item() == pytest.approx((weights * torch.stack(expected)).sum().item(), rel=1e-4)


def test_lm_heads_run_only_at_selected_rows():
    student, teacher, b = bert(2, 32), bert(2, 32, seed=1), batch()
    seen = []
    student.cls.register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape)))
    model = Distiller(student, terms_for([{"kind": "logit_kl"}], student, teacher), [1.0], teacher)
    *_, t = model(b)
    assert t.logits.shape == (3, 97) and seen == [(3, 97)]  # 3 masked rows, never 3 x 10 x 97


def test_gradients_reach_student_and_projection_only():
    student, teacher, b = bert(2, 16, heads=2), bert(2, 32), batch()
    teacher.requires_grad_(False)
    terms = terms_for([{"kind": "hidden_mse", "layer_map": "uniform", "projection": True}], student, teacher)
    model = Distiller(student, terms, [1.0], teacher)
    loss, *_ = model(b)
    loss.backward()
    assert model.terms[0].projection.weight.grad is not None
    assert student.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert not any("projection" in k for k in student.state_dict())  # dropped at export by construction


@pytest.mark.parametrize(
    "spec, student_shape, fragment",
    [
        ({"kind": "hidden_cosine"}, (2, 16, 2), "use hidden_mse with projection"),
        ({"kind": "attention_kl"}, (2, 32, 2), "student has 2 heads, teacher 4"),
        ({"kind": "hidden_mse", "layer_map": [[3, 4]]}, (2, 32, 4), "out of range"),
        ({"kind": "attention_mse", "layer_map": [[0, 1]]}, (2, 32, 4), "attention maps are numbered 1..L"),
        ({"kind": "hidden_cosine", "layer_map": "uniform"}, (3, 32, 4), "multiple of student layers"),
        ({"kind": "hidden_cosine", "projection": True}, (2, 32, 4), "use hidden_mse"),
    ],
)
def test_term_build_errors_name_the_term(spec, student_shape, fragment):
    layers, hidden, heads = student_shape
    with pytest.raises(ConfigError) as e:
        terms_for([{"kind": "mlm"}, spec], bert(layers, hidden, heads), bert(4, 32))
    assert e.value.key.startswith("losses.terms[1]") and fragment in str(e.value)


def test_logit_rows_all_uses_every_non_pad_token():
    student, teacher, b = bert(2, 32), bert(2, 32, seed=1), batch()
    b["rows"] = b["attention_mask"].flatten().nonzero().squeeze(1)
    b["row_labels"] = b["labels"].flatten()[b["rows"]]
    model = Distiller(
        student, terms_for([{"kind": "mlm"}, {"kind": "logit_kl"}], student, teacher), [1.0, 1.0], teacher
    )
    _, values, _, s, _ = model(b)
    assert s.logits.shape[0] == int(b["attention_mask"].sum())
    full = student(b["input_ids"], attention_mask=b["attention_mask"]).logits
    masked = b["labels"] != -100
    assert values[0].item() == pytest.approx(F.cross_entropy(full[masked], b["labels"][masked]).item(), rel=1e-5)


def scores_float64(model, hidden_states, mask, heads):
    """QK^T/sqrt(d) recomputed from each layer's input through its own query/key projections."""
    out = []
    for i, layer in enumerate(model.base_model.encoder.layer):
        attn = layer.attention.self
        q, k = attn.query(hidden_states[i]).double(), attn.key(hidden_states[i]).double()
        b, t, w = q.shape
        q, k = (x.view(b, t, heads, w // heads).transpose(1, 2) for x in (q, k))
        scores = q @ k.transpose(-1, -2) / (w // heads) ** 0.5
        out.append(scores.masked_fill(~mask[:, None, None, :], 0.0))
    return out


@pytest.mark.parametrize("path", ["maps", "fused"])
def test_tinybert_terms_match_an_independent_computation(path):
    """soft_ce (T=2) and attention_score_mse against float64 recomputations, padded queries excluded."""
    student, teacher, b = bert(2, 32), bert(4, 32, seed=1), batch()
    specs = [{"kind": "soft_ce", "temperature": 2.0}, {"kind": "attention_score_mse", "layer_map": [[1, 2], [2, 4]]}]
    model = Distiller(student, terms_for(specs, student, teacher, attention_path=path), [1.0, 1.0], teacher)
    scores = {"scores": True} if path == "maps" else {"queries_keys": frozenset({0, 1})}
    assert model.student_needs == Needs(logits=True, **scores)
    attend_as_built(model, student, teacher)
    with torch.no_grad():
        _, values, _, _, t = model(b)
        so = student(b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
        to = teacher(b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
    m = b["attention_mask"].bool()
    rows = m & (b["labels"] != -100)
    p = torch.softmax(to.logits[rows].double() / 2, -1)
    soft_ce = 4 * -(p * torch.log_softmax(so.logits[rows].double() / 2, -1)).sum(-1).mean()
    s_scores = scores_float64(student, so.hidden_states, m, 4)
    t_scores = scores_float64(teacher, to.hidden_states, m, 4)
    mse = 0
    for s_layer, t_layer in [(1, 2), (2, 4)]:
        elem = (s_scores[s_layer - 1] - t_scores[t_layer - 1]) ** 2
        mse += torch.stack([elem[bi, :, q, :] for bi in range(3) for q in range(10) if m[bi, q]]).mean()
    torch.testing.assert_close(values.double(), torch.stack([soft_ce, mse]), rtol=1e-4, atol=1e-6)
    # soft_ce is logit_kl plus the teacher's entropy: the same gradient, a different value.
    kl = terms_for([{"kind": "logit_kl", "temperature": 2.0}], student, teacher)[0]
    entropy = 4 * -(p * p.log()).sum(-1).mean()
    s_out = encode(student, b["input_ids"], b["attention_mask"], Needs(logits=True), b["rows"])
    assert model.terms[0](s_out, t, b).item() == pytest.approx((kl(s_out, t, b) + entropy).item(), rel=1e-5)


@pytest.mark.parametrize("model_type", ["distilbert", "mobilebert"])
def test_attention_scores_for_each_student_family(model_type):
    """The score hooks find every layer's query/key in DistilBERT and MobileBERT, padded keys zeroed."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    shapes = {
        "distilbert": {"dim": 32, "n_heads": 4, "n_layers": 2, "hidden_dim": 64},
        "mobilebert": {"hidden_size": 64, "true_hidden_size": 16, "intra_bottleneck_size": 16, "embedding_size": 16}
        | {"num_attention_heads": 4, "num_hidden_layers": 3, "intermediate_size": 32},
    }
    model = AutoModelForMaskedLM.from_config(AutoConfig.for_model(model_type, vocab_size=97, **shapes[model_type]))
    b = batch()
    out = encode(model.eval(), b["input_ids"], b["attention_mask"], Needs(scores=True, attentions=True))
    assert len(out.scores) == model.config.num_hidden_layers
    for scores, probs in zip(out.scores, out.attentions):
        assert scores.shape == probs.shape == (3, 4, 10, 10)
        assert (scores[1, :, :, 7:] == 0).all() and (scores[2, :, :, 4:] == 0).all()
        # Softmax of the scores over the real keys is the model's own attention map.
        valid = b["attention_mask"].bool()[:, None, None, :]
        recovered = torch.softmax(scores.masked_fill(~valid, float("-inf")), -1)
        torch.testing.assert_close(recovered, probs, rtol=1e-4, atol=1e-5)
