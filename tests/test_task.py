"""Task-specific distillation: the task terms, the examples and their collator, the refusals at start, and real
2-rank jobs on the bundled NER and triage samples (a base teacher fine-tuned first, stored outputs reused by a
second student, exact resume, export loaded by transformers' task classes and biodistill-export)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import (
    csv_metric,
    launch,
    make_bert,
    minilm_dir,
    recipe_dict,
    summary,
    swapped_student,
    write_recipe,
)

from biodistill.engine import cli
from biodistill.engine.config import LossesConfig, LossTermConfig, resolve_path
from biodistill.engine.losses import TaskCE, TaskKL, TermContext
from biodistill.engine.models.outputs import Outputs
from biodistill.engine.task.examples import TaskCollator, TaskView, sentences_of

NER = "pkg://biodistill.engine/assets/eval/ner"
TRIAGE = "pkg://biodistill.engine/assets/eval/triage"
NER_LABELS = ["O", "B-Chemical", "I-Chemical", "B-Disease", "I-Disease"]
TERMS = [{"kind": "task_kl", "weight": 1.0}, {"kind": "task_ce", "weight": 1.0}]


def task_recipe(tmp: Path, teacher: Path, kind: str = "ner", terms=TERMS, **sections) -> dict:
    """conftest's test recipe made a task recipe: the task's examples instead of a corpus, max_length 48."""
    recipe = recipe_dict(teacher, Path("unused"), tmp, terms)
    recipe.update(name="task-test", data={"max_length": 48})
    recipe["student"].pop("mlm_head")
    recipe["task"] = {
        "name": "sample",
        "kind": kind,
        "path": NER if kind == "ner" else TRIAGE,
        "outputs_dir": str(tmp / "outputs"),
        "finetune": {"lr": 1e-3, "epochs": 1, "batch_size": 16, "cache_dir": str(tmp / "teachers")},
    }
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    if recipe["student"].get("init") != "teacher_layers":  # the layers to copy belong to that init alone
        recipe["student"].pop("teacher_layers", None)
    return recipe


def ner_teacher(directory: Path, labels: list[str]) -> Path:
    """A small BERT saved with a token-classification head over ``labels`` (random weights: a 'trained' head as
    far as its config says)."""
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128, num_labels=len(labels),
                        id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)})  # fmt: skip
    BertForTokenClassification(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(directory)
    return directory


# ------------------------------------------------------------------------------------------ unit tier


def _ctx(kind: str) -> TermContext:
    return TermContext(LossTermConfig(kind=kind), LossesConfig(temperature=2.0), None, None, "losses.terms[0]", "r")


def test_task_kl_is_the_temperature_kl_over_real_tokens_only():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    got = TaskKL(_ctx("task_kl"))(Outputs(task_logits=s), Outputs(task_logits=t), {"attention_mask": mask})
    p, log_q = F.softmax(t / 2, -1), F.log_softmax(s / 2, -1)
    per_token = (p * (p.log() - log_q)).sum(-1) * 4
    assert got.item() == pytest.approx(per_token[mask.bool()].mean().item(), rel=1e-5)
    # Per example (classification): every row counts.
    s2, t2 = torch.randn(4, 3), torch.randn(4, 3)
    got = TaskKL(_ctx("task_kl"))(Outputs(task_logits=s2), Outputs(task_logits=t2), {"attention_mask": mask})
    p, log_q = F.softmax(t2 / 2, -1), F.log_softmax(s2 / 2, -1)
    assert got.item() == pytest.approx(((p * (p.log() - log_q)).sum(-1) * 4).mean().item(), rel=1e-5)


def test_task_ce_reads_gold_labels_only():
    logits = torch.randn(3, 4)
    labels = torch.tensor([2, -100, 1])  # the middle one is an unlabeled sentence
    got = TaskCE(_ctx("task_ce"))(Outputs(task_logits=logits), Outputs(), {"labels": labels})
    assert got.item() == pytest.approx(F.cross_entropy(logits[[0, 2]], labels[[0, 2]]).item(), rel=1e-6)
    none = TaskCE(_ctx("task_ce"))(Outputs(task_logits=logits), Outputs(), {"labels": torch.full((3,), -100)})
    assert none.item() == 0.0


def test_unlabeled_text_splits_into_word_sentences():
    text = "Aspirin (ASA) reduced pain, e.g. in adults. 12 patients had no rash! Ok.\nSecond line here ."
    assert list(sentences_of(text)) == [
        ["Aspirin", "(", "ASA", ")", "reduced", "pain", ",", "e", ".", "g", ".", "in", "adults", "."],
        ["12", "patients", "had", "no", "rash", "!"],
        ["Second", "line", "here", "."],
    ]  # "Ok." is shorter than a sentence worth teaching


def test_collator_pads_labels_and_stored_logits():
    rows = [{"input_ids": [101, 5, 102], "attention_mask": [1, 1, 1], "labels": [-100, 2, -100]},
            {"input_ids": [101, 102], "attention_mask": [1, 1], "labels": [-100, -100]}]  # fmt: skip
    stored = [torch.ones(3, 4), 2 * torch.ones(2, 4)]
    batch = TaskCollator(type("T", (), {"pad_token_id": 0})(), per_token=True, stored=stored)(
        [TaskView(rows)[(0, 0)], TaskView(rows)[(3, 1)]]
    )
    assert batch["input_ids"].tolist() == [[101, 5, 102], [101, 102, 0]]
    assert batch["labels"].tolist() == [[-100, 2, -100], [-100, -100, -100]]
    assert batch["teacher_logits"][1].tolist() == [[2.0] * 4, [2.0] * 4, [0.0] * 4]
    assert batch["padded"] and batch["sample_epochs"].tolist() == [0, 3] and batch["sample_ids"].tolist() == [0, 1]


REFUSED = {
    # what the recipe says -> the last line the user reads
    "qa kind": (
        {"task": {"kind": "qa"}},
        "task.kind: task distillation trains ner, classification or relation heads, got 'qa'",
    ),  # fmt: skip
    "mlm head term": (
        {"losses": {"terms": [{"kind": "logit_kl"}, {"kind": "task_ce"}]}},
        "losses.terms: logit_kl "
        "read(s) the MLM head; a task recipe's models carry the task's head instead: use task_kl / "
        "task_ce",
    ),  # fmt: skip
    "no task term": (
        {"losses": {"terms": [{"kind": "hidden_cosine"}]}},
        "losses.terms: a task recipe (task.path) trains the task head: add task_kl or task_ce",
    ),  # fmt: skip
    "pairs and text": (
        {"task": {"text_pair_field": "b"}, "data": {"train_files": ["{corpus}"]}},
        "data.train_files: unlabeled text makes single-text examples; task 'ner' reads pairs (task.text_pair_field)",
    ),  # fmt: skip
    "vocab map": (
        {"teacher": {"vocab_map": "by_token"}, "student": {"init": "checkpoint", "path": "{tmp}/teacher"}},
        "teacher.vocab_map: a task's outputs are read token by token: the student must use the teacher's tokenizer",
    ),  # fmt: skip
    "outputs cache is a file": (
        {"task": {"outputs_dir": "{tmp}/r.yaml"}},
        "task.outputs_dir: {tmp}/r.yaml is a file, "
        "where the job keeps a cache folder: move it away, or choose another folder",
    ),
    "stored dir of nothing": (
        {"task": {"teacher_outputs": "{tmp}/nothing"}},
        "task.teacher_outputs: {tmp}/nothing holds no stored teacher outputs (no manifest.json)",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_bad_task_recipes_are_refused_at_start(case, tmp_path, tiny_corpus, capsys):
    edit, message = REFUSED[case]
    teacher = ner_teacher(tmp_path / "teacher", NER_LABELS)
    recipe = task_recipe(tmp_path, teacher)
    for section, values in json.loads(json.dumps(edit).replace("{corpus}", str(tiny_corpus))
                                      .replace("{tmp}", str(tmp_path))).items():  # fmt: skip
        recipe[section] = {**recipe[section], **values}
    if recipe["student"]["init"] != "teacher_layers":
        recipe["student"].pop("teacher_layers")
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert cli.main(["--config", str(path)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"biodistill: error: {path}: " + message.replace("{tmp}", str(tmp_path))
    )
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "teachers").exists()  # nothing computed


def test_a_task_term_without_a_task_is_refused(tmp_path, tiny_teacher, tiny_corpus, capsys):
    from conftest import recipe_dict

    path = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_teacher, tiny_corpus, tmp_path, TERMS))
    assert cli.main(["--config", str(path)]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("task.path: the task_ce, task_kl term(s) read a task head: name the task's data")
    )


def test_teacher_with_other_labels_and_student_with_another_tokenizer_are_refused(tmp_path, capsys):
    other = ner_teacher(tmp_path / "other", ["O", "B-Gene", "I-Gene"])
    path = write_recipe(tmp_path / "r.yaml", task_recipe(tmp_path, other))
    assert cli.main(["--config", str(path)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"biodistill: error: {path}: teacher.path: {other}: its TokenClassification head has other labels: O, "
        f"B-Gene, I-Gene; task '{NER}' has O, B-Chemical, I-Chemical, B-Disease, I-Disease (from its train split)"
    )
    reordered = ner_teacher(tmp_path / "reordered", [*NER_LABELS[1:], "O"])
    path = write_recipe(tmp_path / "r.yaml", task_recipe(tmp_path, reordered))
    assert cli.main(["--config", str(path)]) == 2
    assert "has the task's labels in another order" in capsys.readouterr().err
    teacher = ner_teacher(tmp_path / "teacher", NER_LABELS)
    student = swapped_student(make_bert(tmp_path / "student", layers=2))
    recipe = task_recipe(tmp_path, teacher, student={"init": "checkpoint", "path": str(student)})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert cli.main(["--config", str(path)]) == 2
    assert "student.path" in capsys.readouterr().err.strip().splitlines()[-1]


# ------------------------------------------------------------------------------- real 2-rank jobs


@pytest.fixture(scope="module")
def ner_job(tmp_path_factory, tiny_corpus):
    """A base tiny BERT as teacher (no head: fine-tuned first), the NER sample plus unlabeled sentences, stored
    outputs, ZeRO-2, 2 ranks, checkpoints at 4 and 8."""
    tmp = tmp_path_factory.mktemp("task-ner")
    teacher = make_bert(tmp / "teacher", mlm_head=False)
    recipe = task_recipe(tmp, teacher, data={"max_length": 48, "train_files": [str(tiny_corpus)]},
                         task={"max_unlabeled": 200}, train={"save_every": 4})  # fmt: skip
    path = write_recipe(tmp / "r.yaml", recipe)
    proc = launch(path)
    assert proc.returncode == 0
    return tmp, path, proc


@pytest.mark.multirank
def test_ner_task_distillation_trains_stores_and_exports(ner_job):
    tmp, _, proc = ner_job
    out = proc.stdout + proc.stderr
    run = tmp / "run"
    assert "has no ner head: fine-tuning it on" in out and "fine-tuned teacher, dev: precision" in out
    s = summary(run)
    task = s["plan"]["task"]
    assert task["examples"] == "240 labelled and 200 unlabeled training examples, 60 dev"
    assert (
        task["teacher_outputs"].startswith(f"stored in {tmp / 'outputs'}")
        and "computed by this job" in task["teacher_outputs"]
    )
    assert Path(task["teacher"]).parent == tmp / "teachers"
    manifest = json.loads((Path(task["teacher_outputs"].split()[2]) / "manifest.json").read_text())
    assert sorted(manifest["shards"]) == ["shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"]
    assert manifest["count"] == 240 + 200 + 60 and manifest["labels"] == NER_LABELS
    # Stored outputs are the fine-tuned teacher's logits on each example, as a forward on it alone gives them.
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from biodistill.engine.task.stored import load

    store = Path(task["teacher_outputs"].split()[2])
    logits = load(store, manifest["count"], per_token=True)
    teacher = AutoModelForTokenClassification.from_pretrained(task["teacher"]).eval()
    words = [
        line.split("\t")[0] for line in (resolve_path(NER) / "train.tsv").read_text().split("\n\n")[0].splitlines()
    ]
    ids = AutoTokenizer.from_pretrained(task["teacher"])(words, is_split_into_words=True, truncation=True,
                                                         max_length=48, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        direct = teacher(**ids).logits[0]
    assert logits[0].shape == direct.shape and torch.allclose(logits[0], direct, atol=1e-5)
    assert s["job"]["teacher_placement"] is None  # stored outputs: no teacher in the step
    assert s["after"]["loss/task_kl"] < s["before"]["loss/task_kl"]
    assert s["after"]["agreement/top1"] > s["before"]["agreement/top1"]
    assert len(csv_metric(run, "train_task_kl")) == 8
    # The export is a token-classification model with the task's labels, for plain transformers.
    from huggingface_hub import ModelCard

    model = AutoModelForTokenClassification.from_pretrained(run / "student")
    assert [model.config.id2label[i] for i in range(5)] == NER_LABELS and model.config.num_hidden_layers == 2
    card = ModelCard.load(run / "student" / "README.md")
    assert card.data.pipeline_tag == "token-classification" and "task-distillation" in card.data.tags
    # biodistill-export takes it as any fine-tuned model.
    from biodistill.engine.deploy import cli as export_cli

    assert export_cli.main(["--model", str(run / "student"), "--out", str(tmp / "onnx"), "--no-int8"]) == 0
    assert (tmp / "onnx" / "model.onnx").is_file()


@pytest.mark.multirank
def test_ner_task_distillation_resumes_exactly(ner_job):
    tmp, recipe, _ = ner_job
    resumed = tmp / "resumed"
    shutil.copytree(tmp / "run" / "checkpoints", resumed / "checkpoints")
    shutil.rmtree(resumed / "checkpoints" / "step8")
    (resumed / "checkpoints" / "latest").write_text("step4")
    proc = launch(recipe, "--resume", "--train.output_dir", str(resumed), "--train.export", "false")
    assert proc.returncode == 0 and "resumed from" in proc.stdout + proc.stderr
    assert "fine-tuning" not in proc.stdout + proc.stderr  # the fine-tuned teacher came from the cache
    full, after = csv_metric(tmp / "run", "train_loss"), csv_metric(resumed, "train_loss")
    assert sorted(after) == [5, 6, 7, 8]
    for step in after:
        assert after[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), step


@pytest.mark.multirank
def test_second_student_reads_stored_outputs_and_foreign_stores_are_refused(ner_job, capsys):
    """Another student from the same teacher and examples never loads the teacher; a store of another teacher's or
    of other examples is refused at start, naming what differs."""
    tmp, recipe, first = ner_job
    store = summary(tmp / "run")["plan"]["task"]["teacher_outputs"].split()[2]
    proc = launch(recipe, "--train.output_dir", str(tmp / "second"), "--student.teacher_layers", "[1, 3]",
                  "--train.max_steps", "4", "--train.export", "false")  # fmt: skip
    assert proc.returncode == 0
    task = summary(tmp / "second")["plan"]["task"]
    assert task["teacher_outputs"] == f"stored in {store} (found)"
    assert "teacher outputs stored" not in proc.stdout + proc.stderr
    other = ner_teacher(tmp / "other-teacher", NER_LABELS)
    elsewhere = ["--train.output_dir", str(tmp / "refused"), "--task.teacher_outputs", store]
    assert cli.main(["--config", str(recipe), "--teacher.path", str(other), *elsewhere]) == 2
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"task.teacher_outputs: {store} holds the outputs of another teacher: teacher: stored" in said
    assert cli.main(["--config", str(recipe), "--data.max_length", "40", *elsewhere]) == 2
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds the outputs of other examples (data, tokenizer or data.max_length)" in said


@pytest.mark.multirank
def test_triage_with_live_teacher_and_hidden_terms(tmp_path):
    """Sequence classification, a teacher with the task's head (no fine-tuning), a hidden-state term: the teacher
    runs live, and the plan says which term keeps it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

    labels = ["cardiovascular", "gastrointestinal", "neurological", "respiratory"]
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128, num_labels=4,
                        id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)})  # fmt: skip
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "teacher")
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(tmp_path / "teacher")
    terms = [*TERMS, {"kind": "hidden_mse", "weight": 1.0, "layer_map": [[2, 4]]}]
    path = write_recipe(tmp_path / "r.yaml", task_recipe(tmp_path, tmp_path / "teacher", "classification", terms))
    proc = launch(path)
    assert proc.returncode == 0
    s = summary(tmp_path / "run")
    assert s["plan"]["task"]["teacher_outputs"] == "live: hidden_mse reads the teacher's hidden states"
    assert s["job"]["teacher_placement"] == "replicated" and not (tmp_path / "teachers").exists()
    for name in ("train_task_kl", "train_task_ce", "train_hidden_mse"):  # the teacher ran in every step
        assert len(csv_metric(tmp_path / "run", name)) == 8
    assert 0 <= s["after"]["agreement/top1"] <= 1 and 0 <= s["after"]["student/task_accuracy"] <= 1
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "student")
    assert model.config.id2label[3] == "respiratory"


def _suite(tmp: Path, teacher: Path, models_extra: list[dict]) -> Path:
    suite = {
        "name": "task-suite",
        "output_dir": str(tmp / "eval"),
        "models": [{"name": "teacher", "path": str(teacher)}, *models_extra],
        "tasks": [{"name": "ner-sample", "kind": "ner", "path": NER}],
        "protocol": {"epochs": 1, "lrs": [1e-3], "batch_sizes": [16], "seeds": [1], "max_length": 48},
        "throughput": {"length": 32, "batch_sizes": [1], "seconds": 0.1},
        "deploy": {"onnx": False},
    }
    return write_recipe(tmp / "suite.yaml", suite)


def test_suite_task_recipe_entries_are_checked(tmp_path):
    from biodistill.engine.config import ConfigError
    from biodistill.engine.evaluate.suite import load_suite

    bad = [{"name": "td", "task_recipe": "configs/task/ner-sample.yaml", "teacher": "nobody"}]
    with pytest.raises(ConfigError, match=r"models\[1\]\.teacher: the name of another entry with a path, got 'nobody'"):
        load_suite(_suite(tmp_path, tmp_path, bad))
    both = [{"name": "td", "path": "x", "task_recipe": "configs/task/ner-sample.yaml", "teacher": "teacher"}]
    with pytest.raises(ConfigError, match=r"models\[1\]: give exactly one of path \(a model\), recipe or task_recipe"):
        load_suite(_suite(tmp_path, tmp_path, both))
    negative = [{"name": "td", "task_recipe": "configs/task/ner-sample.yaml", "teacher": "teacher", "epochs": -1}]
    with pytest.raises(ConfigError, match=r"models\[1\]\.epochs: epochs of task distillation, positive .* got -1"):
        load_suite(_suite(tmp_path, tmp_path, negative))
    misplaced = [{"name": "plain", "path": "x", "epochs": 9}]
    with pytest.raises(ConfigError, match=r"models\[1\]\.epochs: epochs of task distillation go with task_recipe"):
        load_suite(_suite(tmp_path, tmp_path, misplaced))


@pytest.mark.multirank
def test_suite_row_of_a_task_distilled_student(tmp_path):
    """A suite entry asks for a task-distilled student with another entry as its teacher: each cell distils one
    (a real one-rank job, stored outputs) and scores it as it is; the teacher's row scores it as it is too."""
    from biodistill.engine.evaluate import cli as evaluate_cli

    teacher = ner_teacher(tmp_path / "teacher", NER_LABELS)  # with its head: no fine-tuning (the NER job tests that)
    recipe = write_recipe(tmp_path / "task.yaml", task_recipe(tmp_path, teacher))
    entry = {"name": "task-distilled", "task_recipe": str(recipe), "teacher": "teacher", "epochs": 0.5}
    suite = _suite(tmp_path, teacher, [entry])
    doc = yaml.safe_load(suite.read_text())
    doc["models"][0]["finetune"] = False  # the teacher has its head: scored as it is
    assert evaluate_cli.main(["--config", str(write_recipe(suite, doc))]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    row = results["models"]["task-distilled"]
    assert row["path"].endswith("task-distilled from teacher in each cell)") and "ner-sample" in row["tasks"]
    assert (
        "Task-distilled for their own epochs (not the protocol's): task-distilled (0.5 epochs)."
        in (tmp_path / "eval" / "results.md").read_text()
    )
    assert 0 <= row["tasks"]["ner-sample"]["test_mean"] <= 1
    cell = tmp_path / "eval" / "cells" / "task-distilled" / "ner-sample" / "lr0.001-bs16-seed1"
    metrics = json.loads((cell / "metrics.json").read_text())
    assert metrics["train_loss"] is None
    assert metrics["distillation"]["steps"] == 8  # the entry's epochs: ceil(0.5 x 240 / 16)
    assert metrics["distillation"]["task"]["teacher_outputs"].startswith("stored in")
    assert 0 < metrics["distillation"]["seconds"] < metrics["seconds"]  # the cell's cost includes its distillation
    teacher_cell = tmp_path / "eval" / "cells" / "teacher" / "ner-sample" / "lr0.001-bs16-seed1" / "metrics.json"
    assert json.loads(teacher_cell.read_text())["train_loss"] is None  # finetune: false
    assert not (cell / "distil").exists()  # the cell keeps its scores, not its model


@pytest.mark.parametrize("name", ["ner-sample", "triage-sample"])
def test_shipped_task_recipes_read_their_task(name):
    from conftest import REPO

    from biodistill.engine.config import load_recipe
    from biodistill.engine.losses import validate_terms
    from biodistill.engine.task.plan import read

    recipe = load_recipe(REPO / "configs" / "task" / f"{name}.yaml")
    validate_terms(recipe)
    task = read(recipe)
    assert recipe.is_task and len(task.splits["train"]) == 240 and len(task.labels) in (4, 5)


def test_a_model_scored_as_it_is_needs_its_trained_head(tmp_path, capsys):
    from biodistill.engine.evaluate import cli as evaluate_cli

    base = make_bert(tmp_path / "base", layers=1, mlm_head=False)
    entry = {"name": "as-is", "path": str(base), "finetune": False}
    assert evaluate_cli.main(["--config", str(_suite(tmp_path, base, [entry]))]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            f"{base}: models[1].path: has no trained TokenClassification head (BertModel) to score on task 'ner-sample' as it "
            "is (finetune: false)"
        )
    )


def test_checkpoints_from_before_task_recipes_resume_and_task_changes_are_refused(tmp_path, tiny_teacher, tiny_corpus):
    from conftest import recipe_dict

    from biodistill.engine.config import load_recipe
    from biodistill.engine.runtime.preflight import recipe_changes

    mlm = [{"kind": "mlm"}]
    general = load_recipe(write_recipe(tmp_path / "g.yaml", recipe_dict(tiny_teacher, tiny_corpus, tmp_path, mlm)))
    saved = general.to_dict()
    del saved["task"]  # what a checkpoint written before the task section records
    assert recipe_changes(saved, general) == ([], [])
    task = load_recipe(write_recipe(tmp_path / "t.yaml", task_recipe(tmp_path, tiny_teacher)))
    moved = load_recipe(tmp_path / "t.yaml", ["--task.subword_labels", "all", "--task.outputs_dir", "/elsewhere"])
    refused, noted = recipe_changes(task.to_dict(), moved)
    assert [k for k, *_ in refused] == ["task.subword_labels"] and [k for k, *_ in noted] == ["task.outputs_dir"]
