"""Streaming mode: each rank's shard read and tokenised on the fly, every training document once per
epoch across the ranks, and a position that resumes exactly (in-process, and in a real 2-rank job)."""

from __future__ import annotations

import copy
import shutil

import pytest
from conftest import csv_metric, launch, minilm_dir, recipe_dict, write_recipe
from test_corpora import ABSTRACTS, NOTE_HEADER, note
from transformers import AutoTokenizer

from biodistill.engine.config import ConfigError, DataConfig
from biodistill.engine.data.batches import MLMCollator
from biodistill.engine.data.stream import DocumentStream, StreamBatches, heldout_stream_batches
from biodistill.engine.data.tokenise import doc_hash


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_dir())


def corpus(tmp_path, files: int, per_file: int = 30):
    """``files`` jsonl files of distinct documents (document i says its number)."""
    paths = []
    for f in range(files):
        path = tmp_path / f"part{f}.jsonl"
        lines = [
            f'{{"text": "document {f * per_file + i} {ABSTRACTS[i % 5]} {ABSTRACTS[(i + f) % 5] * (i % 4)}"}}'
            for i in range(per_file)
        ]
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths


def number(tokenizer, seq) -> int:
    return int(tokenizer.decode(seq[1:4]).split()[1])


@pytest.mark.parametrize("files", [1, 3], ids=["documents-round-robin", "whole-files"])
def test_every_training_document_once_per_epoch(tmp_path, tokenizer, files):
    paths = corpus(tmp_path, files)
    data = DataConfig(train_files=[str(p) for p in paths], max_length=48, packing=False, heldout_fraction=0.2)
    seen = []
    for rank in range(2):
        stream = DocumentStream(data, tokenizer, "r.yaml", rank, 2)
        it = iter(stream)
        while True:
            seq = next(it)
            if stream.position["epoch"] > 0:
                break
            seen.append(number(tokenizer, seq))
    keys = [(p.name, n) for p in paths for n in range(1, 31)]
    train = sorted(i for i, key in enumerate(keys) if doc_hash(f"{key[0]}:{key[1]}", data.seed) >= 0.2)
    assert sorted(seen) == train and 0 < len(train) < len(keys)  # once each, held-out ones never


def test_stream_position_resumes_exactly(tmp_path, tokenizer):
    """Packing (the carry crosses documents and files), stopped at several points, epochs included."""
    paths = corpus(tmp_path, 2, per_file=12)
    data = DataConfig(train_files=[str(p) for p in paths], max_length=40, packing=True, heldout_fraction=0.1)
    collator = MLMCollator(tokenizer, 0.15, seed=1)
    reference = StreamBatches(DocumentStream(data, tokenizer, "r.yaml", 1, 2), collator, 3)
    states, expected = [], []
    for _ in range(40):
        states.append(copy.deepcopy(reference.state()))
        expected.append(next(reference)["input_ids"].tolist())
    assert reference.state()["epoch"] >= 2  # the stops cover file and epoch boundaries
    for stop in (1, 5, 11, 23, 37):
        stream = DocumentStream(data, tokenizer, "r.yaml", 1, 2)
        stream.load_state(copy.deepcopy(states[stop]))
        resumed = StreamBatches(stream, collator, 3)
        assert [next(resumed)["input_ids"].tolist() for _ in range(3)] == expected[stop : stop + 3]
    with pytest.raises(ConfigError, match="a stream resumes only on the same world size"):
        DocumentStream(data, tokenizer, "r.yaml", 0, 4).load_state(states[3])


def test_held_out_batches_and_empty_shards(tmp_path, tokenizer):
    paths = corpus(tmp_path, 1)
    data = DataConfig(train_files=[str(paths[0])], max_length=48, packing=False, heldout_fraction=0.3)
    collator = MLMCollator(tokenizer, 0.15, seed=1)
    batches = [heldout_stream_batches(data, tokenizer, "r.yaml", collator, 2, rank, 2, 3) for rank in range(2)]
    assert len(batches[0]) == len(batches[1]) > 0
    held = {number(tokenizer, s) for mine in batches for b in mine for s in b["input_ids"].tolist()}
    assert all(doc_hash(f"part0.jsonl:{n + 1}", data.seed) < 0.3 for n in held)
    notes = tmp_path / "NOTEEVENTS.csv"
    notes.write_text(NOTE_HEADER + note(1, "Radiology", "CT: normal."))  # one note: rank 1 gets none
    empty = DataConfig(train_files=[str(notes)], max_length=48, heldout_fraction=0.1)
    with pytest.raises(ConfigError, match="rank 1's share of the files .* gives no training sequence"):
        next(iter(DocumentStream(empty, tokenizer, "r.yaml", 1, 2)))


@pytest.mark.multirank
def test_streamed_job_resumes_exactly(tmp_path, tiny_teacher, tiny_corpus):
    """A real 2-rank job streaming the corpus, checkpoint at step 3; resumed, steps 4..6 match."""
    recipe = recipe_dict(
        tiny_teacher, tiny_corpus, tmp_path, [{"kind": "mlm"}, {"kind": "logit_kl"}],
        data={"streaming": True, "packing": True}, train={"max_steps": 6, "save_every": 3, "export": False},
    )  # fmt: skip
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert launch(path).returncode == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run" / "checkpoints", resumed / "checkpoints")
    shutil.rmtree(resumed / "checkpoints" / "step6")
    (resumed / "checkpoints" / "latest").write_text("step3")
    proc = launch(path, "--resume", "--train.output_dir", str(resumed))
    assert proc.returncode == 0 and "resumed from" in proc.stdout + proc.stderr
    full, after = csv_metric(tmp_path / "run", "train_loss"), csv_metric(resumed, "train_loss")
    assert sorted(after) == [4, 5, 6]
    assert [after[s] for s in after] == pytest.approx([full[s] for s in after], rel=1e-6, abs=1e-7)
    assert not (tmp_path / "cache").exists()  # streamed: nothing cached
