"""MiniALBERT against an independent plain-PyTorch computation of the published function, read from
the state dict by the published key names; loading the published checkpoint format; adapters-only
training; parameter counts; the engine's use of it (outputs, attention scores, distillation)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from biodistill.engine.models.minialbert import (
    MiniAlbertConfig,
    MiniAlbertForMaskedLM,
    MiniAlbertForSequenceClassification,
    MiniAlbertForTokenClassification,
    MiniAlbertModel,
    from_published,
)
from biodistill.engine.models.outputs import Needs, encode

SMALL = dict(
    vocab_size=113, embedding_size=24, hidden_size=64, num_attention_heads=4, intermediate_size=96, num_hidden_layers=3
)
SMALL_ALT = dict(SMALL, reduction_factor=8)


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight random, LayerNorm gains away from 1 and biases away from 0: nothing is an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.copy_(1 + 0.2 * noise if "norm" in name.lower() and name.endswith("weight") else 0.2 * noise)
    return model.eval()


def padded_batch(vocab: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    return ids, mask


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def reference(sd: dict, cfg: dict, ids: torch.Tensor, mask: torch.Tensor):
    """The function of shared/reference/minialbert.md, in float64, from the published key names only."""
    w = {k: v.double() for k, v in sd.items()}
    eps, heads, hidden = 1e-12, cfg["num_attention_heads"], cfg["hidden_size"]

    def lin(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    def ln(x, name):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * w[name + ".weight"] + w[name + ".bias"]

    def adapter(x, name):
        return ln(x + lin(gelu(lin(x, name + ".block.0")), name + ".block.2"), name + ".norm")

    emb = "albert.albert.embeddings."
    b, t = ids.shape
    x = w[emb + "word_embeddings.weight"][ids] + w[emb + "token_type_embeddings.weight"][0]
    x = ln(x + w[emb + "position_embeddings.weight"][:t], emb + "LayerNorm")
    h = lin(x, "albert.projector")
    layer = "albert.albert.encoder.albert_layer_groups.0.albert_layers.0."
    bias = (1 - mask[:, None, None, :].double()) * torch.finfo(torch.float32).min
    hidden_states, maps = [h], []
    for i in range(cfg["num_hidden_layers"]):
        a = adapter(h, f"albert.att_adapters.{i}")
        q, k, v = (
            lin(a, layer + f"attention.{n}").view(b, t, heads, -1).transpose(1, 2) for n in ("query", "key", "value")
        )
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hidden / heads) + bias, -1)
        context = (probs @ v).transpose(1, 2).reshape(b, t, hidden)
        att = ln(a + lin(context, layer + "attention.dense"), layer + "attention.LayerNorm")
        c = adapter(att, f"albert.mlp_adapters.{i}")
        h = ln(c + lin(gelu(lin(c, layer + "ffn")), layer + "ffn_output"), layer + "full_layer_layer_norm")
        hidden_states.append(h)
        maps.append(probs)
    logits = lin(ln(gelu(lin(h, "vocab_transform")), "vocab_layer_norm"), "vocab_projector")
    return hidden_states, maps, logits


@pytest.mark.parametrize("shape", [SMALL, SMALL_ALT], ids=["r16", "r8"])
def test_model_computes_the_published_function(shape):
    model = randomised(MiniAlbertForMaskedLM(MiniAlbertConfig(**shape))).double()
    ids, mask = padded_batch(shape["vocab_size"])
    out = model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    hidden, maps, logits = reference(model.state_dict(), shape, ids, mask)
    assert len(out.hidden_states) == len(hidden) == shape["num_hidden_layers"] + 1
    for ours, theirs in zip(out.hidden_states, hidden):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
    for ours, theirs in zip(out.attentions, maps):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.logits, logits, rtol=1e-9, atol=1e-9)
    assert (out.attentions[0][2, :, :, 2:] == 0).all()  # padded keys get no attention
    # Without attention maps the model takes the SDPA path: the same function.
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, logits, rtol=1e-9, atol=1e-9)


def published_checkpoint(directory, model: MiniAlbertForMaskedLM, shape: dict) -> None:
    """Files as the original code wrote them: config.json with model_type "bert" and ALBERT fields,
    weights under the original keys plus the position_ids buffer older transformers saved."""
    config = {
        "model_type": "bert",
        "architectures": ["MiniAlbertForMaskedLM"],
        **shape,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "num_hidden_groups": 1,
        "inner_group_num": 1,
        "use_adapter": True,
        "reduction_factor": 16,
        "transformers_version": "4.21.2",
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    weights["albert.albert.embeddings.position_ids"] = torch.arange(512)[None]
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})


def test_published_checkpoint_loads_and_round_trips(tmp_path):
    original = randomised(MiniAlbertForMaskedLM(MiniAlbertConfig(**SMALL)), seed=3)
    published_checkpoint(tmp_path / "published", original, SMALL)
    ids, mask = padded_batch(SMALL["vocab_size"])
    expected = original(ids, attention_mask=mask).logits

    loaded = from_published(tmp_path / "published").eval()
    assert isinstance(loaded.config, MiniAlbertConfig) and loaded.config.embedding_size == 24
    torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, expected, rtol=0, atol=0)
    # The engine reads the same files through its config loader (students.load_config).
    from biodistill.engine.config import Recipe
    from biodistill.engine.models.students import load_config

    assert type(load_config(str(tmp_path / "published"), Recipe(), "student.path")) is MiniAlbertConfig

    loaded.save_pretrained(tmp_path / "ours")  # now model_type "minialbert": plain Auto classes work
    assert AutoConfig.from_pretrained(tmp_path / "ours").model_type == "minialbert"
    again = AutoModelForMaskedLM.from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(again(ids, attention_mask=mask).logits, expected, rtol=0, atol=0)
    body = AutoModel.from_pretrained(tmp_path / "published", config=loaded.config)
    assert type(body) is MiniAlbertModel and torch.equal(body.projector.weight, original.albert.projector.weight)
    for cls in (MiniAlbertForTokenClassification, MiniAlbertForSequenceClassification):
        head = from_published(tmp_path / "published", cls, num_labels=5).eval()
        torch.testing.assert_close(head.albert.projector.weight, original.albert.projector.weight)


def test_task_heads():
    config = MiniAlbertConfig(**SMALL, num_labels=5)
    ids, mask = padded_batch(SMALL["vocab_size"])
    tokens = MiniAlbertForTokenClassification(config).eval()
    out = tokens(ids, attention_mask=mask, labels=torch.randint(0, 5, ids.shape))
    assert out.logits.shape == (3, 9, 5) and out.loss.ndim == 0
    seqs = MiniAlbertForSequenceClassification(config).eval()
    out = seqs(ids, attention_mask=mask, labels=torch.tensor([0, 4, 2]))
    assert out.logits.shape == (3, 5) and torch.isfinite(out.loss)
    first = seqs.albert(ids, attention_mask=mask).last_hidden_state[:, 0]
    torch.testing.assert_close(out.logits, seqs.classifier(first))  # the first token, not the pooler


@pytest.mark.parametrize(
    "cls, head", [(MiniAlbertForMaskedLM, "vocab_"), (MiniAlbertForTokenClassification, "classifier")]
)
def test_adapters_only_freezes_exactly_the_body(cls, head):
    model = cls(MiniAlbertConfig(**SMALL, num_labels=3))
    model.train_adapters_only()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if "_adapters." in n or n.startswith(head)}
    assert trainable == expected and any("att_adapters.2." in n for n in trainable)
    bare = cls(MiniAlbertConfig(**SMALL, use_adapter=False, num_labels=3))
    assert not any("adapters" in n for n, _ in bare.named_parameters())
    bare.trainAdaptersOnly()  # the original's name; creates the adapters first
    assert bare.config.use_adapter and len(bare.base_model.mlp_adapters) == SMALL["num_hidden_layers"]
    assert {n for n, p in bare.named_parameters() if p.requires_grad} == expected


def test_published_parameter_counts():
    """shared/reference/minialbert.md, clinical-miniALBERT-312."""
    config = MiniAlbertConfig()  # the -312 defaults
    with torch.device("meta"):
        body, mlm = MiniAlbertModel(config), MiniAlbertForMaskedLM(config)

    def count(m):
        return sum(p.numel() for p in m.parameters())

    adapters = count(body.att_adapters) + count(body.mlp_adapters)
    assert (count(body), count(body) - count(body.albert.pooler), adapters) == (18_039_552, 17_448_960, 912_960)
    assert (count(mlm) - count(mlm.albert), count(mlm)) == (22_890_052, 40_929_604)


def test_engine_outputs_and_attention_scores_of_the_shared_layer():
    """encode() reads R hidden states and maps, and per-recursion scores from the ONE shared layer."""
    model = randomised(MiniAlbertForMaskedLM(MiniAlbertConfig(**SMALL)))
    ids, mask = padded_batch(SMALL["vocab_size"])
    rows = torch.tensor([0, 5, 10])
    out = encode(model, ids, mask, Needs(logits=True, hidden_states=True, attentions=True, scores=True), rows)
    assert len(out.hidden_states) == 4 and len(out.attentions) == len(out.scores) == 3
    full = model(ids, attention_mask=mask).logits.flatten(0, 1)[rows]
    torch.testing.assert_close(out.logits, full)
    valid = mask.bool()[:, None, None, :]
    for scores, probs in zip(out.scores, out.attentions):
        torch.testing.assert_close(torch.softmax(scores.masked_fill(~valid, -torch.inf), -1), probs)
    assert not torch.allclose(out.scores[0], out.scores[1])  # one module, three different calls


@pytest.mark.multirank
def test_distils_under_zero3_with_the_fused_adapters(tmp_path, monkeypatch):
    """The miniALBERT recipe (smoke) on 2 ranks, ZeRO-3, adapters through the Triton kernel (interpreter):
    the adapters read their children's weights directly, which ZeRO-3 must gather for them. Its attention terms
    read eager attention's maps here: BIODISTILL_KERNELS=triton would send them through the attention kernel
    under the interpreter too, minutes a step (tests/test_kernel_attention.py covers that kernel)."""
    import yaml
    from conftest import REPO, launch, summary

    raw = yaml.safe_load((REPO / "configs" / "clinical-minialbert-312.yaml").read_text())
    raw["train"]["output_dir"] = str(tmp_path / "run")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("BIODISTILL_KERNELS", "triton")
    # a step and a held-out batch cost seconds each under the interpreter: 3 steps, 2 held-out batches a rank
    short = "--train.max_steps 3 --train.eval_batches 2 --losses.attention_path maps".split()
    proc = launch(recipe, "--smoke", "--deepspeed.zero_stage", "3", *short)
    assert proc.returncode == 0
    s = summary(tmp_path / "run-smoke" / "run")
    assert s["job"]["zero_stage"] == 3 and s["after"]["loss/total"] < s["before"]["loss/total"]
    exported = AutoModelForMaskedLM.from_pretrained(tmp_path / "run-smoke" / "run" / "student")
    assert type(exported) is MiniAlbertForMaskedLM and exported.config.num_hidden_layers == 3
