"""make bench-quality's data preparation: BioBERT's NER folders cut to their first sentences, and their train
splits' words as the general distillation corpus (engine/bench/quality.py; the benchmark itself is hours)."""

from __future__ import annotations

import pytest

from biodistill.engine.bench.quality import corpus, subset
from biodistill.engine.config import TaskEntry
from biodistill.engine.evaluate.tasks import read_task

SENTENCES = [
    [("Mutations", "O"), ("in", "O"), ("BRCA1", "B"), ("gene", "I"), (".", "O")],
    [("Rats", "B"), ("were", "O"), ("treated", "O"), ("(", "O"), ("n", "O"), ("=", "O"), ("5", "O"), (")", "O")],
    [("No", "O"), ("effect", "O"), ("on", "O"), ("p53", "B"), (".", "O")],
]


def biobert_folder(root, dev_name="devel.tsv"):
    """A folder as dmis-lab distributes it: token<TAB>label lines, a blank line after each sentence."""
    root.mkdir()
    text = "".join("\n".join(f"{w}\t{t}" for w, t in s) + "\n\n" for s in SENTENCES)
    for name in ("train.tsv", dev_name, "test.tsv"):
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("dev_name", ["devel.tsv", "dev.tsv"])
def test_subset_keeps_the_first_sentences_of_each_split(tmp_path, dev_name):
    source = biobert_folder(tmp_path / "src", dev_name)
    counts = subset(source, tmp_path / "cut", train=2, test=1)
    assert counts == {"train": 2, "dev": 1, "test": 1}
    task = read_task(TaskEntry(name="cut", kind="ner", path=str(tmp_path / "cut")), "tasks[0]")
    assert [len(s.words) for s in task.splits["train"]] == [5, 8]
    assert task.splits["test"][0].words[2] == "BRCA1" and task.splits["test"][0].labels[2] == "B"
    assert subset(source, tmp_path / "whole", train=0, test=0) == {"train": 3, "dev": 3, "test": 3}


def test_subset_names_a_folder_without_its_split(tmp_path):
    source = biobert_folder(tmp_path / "src")
    (source / "test.tsv").unlink()
    with pytest.raises(SystemExit, match="src: no test.tsv"):
        subset(source, tmp_path / "cut", train=0, test=0)


def test_corpus_is_the_train_sentences_of_every_folder(tmp_path):
    a, b = biobert_folder(tmp_path / "a"), biobert_folder(tmp_path / "b")
    (b / "train.tsv").write_text("Hello\tO\nworld\tO\n")  # no blank line after the last sentence
    assert corpus([a, b], tmp_path / "corpus.txt") == 4
    lines = (tmp_path / "corpus.txt").read_text().splitlines()
    assert lines == ["Mutations in BRCA1 gene .", "Rats were treated ( n = 5 )", "No effect on p53 .", "Hello world"]
