"""Downstream evaluation (biodistill-evaluate): the metrics against independent computations on fixed
predictions, every reader on realistic small files and every bad input, real CPU fine-tunes, adapters-only
fine-tuning, and a grid killed mid-cell that resumes without rerunning its finished cells."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, make_bert, minilm_dir
from seqeval.metrics import f1_score, precision_score, recall_score
from transformers import AutoModel, AutoModelForTokenClassification, AutoTokenizer

from biodistill.engine.config import ConfigError
from biodistill.engine.evaluate import metrics
from biodistill.engine.evaluate.finetune import Cell, build_model, ner_features, qa_candidates, run_cell
from biodistill.engine.evaluate.grid import check_models, same_models
from biodistill.engine.evaluate.suite import Protocol, TaskEntry, load_suite
from biodistill.engine.evaluate.tasks import Question, read_task

SAMPLE_NER = REPO / "engine" / "assets" / "eval" / "ner"
SAMPLE_TRIAGE = REPO / "engine" / "assets" / "eval" / "triage"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ metrics


def test_ner_scores_are_seqevals_and_plain_bio_labels_score_as_one_type():
    gold = [["B-Disease", "I-Disease", "O", "B-Chemical"], ["O", "B-Chemical", "I-Chemical", "O", "B-Disease"]]
    pred = [["B-Disease", "I-Disease", "O", "B-Disease"], ["O", "B-Chemical", "O", "O", "B-Disease"]]
    s = metrics.ner_scores(gold, pred)
    # seqeval's own functions, and by hand: 4 gold entities, 4 predicted, 2 exact (span and type) matches.
    assert (s["precision"], s["recall"], s["f1"]) == pytest.approx(
        (precision_score(gold, pred), recall_score(gold, pred), f1_score(gold, pred))
    )
    assert (s["precision"], s["recall"], s["f1"]) == pytest.approx((2 / 4, 2 / 4, 0.5))
    assert s["per_type"]["Chemical"]["f1"] == 0 and s["per_type"]["Disease"]["precision"] == pytest.approx(2 / 3)
    ncbi = metrics.ner_scores([["O", "B", "I", "O", "B"]], [["O", "B", "I", "O", "O"]])  # NCBI-disease's B / I / O
    assert (ncbi["precision"], ncbi["recall"]) == (1.0, 0.5) and set(ncbi["per_type"]) == {"entity"}


def test_classification_and_relation_scores_by_hand():
    gold, pred = ["a", "a", "b", "c", "c", "c"], ["a", "b", "b", "c", "c", "a"]
    s = metrics.classification_scores(gold, pred)
    # per class F1: a 1/2 (P 1/2, R 1/2), b 2/3 (P 1/2, R 1), c 4/5 (P 1, R 2/3)
    assert s == pytest.approx({"accuracy": 4 / 6, "macro_f1": (1 / 2 + 2 / 3 + 4 / 5) / 3, "micro_f1": 4 / 6})
    # GAD-style binary: F1 of the positive class "1": TP 2, FP 1, FN 1
    binary = metrics.relation_scores(["1", "1", "1", "0", "0"], ["1", "1", "0", "1", "0"], ["0", "1"], "0")
    assert (binary["precision"], binary["recall"], binary["f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    # ChemProt-style: micro over CPR:3 and CPR:4, "false" excluded: TP 2, FP 2 (one CPR:4 for CPR:3, one
    # CPR:3 for false), FN 2 (the CPR:3 taken for CPR:4, the CPR:4 taken for false)
    gold = ["CPR:3", "CPR:3", "CPR:4", "CPR:4", "false", "false"]
    pred = ["CPR:3", "CPR:4", "CPR:4", "false", "CPR:3", "false"]
    multi = metrics.relation_scores(gold, pred, ["CPR:3", "CPR:4", "false"], "false")
    assert (multi["precision"], multi["recall"], multi["f1"]) == pytest.approx((0.5, 0.5, 0.5))


def test_bioasq_factoid_measures_on_a_hand_worked_example():
    gold = {
        "q1": [["BRCA1", "breast cancer 1"]],  # right first, in another case: strict, lenient, RR 1
        "q2": [["imatinib"], ["gleevec"]],  # right third (a synonym of the second answer): RR 1/3
        "q3": [["TP53"]],  # five wrong candidates: 0
        "q4": [["insulin"]],  # no candidates at all: 0
    }
    candidates = {
        "q1": ["brca1", "BRCA2"],
        "q2": ["nilotinib", "dasatinib", "Gleevec", "imatinib"],
        "q3": ["MDM2", "ATM", "CHEK2", "PTEN", "RB1", "TP53"],  # TP53 is sixth: BioASQ reads five
    }
    s = metrics.bioasq_factoid(candidates, gold)
    assert s == pytest.approx(
        {"strict_accuracy": 1 / 4, "lenient_accuracy": 2 / 4, "mrr": (1 + 1 / 3) / 4, "questions": 4}
    )


def test_qa_candidates_merge_snippets_of_one_bioasq_question_best_first():
    """Two snippet-questions (SQuAD ids 5f3_001, 5f3_002) of BioASQ question 5f3: their spans are pooled,
    compared case-insensitively (the best score of a repeated answer kept), and ranked by score."""
    questions = [
        Question("5f3_001", "q?", "Imatinib inhibits BCR-ABL.", [], "x"),
        Question("5f3_002", "q?", "Treatment with imatinib or dasatinib.", [], "y"),
    ]
    offsets = [[None, (0, 8), (9, 17), (18, 25)], [None, (0, 9), (10, 14), (15, 23), (24, 26), (27, 36)]]
    start = [np.array([0, 5.0, 0, 1.0]), np.array([0, 0, 0, 6.0, 0, 4.0])]
    end = [np.array([0, 5.0, 0, 1.0]), np.array([0, 0, 0, 6.0, 0, 4.0])]
    found = qa_candidates(questions, [0, 1], offsets, start, end)
    ranked = [text for text, _ in found["5f3"]]
    assert ranked[:3] == ["imatinib", "imatinib or dasatinib", "dasatinib"]
    assert len(ranked) == 5 and len({r.lower() for r in ranked}) == 5
    assert found["5f3"][0][1] == 12.0  # the second snippet's "imatinib" beats the first's "Imatinib" (10)


# ------------------------------------------------------------------------------------------ readers


def ner_task(path, **fields) -> TaskEntry:
    return TaskEntry(name="t", kind="ner", path=str(path), **fields)


def test_biobert_ner_folder_as_distributed(tmp_path):
    """NCBI-disease's layout: train.tsv, train_dev.tsv (train + devel), test.tsv; dev is train_dev less train."""
    train = "Identification\tO\nof\tO\nAPC2\tO\n,\tO\na\tO\nhomologue\tO\nof\tO\nthe\tO\nadenomatous\tB\npolyposis\tI\ncoli\tI\ntumour\tI\nsuppressor\tO\n.\tO\n"  # fmt: skip
    devel = "Hereditary\tB\nbreast\tI\ncancer\tI\nis\tO\nrare\tO\n.\tO\n"
    write(tmp_path / "train.tsv", train)
    write(tmp_path / "train_dev.tsv", train + "\n" + devel)
    write(tmp_path / "test.tsv", "Ataxia\tB\n-\tI\ntelangiectasia\tI\n.\tO\n\n")
    data = read_task(ner_task(tmp_path), "tasks[0]")
    assert [s.words[:3] for s in data.splits["dev"]] == [["Hereditary", "breast", "cancer"]]
    assert data.splits["train"][0].labels[8:12] == ["B", "I", "I", "I"] and data.labels == ["O", "B", "I"]
    assert data.splits["test"][0].where == f"{tmp_path / 'test.tsv'}:1"


def test_biobert_ner_folder_with_all_four_files_needs_no_dev_key(tmp_path, capsys):
    """BC5CDR, BC2GM, JNLPBA as BioBERT distributes them: train, devel, train_dev (= train + devel), test. One dev
    split, devel.tsv; a train_dev.tsv that, less train, disagrees with it is said (a folder mixing releases)."""
    train, devel = "Aspirin\tB\nhelps\tO\n\n", "Cisplatin\tB\nhurts\tO\n\n"
    for name, text in {
        "train.tsv": train,
        "devel.tsv": devel,
        "train_dev.tsv": train + devel,
        "test.tsv": devel,
    }.items():
        write(tmp_path / name, text)
    data = read_task(ner_task(tmp_path), "tasks[0]")
    assert data.files["dev"] == str(tmp_path / "devel.tsv") and [s.words for s in data.splits["dev"]] == [["Cisplatin", "hurts"]]  # fmt: skip
    assert capsys.readouterr().err == ""
    write(tmp_path / "train_dev.tsv", train + devel + "Ibuprofen\tB\n\n")
    read_task(ner_task(tmp_path), "tasks[0]")
    assert capsys.readouterr().err.strip() == (
        f"[eval] note: {tmp_path / 'devel.tsv'} is the dev split; train_dev.tsv beside it, less train, holds 2 "
        "sentences against its 1: they disagree, and the authors' script reads the latter"
    )


def test_labels_are_stripped_and_a_bom_is_not_a_column_name(tmp_path):
    d = tmp_path / "ner"
    for split in ("train", "devel", "test"):
        write(d / f"{split}.tsv", "not\tO \nsepsis\tB-Disease\r\n\n")
    data = read_task(ner_task(d), "tasks[0]")
    assert data.labels == ["O", "B-Disease"] and data.splits["train"][0].words == ["not", "sepsis"]
    d = tmp_path / "csv"
    for split in ("train", "dev", "test"):  # Excel's csv: a byte-order mark before the header
        (d / f"{split}.csv").parent.mkdir(parents=True, exist_ok=True)
        (d / f"{split}.csv").write_bytes("text,label\nchest pain,cardio \n".encode("utf-8-sig"))
    data = read_task(TaskEntry(name="c", kind="classification", path=str(d)), "tasks[1]")
    assert data.labels == ["cardio"] and data.splits["test"][0].text == "chest pain"


def test_field_types_are_checked_by_file_line_and_field(tmp_path):
    def jsonl_task(kind: str, rows: dict[str, list[dict]], **fields) -> ConfigError:
        d = tmp_path / kind
        for split, lines in rows.items():
            write(d / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
        return bad(TaskEntry(name="t", kind=kind, path=str(d), **fields))

    ok = {"tokens": ["Aspirin"], "ner_tags": ["B-Chemical"]}
    e = jsonl_task("ner", {"train": [ok], "dev": [ok], "test": [ok, {"tokens": "abc", "ner_tags": ["O"] * 3}]})
    assert (e.source, e.key, e.message) == (f"{tmp_path / 'ner' / 'test.jsonl'}:2", "tokens", "expected a list of strings, got str 'abc'")  # fmt: skip
    ok = {"text": "chest pain", "label": "cardio"}
    e = jsonl_task("classification", {"train": [ok, {"text": "fever", "label": None}], "dev": [ok], "test": [ok]})
    assert (e.source, e.key, e.message) == (f"{tmp_path / 'classification' / 'train.jsonl'}:2", "label", "None is not a label: a string or an integer id")  # fmt: skip
    e = jsonl_task("classification", {"train": [ok], "dev": [{"text": None, "label": "cardio"}], "test": [ok]})
    assert (e.key, e.message) == ("text", "expected a string, got NoneType 'None'")
    # QA: a boolean answer_start (JSON's true passed as offset 1), a "data" that is not a list
    d = tmp_path / "qa"
    context = "Imatinib inhibits BCR-ABL."
    squad = {"data": [{"paragraphs": [{"context": context, "qas": [
        {"id": "5f3_001", "question": "Which target?", "answers": [{"text": "matinib", "answer_start": True}]}]}]}]}  # fmt: skip
    write(d / "train.json", json.dumps(squad))
    write(d / "test.json", json.dumps(squad))
    gold = write(d / "gold.json", json.dumps({"questions": [{"id": "5f3", "type": "factoid", "exact_answer": [["imatinib"]]}]}))  # fmt: skip
    qa = TaskEntry(name="qa", kind="qa", path=str(d), gold=str(gold))
    e = bad(qa)
    assert (e.key, e.message) == ("answers[0].answer_start", "True does not point at the answer 'matinib' in its context (it reads None)")  # fmt: skip
    write(d / "train.json", json.dumps({"data": {"paragraphs": []}}))
    e = bad(qa)
    assert (e.source, e.key, e.message) == (str(d / "train.json"), "data", "expected a list, got dict \"{'paragraphs': []}\"")  # fmt: skip


def test_bioasq_gold_must_be_the_test_sets(tmp_path):
    d = tmp_path / "qa"
    qas = [{"id": f"5f3_00{i}", "question": "Which drug?", "answers": [{"text": "Imatinib", "answer_start": 0}]} for i in range(3)]  # fmt: skip
    squad = {"data": [{"paragraphs": [{"context": "Imatinib inhibits BCR-ABL.", "qas": qas}]}]}
    write(d / "train.json", json.dumps(squad))
    write(d / "test.json", json.dumps(squad))
    gold = d / "gold.json"
    qa = TaskEntry(name="qa", kind="qa", path=str(d), gold=str(gold))
    write(gold, json.dumps({"questions": [{"id": "6a1", "type": "factoid", "exact_answer": [["x"]]}]}))
    e = bad(qa)
    assert (e.source, e.key, e.message) == (str(gold), "tasks[2].gold", "holds none of the test set's 1 question ids (e.g. '5f3'): is it the golden file of another batch?")  # fmt: skip
    write(gold, json.dumps({"questions": [{"type": "factoid", "exact_answer": [["x"]]}]}))
    e = bad(qa)
    assert (e.source, e.key, e.message) == (f"{gold}: questions[0]", "id", "missing (the entry has type, exact_answer)")
    write(gold, json.dumps({"questions": [{"id": "5f3", "type": "list", "exact_answer": [["x"]]}]}))
    e = bad(qa)
    assert e.message == "no factoid question with an exact_answer: nothing to score the test set on"


def test_conll_columns_skip_docstart_and_take_the_last_column(tmp_path):
    write(tmp_path / "train.txt", "-DOCSTART- -X- O O\n\nAspirin NN B-NP B-Chemical\nhelps VBZ B-VP O\n\n")
    write(tmp_path / "dev.txt", "Aspirin NN B-NP B-Chemical\n")
    write(tmp_path / "test.txt", "helps VBZ B-VP O\n")
    data = read_task(ner_task(tmp_path), "tasks[0]")
    assert [(s.words, s.labels) for s in data.splits["train"]] == [(["Aspirin", "helps"], ["B-Chemical", "O"])]


def bad(task: TaskEntry) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        read_task(task, "tasks[2]")
    return e.value


def test_every_bad_input_is_named_by_file_line_and_field(tmp_path):
    ok = "Aspirin\tB-Chemical\nhelps\tO\n\n"
    # a TSV line with the wrong column count
    d = tmp_path / "cols"
    write(d / "train.tsv", ok + "aspirin\tB-Chemical\textra\n")
    write(d / "devel.tsv", ok)
    write(d / "test.tsv", ok)
    e = bad(ner_task(d))
    assert (e.source, e.key) == (f"{d / 'train.tsv'}:4", "columns")
    assert e.message == "3 column(s), expected token<TAB>label: 'aspirin\\tB-Chemical\\textra'"
    # a dev / test label absent from train
    d = tmp_path / "labels"
    write(d / "train.tsv", ok)
    write(d / "devel.tsv", ok)
    write(d / "test.tsv", "Cisplatin\tB-Drug\n")
    e = bad(ner_task(d))
    assert (e.source, e.key) == (f"{d / 'test.tsv'}:1", "label")
    assert e.message == "'B-Drug' is not in the train split's labels (B-Chemical, O)"
    # an empty split
    d = tmp_path / "empty"
    write(d / "train.tsv", ok)
    write(d / "devel.tsv", "\n\n")
    write(d / "test.tsv", ok)
    e = bad(ner_task(d))
    assert (e.source, e.key, e.message) == (str(d / "devel.tsv"), "tasks[2].dev", "the dev split is empty")
    # token / label count mismatch
    d = tmp_path / "counts"
    row = {"tokens": ["Aspirin", "helps"], "ner_tags": ["B-Chemical", "O"]}
    for split in ("train", "dev"):
        write(d / f"{split}.jsonl", json.dumps(row) + "\n")
    write(d / "test.jsonl", json.dumps(row) + "\n" + json.dumps({"tokens": ["a", "b"], "ner_tags": ["O"]}) + "\n")
    e = bad(ner_task(d))
    assert (e.source, e.key, e.message) == (f"{d / 'test.jsonl'}:2", "ner_tags", "1 labels for 2 tokens")
    # integer tags, as a Hugging Face dataset's to_json writes a ClassLabel column: named by label_names
    for split in ("train", "dev", "test"):
        write(d / f"{split}.jsonl", json.dumps({"tokens": ["Aspirin", "helps"], "ner_tags": [1, 0]}) + "\n")
    e = bad(ner_task(d))
    assert (e.source, e.key) == (f"{d / 'train.jsonl'}:1", "ner_tags") and "give the names of the ids" in e.message
    assert read_task(ner_task(d, label_names=["O", "B-Chemical"]), "t").splits["test"][0].labels == ["B-Chemical", "O"]
    e = bad(ner_task(d, label_names=["O"]))
    assert e.message == "label id 1 is outside label_names (1 names)"
    # a QA answer_start that does not point at its answer
    d = tmp_path / "qa"
    squad = {"data": [{"paragraphs": [{"context": "Imatinib inhibits BCR-ABL.", "qas": [
        {"id": "5f3_001", "question": "Which drug?", "answers": [{"text": "Imatinib", "answer_start": 0}]},
        {"id": "5f3_002", "question": "Which target?", "answers": [{"text": "BCR-ABL", "answer_start": 17}]},
    ]}]}]}  # fmt: skip
    write(d / "train.json", json.dumps(squad))
    write(d / "test.json", json.dumps(squad))
    write(
        d / "gold.json", json.dumps({"questions": [{"id": "5f3", "type": "factoid", "exact_answer": [["imatinib"]]}]})
    )
    e = bad(TaskEntry(name="qa", kind="qa", path=str(d), gold=str(d / "gold.json")))
    assert (e.source, e.key) == (f"{d / 'train.json'}: question 5f3_002", "answers[0].answer_start")
    assert e.message == "17 does not point at the answer 'BCR-ABL' in its context (it reads ' BCR-AB')"
    # classification: a missing column, and a row with the wrong number of fields
    d = tmp_path / "csv"
    write(d / "train.csv", "sentence,label\nchest pain,cardio\n")
    write(d / "dev.csv", "sentence,label\nchest pain,cardio\n")
    write(d / "test.csv", "sentence,label\nchest pain,cardio,extra\n")
    e = bad(TaskEntry(name="c", kind="classification", path=str(d)))
    assert (e.source, e.key) == (f"{d / 'train.csv'}:1", "text") and "the header has sentence, label" in e.message
    e = bad(TaskEntry(name="c", kind="classification", path=str(d), text_field="sentence"))
    assert (e.source, e.key, e.message) == (f"{d / 'test.csv'}:2", "columns", "3 columns, the header has 2")


def test_mednli_and_biobert_re_as_distributed(tmp_path):
    row = {"sentence1": "Labs were notable for Cr 1.7.", "sentence2": "Patient has elevated Cr",
           "gold_label": "entailment", "pairID": "x", "sentence1_parse": "(ROOT ...)"}  # fmt: skip
    for split in ("train", "dev", "test"):
        write(tmp_path / "mednli" / f"mli_{split}_v1.jsonl", json.dumps(row) + "\n")
    data = read_task(TaskEntry(name="m", kind="classification", path=str(tmp_path / "mednli")), "tasks[0]")
    assert data.splits["test"][0].pair == "Patient has elevated Cr" and data.labels == ["entailment"]
    # GAD: no dev file (10% of train, fixed), test with an index column and a header line
    d = tmp_path / "GAD" / "1"
    rows = [f"Variants of @GENE$ raise the risk of @DISEASE$ case {i}.\t{i % 2}" for i in range(20)]
    write(d / "train.tsv", "\n".join(rows) + "\n")
    write(
        d / "test.tsv",
        "index\tsentence\tlabel\n0\t@GENE$ is not linked to @DISEASE$.\t0\n1\t@GENE$ causes @DISEASE$.\t1\n",
    )
    data = read_task(TaskEntry(name="gad", kind="relation", path=str(d)), "tasks[1]")
    assert (len(data.splits["train"]), len(data.splits["dev"]), data.negative) == (18, 2, "0")
    assert [p.label for p in data.splits["test"]] == ["0", "1"] and data.splits["test"][1].where.endswith(":3")
    e = bad(TaskEntry(name="gad", kind="relation", path=str(d), negative_label="false"))
    assert (e.key, e.message) == ("tasks[2].negative_label", "'false' is not a label of the train split (0, 1)")
    # DDI as BLUE distributes it: every split with the index header; the no-interaction class is DDI-false
    d = tmp_path / "ddi2013-type"
    kinds = ["DDI-false", "DDI-effect", "DDI-mechanism"]
    body = "index\tsentence\tlabel\n" + "".join(
        f"{i}\t@DRUG$ alters @DRUG$ levels ({i}).\t{kinds[i % 3]}\n" for i in range(9)
    )
    for split in ("train", "dev", "test"):
        write(d / f"{split}.tsv", body)
    data = read_task(TaskEntry(name="ddi", kind="relation", path=str(d)), "tasks[3]")
    assert (data.negative, len(data.splits["dev"]), data.splits["dev"][0].where) == (
        "DDI-false",
        9,
        f"{d / 'dev.tsv'}:2",
    )
    write(d / "train.tsv", body + "9\t@DRUG$ and @DRUG$.\tfalse\n")
    e = bad(TaskEntry(name="ddi", kind="relation", path=str(d)))
    assert e.message.endswith("means no relation (DDI-false and false both could)? Name it")


def test_models_are_checked_before_any_cell(tmp_path):
    data = read_task(ner_task(SAMPLE_NER), "tasks[0]")
    no_tokenizer = make_bert(tmp_path / "bare", layers=1, hidden=32)
    for f in no_tokenizer.iterdir():
        if "token" in f.name or f.name == "vocab.txt":
            f.unlink()
    suite = load_suite(write(tmp_path / "s.yaml", f"models: [{{name: bare, path: {no_tokenizer}}}]\ntasks: [{{name: ner, kind: ner, path: {SAMPLE_NER}}}]\n"))  # fmt: skip
    with pytest.raises(ConfigError) as e:
        check_models(suite, {"bare": str(no_tokenizer)}, {"ner": data})
    assert (e.value.source, e.value.key) == (str(no_tokenizer), "models[0].path")
    assert e.value.message.startswith("no tokenizer saved beside the weights (none of tokenizer.json, vocab.txt")
    # a token-classification checkpoint with 3 labels against a 5-label task
    head = make_bert(tmp_path / "head", layers=1, hidden=32)
    AutoModelForTokenClassification.from_pretrained(head, num_labels=3).save_pretrained(head)
    with pytest.raises(ConfigError) as e:
        build_model(str(head), "models[1].path", data, adapters_only=False)
    assert e.value.message == (
        "its TokenClassification head has 3 labels (LABEL_0, LABEL_1, LABEL_2), task 't' has 5 "
        "(O, B-Chemical, I-Chemical, B-Disease, I-Disease)"
    )
    # tokenizer and config but no weights: refused before any cell, as from_pretrained would refuse it after
    no_weights = make_bert(tmp_path / "no-weights", layers=1, hidden=32)
    (no_weights / "model.safetensors").unlink()
    suite = load_suite(write(tmp_path / "s.yaml", f"models: [{{name: w, path: {no_weights}}}]\ntasks: [{{name: ner, kind: ner, path: {SAMPLE_NER}}}]\n"))  # fmt: skip
    with pytest.raises(ConfigError) as e:
        check_models(suite, {"w": str(no_weights)}, {"ner": data})
    assert (e.value.source, e.value.key) == (str(no_weights), "models[0].path")
    assert e.value.message.startswith("no weights file (none of model.safetensors, model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json; it holds config.json")  # fmt: skip
    with pytest.raises(ConfigError, match="bert has no adapters") as e:
        build_model(str(tmp_path / "bare"), "models[0].path", data, adapters_only=True)
    assert e.value.key == "models[0].adapters_only"


def test_a_model_changed_under_finished_cells_is_refused_by_name(tmp_path):
    """make demo again, or a new export into the same directory: the old cells are not the new model's."""
    model = make_bert(tmp_path / "student", layers=1, hidden=32)
    body = f"output_dir: {tmp_path / 'out'}\nmodels: [{{name: s, path: {model}}}]\ntasks: [{{name: n, kind: ner, path: x}}]\n"
    suite = load_suite(write(tmp_path / "s.yaml", body))
    first = same_models(suite, {"s": str(model)})
    assert same_models(suite, {"s": str(model)}) == first  # unchanged: resumes
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(ConfigError) as e:
        same_models(suite, {"s": str(model)})
    assert (e.value.source, e.value.key) == (str(tmp_path / "s.yaml"), "models[0].path")
    assert e.value.message.startswith(
        f"{model}: its weights changed since the cells in {tmp_path / 'out'} were trained"
    )


def test_a_task_distilled_row_whose_epochs_changed_is_refused_by_name(tmp_path):
    """Its cells distilled for the old epochs: resuming them under new ones would mix two students in a mean."""
    model = make_bert(tmp_path / "student", layers=1, hidden=32)
    entries = "[{name: t, path: %s}, {name: td, task_recipe: configs/task/ner-sample.yaml, teacher: t, epochs: %s}]"
    body = f"output_dir: {tmp_path / 'out'}\nmodels: {entries}\ntasks: [{{name: n, kind: ner, path: x}}]\n"
    paths = {"t": str(model), "td": str(model)}
    first = same_models(load_suite(write(tmp_path / "s.yaml", body % (model, 9))), paths)
    assert first["td"] == f"{first['t']} epochs=9"  # the student's weights, and how long it is distilled
    assert same_models(load_suite(write(tmp_path / "s.yaml", body % (model, 9.0))), paths) == first
    with pytest.raises(ConfigError) as e:
        same_models(load_suite(write(tmp_path / "s.yaml", body % (model, 0))), paths)
    assert e.value.key == "models[1].epochs"
    assert e.value.message.startswith(
        f"td: its epochs of task distillation changed since the cells in {tmp_path / 'out'} were trained "
        "(epochs=9 -> the protocol's epochs)"
    )


def test_suite_errors_name_the_key(tmp_path):
    body = "models: [{name: a, path: x}, {name: a, path: y}]\ntasks: [{name: t, kind: qa, path: d}]\n"
    with pytest.raises(ConfigError) as e:
        load_suite(write(tmp_path / "s.yaml", body))
    assert (e.value.key, e.value.message) == ("models[1].name", "'a' names two entries")
    with pytest.raises(ConfigError) as e:
        load_suite(write(tmp_path / "s.yaml", body.replace("path: y", "path: y, adapter_only: true")))
    assert e.value.key == "models[1].adapter_only" and "did you mean 'adapters_only'" in e.value.message
    with pytest.raises(ConfigError) as e:
        load_suite(write(tmp_path / "s.yaml", body.replace("name: a, path: y", "name: b, path: y")))
    assert (e.value.key, e.value.message) == ("tasks[0].gold", "qa scores its test set on BioASQ's golden JSON")
    with pytest.raises(ConfigError) as e:
        load_suite(REPO / "configs" / "eval" / "demo.yaml", ["--protocol.lrs", "[0]"])
    assert e.value.source == "command line --protocol.lrs"
    with pytest.raises(ConfigError) as e:
        load_suite(REPO / "configs" / "eval" / "demo.yaml", ["--deploy.onnx", "maybe"])
    assert e.value.key == "deploy.onnx" and "'auto'" in e.value.message
    # the throughput section is checked with the rest, not after every cell has trained
    demo = REPO / "configs" / "eval" / "demo.yaml"
    for flag, value, message in (
        ("length", "-5", "tokens, between 8 and 8192, got -5"),
        ("batch_sizes", "[]", "a list of positive batch sizes (each a column of the table), got []"),
        ("seconds", "-1", "seconds timed per measurement, must be positive, got -1.0"),
    ):
        with pytest.raises(ConfigError) as e:
            load_suite(demo, [f"--throughput.{flag}", value])
        assert (e.value.source, e.value.key, e.value.message) == (f"command line --throughput.{flag}", f"throughput.{flag}", message)  # fmt: skip


def test_cut_sentences_are_counted():
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    data = read_task(ner_task(SAMPLE_NER), "tasks[0]")
    long = [s for s in data.splits["test"] if len(s.words) > 10]
    _, firsts, cut = ner_features(long, tokenizer, data.labels, max_length=8, subword="first")
    assert cut == len(long) and all(len(f) < len(s.words) for f, s in zip(firsts, long))


# ------------------------------------------------------------------------------------ fine-tuning


@pytest.fixture(scope="module")
def minilm2(tmp_path_factory) -> Path:
    """The real pretrained MiniLM, cut to its first 2 layers: a real encoder that fine-tunes in seconds."""
    out = tmp_path_factory.mktemp("minilm2")
    model = AutoModel.from_pretrained(minilm_dir())
    model.encoder.layer = model.encoder.layer[:2]
    model.config.num_hidden_layers = 2
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(out)
    return out


@pytest.mark.slow
def test_a_real_fine_tune_learns_ner_far_above_the_majority_baseline(minilm2, tmp_path, capsys, monkeypatch):
    """...and says how far it is while it trains: the loss lines reach the cell's log as they come, and a progress
    line (step, epoch, loss, time left) is printed, here at every step."""
    from biodistill.engine.evaluate import finetune

    monkeypatch.setattr(finetune, "PROGRESS_SECONDS", 0.0)
    data = read_task(ner_task(SAMPLE_NER), "tasks[0]")
    # Majority label: every token "O", no entity found: entity F1 0.
    assert metrics.ner_scores([s.labels for s in data.splits["test"]], [["O"] * len(s.words) for s in data.splits["test"]])["f1"] == 0  # fmt: skip
    cell = Cell("minilm2", "ner", 3e-4, 16, 1)
    protocol = Protocol(epochs=4, max_length=64)
    logged = []
    result, _ = run_cell(cell, str(minilm2), "models[0].path", False, data, protocol, tmp_path, logged.append)
    assert result["test"]["f1"] > 0.6 and result["dev"]["f1"] > 0.8, (result["dev"], result["test"])
    printed = capsys.readouterr().out
    steps = int(re.search(r"step \d+/(\d+)", printed).group(1))
    assert f"[eval]   {cell.id}: step 1/{steps}, epoch " in printed and f"step {steps}/{steps}, epoch 4.00/4" in printed
    assert "left" in printed and ", loss " in printed
    losses = [json.loads(line) for line in logged if '"loss"' in line]  # written as they came, every LOG_EVERY steps
    assert [e["step"] for e in losses] == list(range(finetune.LOG_EVERY, steps + 1, finetune.LOG_EVERY))
    assert set(result["test"]["per_type"]) == {"Chemical", "Disease"}
    rows = [json.loads(line) for line in (tmp_path / "predictions_test.jsonl").read_text().splitlines()]
    assert len(rows) == len(data.splits["test"]) and rows[0]["words"] == data.splits["test"][0].words


def test_adapters_only_leaves_every_body_weight_bit_identical(tmp_path):
    """On a checkpoint as the original miniALBERT code wrote it (config.json says model_type "bert")."""
    from test_minialbert import SMALL, published_checkpoint

    from biodistill.engine.models.minialbert import MiniAlbertConfig, MiniAlbertForMaskedLM

    torch.manual_seed(0)
    shape = {**SMALL, "vocab_size": 30522}
    published_checkpoint(tmp_path / "mini", MiniAlbertForMaskedLM(MiniAlbertConfig(**shape)), shape)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(tmp_path / "mini")
    data = read_task(TaskEntry(name="triage", kind="classification", path=str(SAMPLE_TRIAGE)), "tasks[0]")
    data.splits = {k: v[:48] for k, v in data.splits.items()}
    before = MiniAlbertForMaskedLM.from_pretrained(
        tmp_path / "mini", config=MiniAlbertConfig(**shape)
    ).albert.state_dict()
    cell = Cell("mini", "triage", 1e-3, 16, 1)
    result, model = run_cell(cell, str(tmp_path / "mini"), "models[0].path", True, data, Protocol(epochs=1), tmp_path, lambda _: None)  # fmt: skip
    after = model.base_model.state_dict()
    body = [k for k in before if "adapter" not in k]
    assert body and all(torch.equal(before[k], after[k]) for k in body)
    adapters = [k for k in before if "adapter" in k]
    assert adapters and any(not torch.equal(before[k], after[k]) for k in adapters)  # the adapters did train
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = sum(p.numel() for p in model.classifier.parameters())
    assert result["trainable_parameters"] == trainable == head + sum(before[k].numel() for k in adapters)


# ------------------------------------------------------------------------- the grid: kill, resume


@pytest.mark.slow
def test_a_grid_killed_mid_cell_resumes_without_rerunning_finished_cells(tmp_path):
    """NER, relation and QA cells of a tiny model in one grid: killed while the second cell trains, then
    resumed by two worker processes: the first cell is not run again (its files untouched), the others
    finish, the report covers all three. Resuming under another protocol is refused."""
    model = make_bert(tmp_path / "tiny", layers=1, hidden=32, dropout=0.0)
    d = tmp_path / "re"
    rows = [
        f"@GENE$ variant {'raises' if i % 2 else 'does not change'} @DISEASE$ risk ({i}).\t{i % 2}" for i in range(60)
    ]
    write(d / "train.tsv", "\n".join(rows) + "\n")
    write(d / "test.tsv", "index\tsentence\tlabel\n" + "".join(f"{i}\t{r}\n" for i, r in enumerate(rows[:20])))
    q = tmp_path / "qa"
    contexts = [
        (f"The gene {g} is mutated in most cases of the disorder.", g) for g in ("BRCA1", "TP53", "KRAS", "EGFR")
    ]
    squad = {"data": [{"paragraphs": [{"context": c, "qas": [
        {"id": f"q{i}_00{j}", "question": "Which gene is mutated?", "answers": [{"text": g, "answer_start": c.index(g)}]}
        for j in range(3)]} for i, (c, g) in enumerate(contexts * 3)]}]}  # fmt: skip
    write(q / "train.json", json.dumps(squad))
    write(q / "test.json", json.dumps(squad))
    write(q / "gold.json", json.dumps({"questions": [{"id": f"q{i}", "type": "factoid", "exact_answer": [[g]]}
                                                     for i, (_, g) in enumerate(contexts * 3)]}))  # fmt: skip
    suite = write(
        tmp_path / "suite.yaml",
        f"""
name: killed
output_dir: {tmp_path / "out"}
models: [{{name: tiny, path: {model}}}]
tasks:
  - {{name: ner, kind: ner, path: {SAMPLE_NER}}}
  - {{name: gad, kind: relation, path: {d}}}
  - {{name: bioasq, kind: qa, path: {q}, gold: {q / "gold.json"}}}
protocol: {{epochs: 3, lrs: [1.0e-3], batch_sizes: [16], seeds: [1], max_length: 48, qa_max_length: 64, qa_stride: 32}}
throughput: {{batch_sizes: [1, 4], seconds: 0.2}}
""",
    )
    cmd = [sys.executable, "-m", "biodistill.engine.evaluate", "--config", str(suite)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cells = tmp_path / "out" / "cells" / "tiny"
    first, second = cells / "ner" / "lr0.001-bs16-seed1", cells / "gad" / "lr0.001-bs16-seed1"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (second / "log.jsonl").is_file() and time.time() < deadline:  # the second cell has begun
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (first / "metrics.json").is_file() and not (second / "metrics.json").is_file()
    kept = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    changed = subprocess.run([*cmd, "--protocol.epochs", "4"], env=env, capture_output=True, text=True)
    assert changed.returncode == 2 and "protocol.epochs: the cells already in" in changed.stderr
    # Resumed by two worker processes (as on a 2-GPU machine): cell i goes to worker i mod 2.
    out = subprocess.run([*cmd, "--protocol.workers", "2"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "cell 1/1: tiny/gad" in out.stdout and "cell 1/1: tiny/bioasq" in out.stdout
    assert "tiny/ner" not in out.stdout
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == kept
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["cells"] == {"finished": 3, "planned": 3}
    tasks = results["models"]["tiny"]["tasks"]
    assert set(tasks) == {"ner", "gad", "bioasq"} and tasks["bioasq"]["metric"] == "mrr"
    submission = json.loads((cells / "bioasq" / "lr0.001-bs16-seed1" / "bioasq_submission.json").read_text())
    assert {q["id"] for q in submission["questions"]} == {f"q{i}" for i in range(12)}
    assert all(1 <= len(q["exact_answer"]) <= 5 for q in submission["questions"])
    assert (tmp_path / "out" / "score_vs_parameters.png").stat().st_size > 1000
    table = (tmp_path / "out" / "results.md").read_text()
    assert table.splitlines()[0].startswith(
        "| model | params (total / trainable) | size on disk | ner (f1) | gad (f1) |"
    )
    # deploy (on by default without a GPU): every cell's model scored again through ONNX Runtime fp32 and int8,
    # token, sequence and QA heads alike; the exports themselves are not kept
    for name in ("ner", "gad", "bioasq"):
        assert {"onnx_mean", "onnx_std", "int8_mean", "int8_std"} <= set(tasks[name]), name
    assert tasks["ner"]["onnx_mean"] == pytest.approx(
        tasks["ner"]["test_mean"], abs=1e-9
    )  # fp32 ORT decides as PyTorch
    deployed = results["models"]["tiny"]["deploy"]
    assert deployed["bytes_int8"] < deployed["bytes_onnx"] and deployed["int8_seq_per_s_bs4"] > 0
    assert "Deployed (the fine-tuned task model on this CPU):" in table and " (int8 " in table
    assert not list(cells.glob("*/*/deploy-*"))
    # Another suite given the same output_dir would replace this one's results.md, results.json and plot: refused
    # at start, and so is a folder that holds anything but an evaluation's output (issue 39); nothing changes.
    from conftest import files_under

    reports = files_under(tmp_path / "out")
    other = write(tmp_path / "other.yaml", suite.read_text().replace("name: killed", "name: another"))
    refused = subprocess.run([sys.executable, "-m", "biodistill.engine.evaluate", "--config", str(other)],
                             env=env, capture_output=True, text=True)  # fmt: skip
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        f"biodistill-evaluate: error: {other}: output_dir: {tmp_path / 'out'} holds the results of the suite "
        "'killed'; this is 'another', whose results.md, results.json and plot would replace them: give each suite "
        "its own output_dir"
    )
    write(tmp_path / "papers" / "draft.tex", "\\section{Results}")
    elsewhere = subprocess.run(
        [*cmd, "--output_dir", str(tmp_path / "papers")], env=env, capture_output=True, text=True
    )
    assert elsewhere.returncode == 2 and elsewhere.stderr.strip().endswith(
        f"command line --output_dir: output_dir: {tmp_path / 'papers'} exists and is not an evaluation's output (it "
        "has no protocol.json): its files could be replaced by this suite's; choose a new output_dir"
    )
    assert files_under(tmp_path / "out") == reports and files_under(tmp_path / "papers") == {
        "draft.tex": b"\\section{Results}"
    }


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "eval").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_suites_load(path):
    suite = load_suite(path)
    assert suite.models and suite.tasks


def test_report_tells_same_size_models_apart_and_shows_throughput_noise(tmp_path):
    """Two students of one architecture (before and after distillation): apart on the plot, one precision in
    the table, and each throughput with its spread, measured over at least MIN_FORWARDS forwards."""
    from biodistill.engine.evaluate import report

    encoder = AutoModel.from_pretrained(make_bert(tmp_path / "m", layers=1, hidden=32))
    calls = []
    encoder.register_forward_hook(lambda *_: calls.append(1))
    rate, spread = report.throughput(encoder, "cpu", length=16, batch=2, seconds=0.0)
    # two warm-up forwards, then MIN_FORWARDS per measurement (more when a busy host made it noisy); never a bound on
    # the spread itself: that is the host's, not the code's
    assert len(calls) - 2 in [k * report.MIN_FORWARDS for k in range(1, report.TRIES + 1)] and rate > 0 and spread >= 0
    suite = load_suite(REPO / "configs" / "eval" / "demo.yaml", ["--output_dir", str(tmp_path / "out")])
    task = {t.name: {"test_mean": 0.8, "test_std": 0.01, "truncated": {}} for t in suite.tasks}
    cost = {"parameters": 17_430_000, "trainable": 17_430_000, "bytes_on_disk": 2**26, "cpu_seq_per_s_bs1": 63.3,
            "cpu_spread_bs1": 0.04, "cpu_seq_per_s_bs32": 53.5, "cpu_spread_bs32": 0.12}  # fmt: skip
    doc = {"models": {"student-before": {**cost, "tasks": task}, "student-after": {**cost, "tasks": task},
                      "teacher": {**cost, "parameters": 22_713_216, "trainable": 22_713_216, "tasks": task}}}  # fmt: skip
    offsets = report._offsets({name: m["parameters"] / 1e6 for name, m in doc["models"].items()})
    assert offsets["student-before"] < 0 < offsets["student-after"] and offsets["teacher"] == 0
    table = report.markdown(suite, doc, 1, 1)
    assert "| teacher | 22.71M / 22.71M | 64.0 MiB |" in table and "| 63.3 ± 4% | 53.5 ± 12% |" in table
    assert "(noisy)" not in table
    doc["models"]["teacher"]["cpu_spread_bs32"] = 16.72  # 84.4 ± 1672%, as a loaded 2-core host measured it
    noisy = report.markdown(suite, doc, 1, 1)
    assert "| 63.3 ± 4% | 53.5 ± 1672% (noisy) |" in noisy and "(noisy): the forwards' times spread by more" in noisy
    report.plot(suite, doc, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_subword_f1_is_the_authors_figure_not_word_level():
    """ner.py's compute_metrics keeps every position whose label is not -100 and runs seqeval on those sequences:
    a two-piece entity word counts as B then I pieces, and a half-right word scores as its pieces do."""
    import numpy as np

    from biodistill.engine.evaluate.finetune import Features, subword_f1

    labels = ["O", "B", "I"]
    # [CLS] as ##pirin works [SEP]: under "all" both pieces of the entity word carry its label, B
    rows = [{"labels": [-100, 1, 1, 0, -100]}]
    logits = np.zeros((1, 5, 3))
    logits[0, 1, 1] = logits[0, 2, 2] = logits[0, 3, 0] = 1  # predicted B, I, O: word-level right (first piece B)
    # ...but over sub-words the gold B B O holds two one-piece entities and B I O one two-piece entity: no match
    assert subword_f1(labels, Features(rows), logits) == 0.0
    logits[0, 2] = [0, 1, 0]  # predicted B B O: both sub-word entities right
    assert subword_f1(labels, Features(rows), logits) == 1.0
