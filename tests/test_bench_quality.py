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


def test_report_shows_each_seed_and_the_goals_verdicts(tmp_path, capsys):
    """The report's arithmetic, from an evaluation's results.json: mean ± std with each seed's F1, and the goals
    (distilled against undistilled, against the authors' method, the share of the gap to the teacher recovered)."""
    import argparse
    import json
    import statistics

    from biodistill.engine.bench.quality import report

    f1 = {  # two seeds a row; the gap from distilled (60) to the teacher (70) is 10 points
        "teacher": [0.69, 0.71], "undistilled": [0.61, 0.61], "distilled (ours)": [0.60, 0.60],
        "distilled (authors' method)": [0.59, 0.61], "task KL + CE": [0.66, 0.66], "task + hidden": [0.62, 0.62],
    }  # fmt: skip
    models = {
        name: {"tasks": {"s800": {"metric": "f1", "test_mean": statistics.mean(runs),
                                  "test_std": statistics.stdev(runs), "test_runs": [{"f1": x} for x in runs]}}}
        for name, runs in f1.items()
    }  # fmt: skip
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps({"models": models}))
    args = argparse.Namespace(seeds=[1, 2], epochs=3.0, task_epochs=9.0, lr=1e-4, max_length=64, steps=300)
    suite = {"models": [{"name": name} for name in f1]}
    report(tmp_path, suite, {"s800": {"train": 5733}}, {"general distillation": 600.0}, args, 4096)
    out = capsys.readouterr().out
    assert "| teacher | 70.0 ± 1.4 (69.0, 71.0) | 0.0 |" in out
    assert "| distilled (authors' method) | 60.0 ± 1.4 (59.0, 61.0) | 0.0 |" in out
    assert "fine-tuning 3 epochs, task distillation 9, lr 0.0001, batch 32, max_length 64" in out
    assert "general distillation 300 steps of 4,096 tokens (1.2M tokens)" in out
    assert "general distillation: 10.0 min" in out
    assert "s800: distilled - undistilled = -1.0 F1 (missed)" in out
    assert "s800: distilled (ours) - distilled (authors' method) = +0.0 F1" in out
    assert "s800: task KL + CE recovers 60% of the 10.0-point gap to the teacher (met: goal 50%)" in out
    assert "s800: task + hidden recovers 20% of the 10.0-point gap to the teacher (missed: goal 50%)" in out
