"""ModernBERT and DeBERTa-v2/v3 as teachers and students, on small random models built here.

Each output the engine reads (logits at rows, hidden states, attention maps, pre-softmax scores) is checked
against the family's own forward and an independent computation of the scores; every loss term against a
float64 computation from those; students copied from teacher layers against the teacher's layers; and each
refusal by its exact message. The real 2-rank jobs are the recipes' smoke runs (tests/test_recipes.py).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, matrix, metrics, minilm_dir, recipe_dict, write_recipe
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer, BertConfig, DebertaV2Config, ModernBertConfig

from biodistill.engine.config import ConfigError, Recipe, _convert, load_recipe
from biodistill.engine.distiller import Distiller
from biodistill.engine.losses import build_terms
from biodistill.engine.models.outputs import Needs, attn_implementation, encode, mlm_head, model_mask
from biodistill.engine.models.published import published_config
from biodistill.engine.models.smoke import smoke
from biodistill.engine.models.students import build_student, check_positions, student_config
from biodistill.engine.models.teacher import load_teacher

FAMILIES = ["modernbert", "deberta-v2"]
F_, S_ = "full_attention", "sliding_attention"


def config(family: str, layers: int, vocab: int = 97, **fields):
    # Weights 10x the families' init scale: peaked attention, so that every attention term is far from 0.
    fields.setdefault("initializer_range", 0.2)
    if family == "modernbert":  # a 4-token window either side: local layers really are local at T=12
        return ModernBertConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
            local_attention=8, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            cls_token_id=1, sep_token_id=2, **fields,
        )  # fmt: skip
    return DebertaV2Config(  # DeBERTa-v3's attention: shared keys, both position terms, log buckets
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        relative_attention=True, position_buckets=8, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
        share_att_key=True, position_biased_input=False, max_position_embeddings=128, type_vocab_size=0,
        pad_token_id=0, hidden_act="gelu", **fields,
    )  # fmt: skip


def model(family: str, layers: int, seed: int = 0, **fields):
    torch.manual_seed(seed)
    return AutoModelForMaskedLM.from_config(config(family, layers, **fields), attn_implementation="eager").eval()


def batch(B=3, T=12, vocab=97):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 9:], mask[2, 5:] = 0, 0
    labels = torch.full((B, T), -100)
    labels[0, 2], labels[0, 10], labels[1, 4], labels[2, 1] = 11, 12, 13, 14
    rows = (labels != -100).flatten().nonzero().squeeze(1)
    return {"input_ids": ids, "attention_mask": mask, "rows": rows, "row_labels": labels.flatten()[rows]}


def keep(family, cfg, layer, mask):
    """Which [B, 1, T, T] entries the family's attention reads: valid query and key, inside the window."""
    valid = mask.bool()
    out = valid[:, None, :, None] & valid[:, None, None, :]
    if family == "modernbert" and cfg.layer_types[layer] == S_:
        i = torch.arange(mask.shape[1])
        out = out & ((i[:, None] - i[None, :]).abs() <= cfg.local_attention // 2)
    return out


def reference_scores(family, m, hidden, mask):
    """Each layer's pre-softmax scores computed afresh from the layer's input (the family's hidden states),
    in float64, masked entries 0: RoPE written out here for ModernBERT; DeBERTa's own content and
    relative-position functions for DeBERTa."""
    base, cfg = m.base_model, m.config
    heads, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    out = []
    for i in range(cfg.num_hidden_layers):
        x = hidden[i]  # the input of layer i (the last entry of hidden is after the final norm: not used)
        b, t, _ = x.shape
        if family == "modernbert":
            layer = base.layers[i]
            qkv = layer.attn.Wqkv(layer.attn_norm(x)).double().view(b, t, 3, heads, d)
            q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
            theta = cfg.rope_parameters[cfg.layer_types[i]]["rope_theta"]
            angle = torch.arange(t, dtype=torch.float64)[:, None] / theta ** (torch.arange(0, d, 2) / d)[None, :]
            cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)

            def rope(v, cos=cos, sin=sin):
                return v * cos + torch.cat([-v[..., d // 2 :], v[..., : d // 2]], -1) * sin

            s = rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(d)
        else:
            att = base.encoder.layer[i].attention.self
            q = att.transpose_for_scores(att.query_proj(x), heads)
            k = att.transpose_for_scores(att.key_proj(x), heads)
            rel = att.disentangled_attention_bias(
                q, k, base.encoder.get_rel_pos(x), base.encoder.get_rel_embedding(), 3
            )
            s = (torch.bmm(q, k.transpose(-1, -2)) / math.sqrt(3 * d) + rel).double().view(b, heads, t, t)
        out.append(torch.where(keep(family, cfg, i, mask), s, 0))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_are_the_familys_own(family):
    m, b = model(family, 4), batch()
    mask = b["attention_mask"]
    with torch.no_grad():
        out = encode(m, b["input_ids"], mask, Needs(True, True, True, True), b["rows"])
        ref = m(input_ids=b["input_ids"], attention_mask=mask, output_hidden_states=True, output_attentions=True)
        scores = reference_scores(family, m, ref.hidden_states, mask)
    # Logits at the selected rows are the full head's rows.
    torch.testing.assert_close(out.logits, ref.logits.flatten(0, 1)[b["rows"]])
    for mine, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(mine, theirs)
    valid = mask.bool()[:, None, :, None]
    for i, (s, a, want) in enumerate(zip(out.scores, out.attentions, scores, strict=True)):
        kept = keep(family, m.config, i, mask)
        torch.testing.assert_close(a, ref.attentions[i])
        torch.testing.assert_close(s.double(), want, rtol=1e-5, atol=1e-5)
        assert torch.equal(s[~kept.expand_as(s)], torch.zeros_like(s[~kept.expand_as(s)]))
        # The family's own softmax of exactly these scores is its attention map.
        probs = torch.softmax(s.masked_fill(~kept, float("-inf")), -1)
        torch.testing.assert_close(torch.where(valid, probs, 0), torch.where(valid, a, 0), rtol=1e-5, atol=1e-6)
    if family == "modernbert":  # layers 1 and 2 are local: a query sees at most 9 of 12 keys
        assert [int(keep(family, m.config, i, mask)[0, 0, 6].sum()) for i in range(4)] == [12, 9, 9, 12]
    else:  # the relative-position terms are part of DeBERTa's scores: content alone is not
        content = [reference_scores(family, _no_positions(m), ref.hidden_states, mask)[i] for i in range(4)]
        assert all((c - s.double()).abs().max() > 1e-2 for c, s in zip(content, out.scores))


def _no_positions(m):
    plain = copy.deepcopy(m)
    for layer in plain.base_model.encoder.layer:
        layer.attention.self.disentangled_attention_bias = lambda *a, **k: 0
    return plain


@pytest.mark.parametrize("family", FAMILIES)
def test_unpadded_batches_give_the_same_outputs(family):
    """No padding: ModernBERT runs without a mask (SDPA may take its fastest path); DeBERTa always gets its
    2-D mask (without one it reads input_ids on the host)."""
    m, ids = model(family, 3), batch()["input_ids"]
    ones = torch.ones_like(ids)
    assert (model_mask(m, ones, padded=False) is None) == (family == "modernbert")
    with torch.no_grad():
        a = encode(m, ids, ones, Needs(hidden_states=True, scores=True), padded=False)
        b = encode(m, ids, ones, Needs(hidden_states=True, scores=True), padded=True)
    for x, y in zip(a.hidden_states + a.scores, b.hidden_states + b.scores, strict=True):
        torch.testing.assert_close(x, y)


def pairs_for(family):
    # student [F, S] vs teacher [F, S, S, F]: attention pairs must join layers of the same kind
    return [[1, 4], [2, 3]] if family == "modernbert" else [[1, 2], [2, 4]]


@pytest.mark.parametrize("family, path", [("modernbert", "auto"), ("modernbert", "maps"), ("deberta-v2", "auto")])
def test_every_term_against_float64_from_the_familys_outputs(family, path):
    """ModernBERT's attention terms take the fused path (its post-RoPE queries and keys captured under SDPA)
    unless told otherwise; DeBERTa's always read the maps. Either way, the family's own maps agree."""
    student, teacher, b = model(family, 2, seed=1), model(family, 4), batch()
    attn = pairs_for(family)
    specs = [
        {"kind": "logit_kl", "temperature": 2.0},
        {"kind": "hidden_mse", "layer_map": "uniform"},
        {"kind": "hidden_cosine", "layer_map": "last"},
        {"kind": "attention_kl", "layer_map": attn},
        {"kind": "attention_mse", "layer_map": attn},
        {"kind": "attention_score_mse", "layer_map": attn},
    ]
    terms = terms_for(specs, student.config, teacher.config, path)
    assert {t.path for t in terms if hasattr(t, "path")} == {
        "fused" if (family, path) == ("modernbert", "auto") else "maps"
    }
    dm = Distiller(student, terms, [1.0] * len(terms), teacher)
    for m, needs in ((student, dm.student_needs), (teacher, dm.teacher_needs)):  # as the engine builds them
        m.set_attn_implementation(attn_implementation(needs, m.config) or "eager")
    mask = b["attention_mask"]
    with torch.no_grad():
        _, values, *_ = dm(b)
        student.set_attn_implementation("eager"), teacher.set_attn_implementation("eager")  # the maps, below
        so = student(input_ids=b["input_ids"], attention_mask=mask, output_hidden_states=True, output_attentions=True)
        to = teacher(input_ids=b["input_ids"], attention_mask=mask, output_hidden_states=True, output_attentions=True)
        s_scores = reference_scores(family, student, so.hidden_states, mask)
        t_scores = reference_scores(family, teacher, to.hidden_states, mask)
    v = mask.bool()
    rows = b["rows"]
    p = torch.softmax(to.logits.flatten(0, 1)[rows].double() / 2, -1)
    logq = torch.log_softmax(so.logits.flatten(0, 1)[rows].double() / 2, -1)
    kl = 4 * (p * (p.log() - logq)).sum(-1).mean()
    hs, ht = [h.double() for h in so.hidden_states], [h.double() for h in to.hidden_states]
    mse = sum(((hs[i] - ht[2 * i]) ** 2).mean(-1)[v].mean() for i in (1, 2))
    cosine = (1 - F.cosine_similarity(hs[2][v], ht[4][v], dim=-1)).mean()

    def per_row_mean(elem):  # over valid query rows, every head and key
        return elem.permute(0, 2, 1, 3)[v].mean()

    sa, ta = [a.double() for a in so.attentions], [a.double() for a in to.attentions]
    att_kl = sum(per_row_mean(ta[t - 1] * ((ta[t - 1] + 1e-12).log() - (sa[s - 1] + 1e-12).log())) for s, t in attn)
    att_mse = sum(per_row_mean((sa[s - 1] - ta[t - 1]) ** 2) for s, t in attn)
    score_mse = sum(per_row_mean((s_scores[s - 1] - t_scores[t - 1]) ** 2) for s, t in attn)
    expected = torch.stack([kl, mse, cosine, att_kl, att_mse, score_mse])
    torch.testing.assert_close(values.double(), expected, rtol=1e-4, atol=1e-6)
    assert (expected > 1e-2).all()  # no term is trivially zero


def terms_for(specs, student_config, teacher_config, path="auto"):
    raw = {"temperature": 2.0, "attention_path": path, "terms": [{"weight": 1.0, **s} for s in specs]}
    return build_terms(_convert(Recipe, {"losses": raw}, "", "t.yaml", {}).losses, student_config, teacher_config, "t")


def refusal(specs, student_config, teacher_config) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        terms_for(specs, student_config, teacher_config)
    return e.value


def test_attention_terms_refuse_what_would_compare_different_things():
    mb2, mb4, bert = (
        config("modernbert", 2),
        config("modernbert", 4),
        BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
    )
    e = refusal([{"kind": "attention_kl", "layer_map": [[1, 1], [2, 4]]}], mb2, mb4)
    assert e.key == "losses.terms[0].layer_map"
    assert e.message == (
        "pair [2, 4]: student layer 2 attends to a local window of 4 keys either side (modernbert), teacher layer 4 "
        "to every key; their maps cover different keys, so pair layers of the same kind"
    )
    e = refusal([{"kind": "attention_mse", "layer_map": [[1, 1], [2, 2]]}], bert, mb4)
    assert "student layer 2 attends to every key, teacher layer 2 to a local window of 4 keys" in e.message
    e = refusal([{"kind": "attention_score_mse", "layer_map": [[1, 1]]}], bert, mb4)
    assert e.key == "losses.terms[0].kind"
    assert e.message == (
        "attention_score_mse compares pre-softmax scores, and these differ in kind: the student's (bert) are "
        "QK^T/sqrt(d), positions added to the embeddings, the teacher's (modernbert) QK^T/sqrt(d) of rotated "
        "queries and keys (RoPE inside attention); compare post-softmax maps across families (attention_kl, "
        "attention_mse)"
    )
    deberta = config("deberta-v2", 2)
    e = refusal([{"kind": "attention_score_mse", "layer_map": [[1, 1]]}], deberta, config("modernbert", 3))
    assert "the student's (deberta-v2) are disentangled attention, QK^T plus content-to-position" in e.message
    # Post-softmax maps of the same kind of layer do compare across families.
    assert terms_for([{"kind": "attention_kl", "layer_map": [[1, 1]]}], bert, mb4)
    electra = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    electra.model_type = "electra"
    e = refusal([{"kind": "attention_score_mse", "layer_map": "last"}], electra, bert)
    assert e.message == (
        "no attention-score adapter for model_type 'electra'; known: bert, mobilebert, roberta, distilbert, "
        "minialbert, modernbert, deberta-v2"
    )


# ------------------------------------------------------------------------------------- students


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Each family as a saved Hugging Face directory (MLM head, the MiniLM tokenizer), dropout off so that a
    copied student computes exactly what the teacher's layers compute."""
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(family)
        zero = {"embedding_dropout": 0.0} if family == "modernbert" else {"hidden_dropout_prob": 0.0}
        model(family, 5, vocab=30522, **zero).save_pretrained(path)
        AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(path)
        out[family] = path
    return out


def recipe(teacher, tmp_path, **sections) -> Recipe:
    raw = recipe_dict(teacher, tmp_path / "c.jsonl", tmp_path, [{"kind": "mlm"}], **sections)
    return _convert(Recipe, raw, "", "test.yaml", {})


@pytest.mark.parametrize("family", FAMILIES)
def test_student_from_teacher_layers_reproduces_those_layers(family, teachers, tmp_path):
    r = recipe(teachers[family], tmp_path, student={"teacher_layers": [0, 1, 2]})
    teacher = load_teacher(r, Needs(logits=True), torch.device("cpu"))
    student = build_student(r, Needs(logits=True), teacher).eval()
    b = batch(vocab=30522)
    needs = Needs(hidden_states=True, logits=True)
    with torch.no_grad():
        s = encode(student, b["input_ids"], b["attention_mask"], needs, b["rows"])
        t = encode(teacher, b["input_ids"], b["attention_mask"], needs, b["rows"])
    v = b["attention_mask"].bool()
    for i in (0, 1, 2):
        torch.testing.assert_close(s.hidden_states[i][v], t.hidden_states[i][v])
    last = t.hidden_states[3]
    if family == "modernbert":  # a ModernBERT's last hidden state is after its final norm
        last = teacher.base_model.final_norm(last)
    torch.testing.assert_close(s.hidden_states[3][v], last[v], rtol=1e-5, atol=1e-5)
    # The MLM head (tied to the embeddings) came along.
    torch.testing.assert_close(s.logits, mlm_of(teacher, last, b["rows"]), rtol=1e-5, atol=1e-5)


def mlm_of(teacher, hidden, rows):
    return mlm_head(teacher)(hidden.flatten(0, 1)[rows])


def test_modernbert_students_keep_each_layer_kind(teachers, tmp_path):
    teacher_cfg = AutoModel.from_pretrained(teachers["modernbert"]).config
    assert teacher_cfg.layer_types == [F_, S_, S_, F_, S_]
    r = recipe(teachers["modernbert"], tmp_path, student={"teacher_layers": [0, 3, 4, 2]})
    teacher = load_teacher(r, Needs(), torch.device("cpu"))
    student = build_student(r, Needs(), teacher)
    assert student.config.layer_types == [F_, F_, S_, S_]  # global, global, local, local: as copied
    windows = [layer.attn.sliding_window for layer in student.base_model.layers]
    assert windows == [teacher.base_model.layers[i].attn.sliding_window for i in (0, 3, 4, 2)] == [None, None, 5, 5]
    t_sd, s_sd = teacher.base_model.state_dict(), student.base_model.state_dict()
    for s_i, t_i in enumerate((0, 3, 4, 2)):
        for name in ["attn.Wqkv.weight", "mlp.Wo.weight", "mlp_norm.weight"]:
            assert torch.equal(s_sd[f"layers.{s_i}.{name}"], t_sd[f"layers.{t_i}.{name}"])
    for bad in ([1, 2], [0, 2, 0]):
        with pytest.raises(ConfigError) as e:
            student_config(recipe(teachers["modernbert"], tmp_path, student={"teacher_layers": bad}), teacher_cfg)
        assert e.value.key == "student.teacher_layers"
        assert e.value.message == (
            f"{bad}: ModernBERT's layer 0 has no attention LayerNorm (the embedding norm precedes it) and every "
            "other layer has one, so a student's first layer must be the teacher's layer 0 and no later one can "
            "be; start the list with 0"
        )
    # A random-init student of another depth continues the teacher's pattern (global every third layer).
    grown = student_config(
        recipe(teachers["modernbert"], tmp_path, student={"init": "config", "overrides": {"num_hidden_layers": 7}}),
        teacher_cfg,
    )
    assert grown.layer_types == [F_, S_, S_, F_, S_, S_, F_]
    AutoModel.from_config(grown)  # transformers accepts it: one kind per layer


@pytest.mark.parametrize("family", FAMILIES)
def test_student_from_checkpoint_continues_it(family, teachers, tmp_path):
    r = recipe("", tmp_path, student={"init": "checkpoint", "path": str(teachers[family])})
    student = build_student(r, Needs(scores=True), None)
    saved = AutoModelForMaskedLM.from_pretrained(teachers[family]).state_dict()
    assert student.config.model_type == family and student.config._attn_implementation == "eager"
    for key, value in student.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_deberta_without_a_trained_mlm_head_refuses_logit_terms(tmp_path):
    """DeBERTa-v3 checkpoints are ELECTRA-style discriminators, saved without a masked-LM head."""
    torch.manual_seed(0)
    AutoModel.from_config(config("deberta-v2", 2, vocab=30522)).save_pretrained(tmp_path / "v3")
    r = recipe(tmp_path / "v3", tmp_path)
    with pytest.raises(ConfigError, match="has no trained masked-LM head") as e:
        load_teacher(r, Needs(logits=True), torch.device("cpu"))
    assert e.value.key == "teacher.path"


# -------------------------------------------------------------------------------- recipes, length


def test_smoke_keeps_the_layer_kinds_and_a_real_window(tmp_path):
    r = load_recipe(REPO / "configs" / "bioclinical-modernbert-6l.yaml", check_paths=False,
                    overrides=["--train.output_dir", str(tmp_path / "run")])  # fmt: skip
    small = smoke(r)
    teacher = AutoModel.from_pretrained(small.teacher.path).config
    assert teacher.num_hidden_layers == 11 and teacher.layer_types == ([F_, S_, S_] * 4)[:11]
    assert teacher.local_attention == 128 * 64 // 1024  # the window shrinks with the sequence: 8 of 64 tokens
    assert small.student.teacher_layers == [0, 4, 8]
    assert student_config(small, teacher).layer_types == [F_, S_, S_]


def test_modernbert_takes_sequences_up_to_its_8k_positions():
    modern, deberta = (published_config(n) for n in ("answerdotai/ModernBERT-base", "microsoft/deberta-v3-base"))
    long = _with(teacher_layers=[0, 3], max_length=8192)
    check_positions(long, modern, student_config(long, modern))
    with pytest.raises(ConfigError) as e:
        check_positions(long, deberta, student_config(long, deberta))
    assert e.value.key == "data.max_length" and "8192 tokens is longer than the teacher has positions for: 512" in str(
        e.value
    )


def _with(teacher_layers, terms=(), max_length=128, micro=4) -> Recipe:
    raw = recipe_dict("t", "c.jsonl", Path("/tmp"), list(terms) or [{"kind": "mlm"}])
    raw["student"]["teacher_layers"] = teacher_layers
    raw["data"]["max_length"], raw["train"]["micro_batch_size"] = max_length, micro
    return _convert(Recipe, raw, "", "test.yaml", {})


# ------------------------------------------------------------------------------------- multirank


@pytest.mark.multirank
def test_a_two_rank_job_per_family_learns_its_teacher(teachers, tiny_corpus, tmp_path):
    """One launch, a run per family: a random 2-layer student learns the 5-layer teacher's last hidden state,
    attention maps and pre-softmax scores under ZeRO-2 on 2 ranks, its held-out loss and every term falling.
    ModernBERT runs twice, on the fused path (captured post-RoPE queries and keys, SDPA) and on the maps path
    (eager attention's maps and scores): these models have no dropout, so the 20 steps' every logged loss
    is the same on both, to 1e-5. DeBERTa takes the maps path."""
    pairs = [[1, 4], [2, 5]]  # ModernBERT: global <-> global, local <-> local
    terms = [
        {"kind": "hidden_cosine", "weight": 1.0, "layer_map": "last"},
        {"kind": "attention_kl", "weight": 1.0, "layer_map": pairs},
        {"kind": "attention_mse", "weight": 1.0, "layer_map": pairs},
        {"kind": "attention_score_mse", "weight": 0.1, "layer_map": pairs},
    ]
    raw = recipe_dict(
        teachers["modernbert"], tiny_corpus, tmp_path, terms,
        student={"init": "config", "overrides": {"num_hidden_layers": 2}},
        train={"max_steps": 20, "log_every": 1, "export": False},
    )  # fmt: skip
    settings = {
        "modernbert": [],
        "modernbert-maps": ["--losses.attention_path", "maps"],
        "deberta": ["--teacher.path", str(teachers["deberta-v2"])],
    }
    results = matrix(write_recipe(tmp_path / "r.yaml", raw), tmp_path / "out.json", settings)
    paths = {name: [line.split(": ")[1].split(" (")[0] for line in s["attention_terms"]] for name, s in results.items()}
    assert paths == {
        "modernbert": ["fused path"] * 3,
        "modernbert-maps": ["maps path"] * 3,
        "deberta": ["maps path"] * 3,
    }
    fused, maps = (metrics(tmp_path / "out.json.d" / name) for name in ("modernbert", "modernbert-maps"))
    assert len(fused) == len(maps) == 20
    losses = ["loss", "hidden_cosine", "attention_kl", "attention_mse", "attention_score_mse"]
    for a, b in zip(fused, maps):
        for key in losses:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    for name, s in results.items():
        assert s["job"]["world_size"] == 2 and s["steps"] == 20, name
        before, after = s["before"], s["after"]
        for key in ("loss/total", "loss/hidden_cosine", "loss/attention_kl", "loss/attention_score_mse"):
            assert after[key] < before[key], (name, key, before[key], after[key])
