"""Data: one tokenisation into a cache, BERT masking, deterministic sharding with a resumable position."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import minilm_dir
from transformers import AutoTokenizer

from biodistill.engine.config import ConfigError, DataConfig
from biodistill.engine.data.batches import MLMCollator, ShardedBatchSampler
from biodistill.engine.data.cache import cache_key, prepare


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_dir())


def prep(tokenizer, **kw):
    return prepare(DataConfig(**kw), tokenizer, "test.yaml", is_builder=True, barrier=lambda: None)


def test_tokenised_once_then_read_from_cache(tmp_path, tokenizer, tiny_corpus):
    kw = {"train_files": [str(tiny_corpus)], "cache_dir": str(tmp_path), "max_length": 64}
    splits, info = prep(tokenizer, **kw)
    assert not info["from_cache"] and info["documents"] == {"train": 152, "heldout": 8}
    assert all(len(x) == 64 for x in splits["train"]["input_ids"])  # packed into full blocks
    again, info2 = prep(tokenizer, **kw)
    assert info2["from_cache"] and again["train"]["input_ids"] == splits["train"]["input_ids"]
    assert not list(tmp_path.glob(".*tmp*"))  # no half-written cache left behind
    truncated, info3 = prep(tokenizer, **kw, packing=False)
    assert not info3["from_cache"] and info3["path"] != info["path"]
    ids = truncated["train"]["input_ids"]
    assert len(ids) == 152 and all(x[0] == tokenizer.cls_token_id and x[-1] == tokenizer.sep_token_id for x in ids)


def test_cache_key_covers_tokenizer_and_parameters(tmp_path, tokenizer, tiny_corpus):
    base = DataConfig(train_files=[str(tiny_corpus)], cache_dir=str(tmp_path))
    keys = {cache_key(base, tokenizer)}
    for change in [{"max_length": 256}, {"packing": False}, {"seed": 7}, {"heldout_fraction": 0.2}]:
        keys.add(cache_key(DataConfig(**{**base.__dict__, **change}), tokenizer))
    tokenizer2 = AutoTokenizer.from_pretrained(minilm_dir())
    tokenizer2.add_tokens(["hepatocellular"])
    keys.add(cache_key(base, tokenizer2))
    assert len(keys) == 6


def test_heldout_documents_are_not_trained_on(tmp_path, tokenizer, tiny_corpus):
    splits, _ = prep(tokenizer, train_files=[str(tiny_corpus)], cache_dir=str(tmp_path), packing=False, max_length=512)
    train = {tuple(x) for x in splits["train"]["input_ids"]}
    assert not train & {tuple(x) for x in splits["heldout"]["input_ids"]}


def test_bad_inputs_are_named(tmp_path, tokenizer, tiny_corpus):
    bad = tmp_path / "notes.docx"
    bad.write_text("a,b\n")
    with pytest.raises(ConfigError, match=r"notes.docx: unknown format") as e:
        prep(tokenizer, train_files=[str(bad)], cache_dir=str(tmp_path))
    assert e.value.key == "data.train_files[0]"
    with pytest.raises(ConfigError, match="no line has a string 'body' field; the first line has") as e:
        prep(tokenizer, train_files=[str(tiny_corpus)], cache_dir=str(tmp_path), text_field="body")
    assert e.value.key == "data.text_field"
    one = tmp_path / "one.txt"
    one.write_text("a single line\n\n")
    with pytest.raises(ConfigError, match="need at least 2"):
        prep(tokenizer, train_files=[str(one)], cache_dir=str(tmp_path))


def test_masking_is_bert_style_and_deterministic(tokenizer):
    collator = MLMCollator(tokenizer, 0.15, seed=3)
    ids = [tokenizer.cls_token_id] + list(range(2000, 2500)) + [tokenizer.sep_token_id]
    items = [(ids, 0, i) for i in range(40)]
    b = collator(items)
    targets = b["labels"] != -100
    assert 0.13 < targets.float().mean() < 0.17
    assert not targets[:, 0].any() and not targets[:, -1].any()  # [CLS]/[SEP] never masked
    replaced = b["input_ids"][targets]
    original = b["labels"][targets]
    frac_mask = (replaced == tokenizer.mask_token_id).float().mean()
    frac_same = (replaced == original).float().mean()
    assert 0.77 < frac_mask < 0.83 and 0.08 < frac_same < 0.12
    assert torch.equal(b["row_labels"], b["labels"].flatten()[b["rows"]])
    again = collator(items)
    assert torch.equal(again["input_ids"], b["input_ids"])  # a function of (seed, epoch, index)
    other_epoch = collator([(ids, 1, i) for i in range(40)])
    assert not torch.equal(other_epoch["input_ids"], b["input_ids"])
    padded = collator([(ids[:10], 0, 0), (ids, 0, 1)])
    assert padded["attention_mask"][0].sum() == 10 and (padded["labels"][0, 10:] == -100).all()


def test_sampler_shards_cover_each_epoch_once_and_resume_exactly():
    n, mb, world = 103, 4, 3
    samplers = [ShardedBatchSampler(n, mb, r, world, seed=5) for r in range(world)]
    per_epoch = samplers[0].per_epoch
    assert per_epoch == 103 // 12
    seen = [i for s in samplers for b in range(per_epoch) for _, i in s.batch(b)]
    assert len(seen) == len(set(seen)) == per_epoch * mb * world
    assert {e for _, b in [(0, samplers[0].batch(per_epoch))] for e, _ in b} == {1}  # next epoch
    it = iter(samplers[1])
    first = [next(it) for _ in range(per_epoch + 3)]
    resumed = iter(ShardedBatchSampler(n, mb, 1, world, seed=5, start=5))
    assert [next(resumed) for _ in range(per_epoch - 2)] == first[5:]
    with pytest.raises(ConfigError, match=r"5 sequences, fewer than one global batch \(8 = 4 x 2 ranks"):
        ShardedBatchSampler(5, 4, 0, 2, seed=0)


def step_samples(n: int, micro: int, world: int, accum: int, step: int, start: int = 0) -> list[tuple[int, int]]:
    """The sequences every rank reads in optimiser step ``step`` (counted from a sampler started at ``start``)."""
    samplers = [
        ShardedBatchSampler(n, micro, r, world, seed=9, start=start, global_batch=micro * world * accum)
        for r in range(world)
    ]
    return sorted(x for s in samplers for k in range(accum) for x in s.batch(start + step * accum + k))


def test_sample_order_is_the_same_on_any_world_size_with_the_same_global_batch():
    """4 ranks, 2 ranks x 2 accumulation, 1 rank x 4: each optimiser step reads the same 16 sequences,
    epochs end on the same step, and a 4-rank position resumed on 2 ranks reads what 4 would have."""
    n = 1000  # 62 steps of 16 per epoch; 8 left out each epoch
    for step in (0, 1, 61, 62, 63, 200):
        four = step_samples(n, 4, 4, 1, step)
        assert four == step_samples(n, 4, 2, 2, step) == step_samples(n, 4, 1, 4, step), step
        assert len(set(four)) == 16 and {e for e, _ in four} == {step // 62}
    epoch0 = [i for step in range(62) for _, i in step_samples(n, 4, 2, 2, step)]
    assert len(epoch0) == len(set(epoch0)) == 62 * 16
    consumed_samples = 10 * 16  # 10 steps of the 4-rank job
    assert step_samples(n, 4, 2, 2, 0, start=consumed_samples // (4 * 2)) == step_samples(n, 4, 4, 1, 10)
    with pytest.raises(ValueError, match="global batch 12 is not a multiple of 4 x 2 ranks"):
        ShardedBatchSampler(n, 4, 0, 2, seed=0, global_batch=12)


def test_summary_is_json(tmp_path, tokenizer, tiny_corpus):
    _, info = prep(tokenizer, train_files=[str(tiny_corpus)], cache_dir=str(tmp_path))
    assert json.loads((tmp_path / info["path"].split("/")[-1] / "meta.json").read_text())["tokens"]["train"] > 0
