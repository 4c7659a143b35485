"""The shipped recipes: each parses, builds the published architecture at full size, keeps its structure
under --smoke, and runs end to end under a real 2-rank DeepSpeed launch with its loss falling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, csv_metric, matrix
from transformers import AutoConfig, AutoModel

from biodistill.engine.config import ConfigError, load_recipe
from biodistill.engine.distiller import Distiller
from biodistill.engine.losses import build_terms
from biodistill.engine.models.outputs import Needs, Outputs, hidden_size, num_heads, num_layers
from biodistill.engine.models.published import published_config
from biodistill.engine.models.smoke import smoke
from biodistill.engine.models.students import build_student, load_config, student_config

RECIPES = sorted((REPO / "configs").glob("*.yaml"))
PUBLISHED = [p for p in RECIPES if p.stem != "demo"]
ids = [p.stem for p in PUBLISHED]

# Base encoder (no MLM head, pooler included where the family has one), as the cards and papers give them.
# (millions, relative tolerance, shape: layers / hidden / heads / vocab, source)
BERT6, TINY4 = (6, 768, 12, 28996), (4, 312, 12, 28996)
PARAMS = {
    "distilbiobert": (65.8, 0.002, BERT6, "6-layer/768 BERT, cased vocab: about 65.8M"),
    "compactbiobert": (65.8, 0.002, BERT6, "as DistilBioBERT"),
    "distilclinicalbert": (65.8, 0.002, BERT6, "card: around 65 million; 65.8M as DistilBioBERT"),
    "tinybiobert": (13.9, 0.004, TINY4, "4-layer/312 BERT: about 13.9M (card: 15M)"),
    "tinyclinicalbert": (13.9, 0.004, TINY4, "as TinyBioBERT"),
    "biomobilebert": (24.6, 0.002, (24, 512, 4, 30522), "MobileBERT 24 layers without the pooler dense: 24.6M"),
    "clinicalmobilebert": (24.6, 0.002, (24, 512, 4, 30522), "as BioMobileBERT"),
    "biodistilbert": (65.0, 0.01, (6, 768, 12, 28996), "distilbert-base-cased: 65M"),
    "clinicaldistilbert": (65.0, 0.01, (6, 768, 12, 28996), "from BioDistilBERT"),
    "biotinybert": (14.5, 0.015, (4, 312, 12, 30522), "TinyBERT-4 (general, uncased): 14.5M"),
    "clinical-minialbert-312": (18.039552, 1e-9, (6, 768, 12, 28996), "body with pooler: 18,039,552"),
    # The -312 body with 128-wide embeddings: (vocab + positions + 2 types + LN) x 184 fewer embedding
    # columns, and 184 fewer projector inputs.
    "clinical-minialbert-128": (
        (18_039_552 - (28996 + 512 + 2 + 2) * 184 - 768 * 184) / 1e6,
        1e-9,
        (6, 768, 12, 28996),
        "the -312 count less 184 embedding columns",
    ),
    # Not published models: the example recipes of the modern families.
    "bioclinical-modernbert-6l": (68.773632, 1e-9, (6, 768, 12, 50368), "6 of ModernBERT-base's 22 layers"),
    "deberta-v3-6l": (141.30432, 1e-9, (6, 768, 12, 128100), "6 of DeBERTa-v3-base's 12 layers"),
    # MiniLMv2's relation distillation: MiniLM-L6-H384's shape on BioBERT's cased vocabulary, 22,127,232 by hand:
    # embeddings (28,996 + 512 + 2) x 384 + LN, 6 x 1,774,464 a layer, the pooler 384 x 385.
    "biominilm-l6-h384": (22.127232, 1e-9, (6, 384, 12, 28996), "6-layer / 384 BERT, cased vocab"),
}


def full_size(recipe):
    teacher = load_config(recipe.teacher.path, recipe, "teacher.path") if recipe.teacher.path else None
    return student_config(recipe, teacher), teacher


def test_every_published_model_has_a_recipe():
    assert set(ids) == set(PARAMS)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_parses_and_its_terms_fit_the_full_size_models(path):
    recipe = load_recipe(path, check_paths=path.stem == "demo")  # the corpora are the user's; demo ships its own
    student, teacher = full_size(recipe)
    build_terms(recipe.losses, student, teacher, str(path))  # layer maps, widths, heads, vocabularies
    for name in (recipe.teacher.path, recipe.student.path):
        assert not name or name.startswith("pkg://") or published_config(name) is not None, name


def test_a_missing_corpus_is_named_with_its_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_recipe(REPO / "configs" / "distilbiobert.yaml")
    assert e.value.key == "data.train_files[0]" and "no file matches 'data/pubmed/pubmed25n*.xml.gz'" in str(e.value)


@pytest.mark.parametrize("path", PUBLISHED, ids=ids)
def test_full_size_student_has_the_published_architecture(path):
    recipe = load_recipe(path, check_paths=False)
    millions, tolerance, (layers, width, heads, vocab), source = PARAMS[path.stem]
    config, teacher_config = full_size(recipe)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
        if recipe.student.init != "checkpoint":  # the real builder, at full size, copying onto meta tensors
            teacher = AutoModel.from_config(teacher_config)
            built = set(build_student(recipe, Needs(), teacher).base_model.state_dict())
            assert built <= set(model.state_dict()) and all(
                k.startswith("pooler.") for k in model.state_dict() if k not in built
            )
    family = {
        "bert": "BertModel",
        "distilbert": "DistilBertModel",
        "mobilebert": "MobileBertModel",
        "minialbert": "MiniAlbertModel",
        "modernbert": "ModernBertModel",
        "deberta-v2": "DebertaV2Model",
    }
    assert type(model).__name__ == family[config.model_type]  # transformers' own classes
    assert (num_layers(config), hidden_size(config), num_heads(config), config.vocab_size) == (
        layers,
        width,
        heads,
        vocab,
    )
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert count == pytest.approx(millions, rel=tolerance), f"{count:.3f}M vs {millions}M ({source})"


@pytest.mark.parametrize("path", PUBLISHED, ids=ids)
def test_smoke_shrinks_sizes_and_keeps_structure(path, tmp_path):
    recipe = load_recipe(path, check_paths=False, overrides=["--train.output_dir", str(tmp_path / "run")])
    small = smoke(recipe)
    assert [(t.kind, t.weight, t.temperature, t.projection) for t in small.losses.terms] == [
        (t.kind, t.weight, t.temperature, t.projection) for t in recipe.losses.terms
    ]
    assert small.student.init == recipe.student.init and small.losses.temperature == recipe.losses.temperature
    assert (small.optim.lr, small.optim.weight_decay, small.deepspeed.zero_stage) == (
        recipe.optim.lr,
        recipe.optim.weight_decay,
        recipe.deepspeed.zero_stage,
    )
    big_student, big_teacher = full_size(recipe)
    small_student, small_teacher = full_size(small)
    pairs = [(big_student, small_student)] + ([(big_teacher, small_teacher)] if big_teacher else [])
    for big, little in pairs:
        assert little.model_type == big.model_type and num_heads(little) == num_heads(big)
        assert num_layers(little) == num_layers(big) // 2 and hidden_size(little) <= hidden_size(big) // 12
    if recipe.student.init == "teacher_layers":  # the same rule (2i or 2i+1), on the first half
        assert small.student.teacher_layers == recipe.student.teacher_layers[: len(recipe.student.teacher_layers) // 2]
    for big_term, little_term in zip(recipe.losses.terms, small.losses.terms):
        if isinstance(big_term.layer_map, str):
            assert little_term.layer_map == big_term.layer_map
        else:  # "3, 6, 9, 12" becomes "3, 6": the same pairs, those that fit
            assert little_term.layer_map == big_term.layer_map[: len(little_term.layer_map)]
            assert len(little_term.layer_map) == len(big_term.layer_map) // 2 + (big_term.layer_map[0][0] == 0)
    build_terms(small.losses, small_student, small_teacher, "smoke")
    assert small.data.train_files and small.train.max_steps == 10
    written = [small.train.output_dir, small.data.cache_dir, small.teacher.path, small.student.path]
    assert all(str(tmp_path) in p for p in written if p)  # everything it builds lies beside the run


def test_distilbiobert_loss_is_the_published_formula():
    """2 x MLM + 5 x T^2 KL(teacher || student) at T=2 over the masked rows + 1 x (1 - cos) of the last
    hidden states over non-pad tokens, on fixed tensors at full width and vocabulary."""
    recipe = load_recipe(REPO / "configs" / "distilbiobert.yaml", check_paths=False)
    student_cfg, teacher_cfg = full_size(recipe)
    terms = build_terms(recipe.losses, student_cfg, teacher_cfg, recipe.source)
    model = Distiller(torch.nn.Identity(), terms, [t.weight for t in recipe.losses.terms])

    g = torch.Generator().manual_seed(7)
    B, T, H, V = 2, 12, 768, 28996
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 9:] = 0
    labels = torch.full((B, T), -100)
    labels[0, 3], labels[0, 8], labels[1, 2], labels[1, 5] = 101, 2002, 17, 28000
    rows = (labels != -100).flatten().nonzero().squeeze(1)
    batch = {"attention_mask": mask, "rows": rows, "row_labels": labels.flatten()[rows]}
    s_logits, t_logits = torch.randn(len(rows), V, generator=g) * 4, torch.randn(len(rows), V, generator=g) * 4
    s_hidden = tuple(torch.randn(B, T, H, generator=g) for _ in range(7))  # embeddings + 6 layers
    t_hidden = tuple(torch.randn(B, T, H, generator=g) for _ in range(13))
    loss, _ = model.combine(
        Outputs(hidden_states=s_hidden, logits=s_logits), Outputs(hidden_states=t_hidden, logits=t_logits), batch
    )

    s64, t64 = s_logits.double(), t_logits.double()
    mlm = -torch.log_softmax(s64, -1)[torch.arange(len(rows)), labels.flatten()[rows]].mean()
    p, log_q = torch.softmax(t64 / 2, -1), torch.log_softmax(s64 / 2, -1)
    kl = 4 * (p * (p.log() - log_q)).sum(-1).mean()
    keep = mask.bool()
    cosine = (1 - F.cosine_similarity(s_hidden[6][keep].double(), t_hidden[12][keep].double(), dim=-1)).mean()
    expected = 2 * mlm + 5 * kl + 1 * cosine
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert kl.item() > 1 and cosine.item() > 0.5  # every term contributes; none is trivially zero


# ------------------------------------------------------------------------------------- multirank


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Every published recipe's smoke version, trained in turn by one real 2-rank DeepSpeed job
    (tests/jobs/matrix.py: the entry point's start-up checks, then the Trainer, per recipe): one launch
    instead of one per recipe, each of which cost ~17 s of imports and start-up here."""
    tmp = tmp_path_factory.mktemp("recipes")
    return matrix(None, tmp / "out.json", {p.stem: ["--config", str(p), "--smoke"] for p in PUBLISHED})


@pytest.mark.multirank
@pytest.mark.parametrize("path", PUBLISHED, ids=ids)
def test_recipe_smoke_runs_on_two_ranks(path, smoke_runs):
    s = smoke_runs[path.stem]
    run = Path(s["output_dir"])
    assert s["job"]["world_size"] == 2 and s["steps"] == 10
    assert s["after"]["loss/total"] < s["before"]["loss/total"]  # the same held-out batches, before and after
    assert sorted(csv_metric(run, "train_loss")) == list(range(1, 11))
    family = full_size(load_recipe(path, check_paths=False))[0].model_type
    assert AutoConfig.from_pretrained(run / "student").model_type == family


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_passes_its_terms_own_checks(path):
    """Kinds and term options are checked by the term classes (losses.validate_terms), not by config.py."""
    from biodistill.engine.config import load_recipe
    from biodistill.engine.losses import validate_terms

    validate_terms(load_recipe(path, check_paths=False))
