"""Readers for the downstream sets users have on disk, in the formats their producers distribute
(../shared/reference/evaluation.md): BioBERT's preprocessed NER and RE TSVs, CoNLL columns, MedNLI jsonl,
generic csv / tsv / jsonl, BioASQ factoid in SQuAD format with BioASQ's golden JSON.

Every problem is a ConfigError naming the file and line (``ncbi/devel.tsv:118``) and the field at fault,
found when the suite starts, before any cell trains: bad data never costs a finished cell.
"""

from __future__ import annotations

import csv
import json
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config import ConfigError, resolve_path
from .suite import TaskEntry

SPLITS = ("train", "dev", "test")
# Words in a file's name that say which split it holds (MedNLI: mli_dev_v1.jsonl; BioBERT: devel.tsv).
_SPLIT_WORDS = {"train": {"train"}, "dev": {"dev", "devel", "valid", "validation", "val"}, "test": {"test"}}
# Excel and Windows tools start csv/tsv files with a byte-order mark; utf-8-sig drops it, as pandas does.
TEXT = "utf-8-sig"
_EXTENSIONS = {".tsv", ".txt", ".conll", ".iob", ".iob2", ".bio", ".jsonl", ".json", ".csv"}
DEV_FRACTION = 0.1  # of train, when a set has no dev split (GAD, EU-ADR)
TRAIN_DEV = "train_dev.tsv"  # BioBERT's NER folders: train + devel concatenated


@dataclass
class Sentence:  # ner
    words: list[str]
    labels: list[str]
    where: str  # file:line of its first token


@dataclass
class Pair:  # classification, relation
    text: str
    pair: Optional[str]
    label: str
    where: str


@dataclass
class Question:  # qa
    id: str
    question: str
    context: str
    answers: list[tuple[str, int]]  # (text, answer_start); empty in test files
    where: str


@dataclass
class TaskData:
    entry: TaskEntry
    labels: list[str]  # the label set, from train (qa: none)
    splits: dict[str, list] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # split -> where it came from
    gold: Optional[dict[str, list[list[str]]]] = None  # qa: BioASQ id -> synonym lists of each exact answer
    negative: str = ""  # relation: the no-relation label, which the scores exclude


def read_task(task: TaskEntry, key: str) -> TaskData:
    """All three splits of ``task`` (``key``: its place in the suite, e.g. ``tasks[0]``), checked."""
    files = _split_files(task, key)
    fmt = _format(task, files["train"], key)
    reader = _READERS[fmt]
    splits = {name: reader(path, task) for name, path in files.items() if path is not None}
    sources = {name: str(path) for name, path in files.items() if path is not None}
    if task.kind == "ner" and files["dev"] is not None and files["dev"].name == TRAIN_DEV:
        # BioBERT's train_dev.tsv is train + devel: the authors' validation is it less the train sentences.
        splits["dev"] = _less_train(splits["dev"], splits["train"])
        sources["dev"] = f"{files['dev']} less the sentences of {files['train'].name}"
    elif task.kind == "ner" and not task.dev and files["dev"] and (files["dev"].parent / TRAIN_DEV).is_file():
        _agrees_with_train_dev(files["dev"], splits, reader, task)
    if files["dev"] is None:  # a fixed 10% of train, the same for every model and seed
        rows = splits["train"]
        order = list(range(len(rows)))
        random.Random(0).shuffle(order)
        cut = max(1, int(len(rows) * DEV_FRACTION))
        splits["dev"] = [rows[i] for i in sorted(order[:cut])]
        splits["train"] = [rows[i] for i in sorted(order[cut:])]
        sources["dev"] = f"{files['train']} (a fixed {DEV_FRACTION:.0%} of it: the set has no dev split)"
    for name in SPLITS:
        if not splits[name]:
            raise ConfigError(sources[name], f"{key}.{name}", f"the {name} split is empty")
    data = TaskData(task, labels=[], splits=splits, files=sources)
    if task.kind != "qa":
        data.labels = _labels(task, splits)
    if task.kind == "relation":
        data.negative = _negative(task, data.labels, key)
    if task.kind == "qa":
        data.gold = read_bioasq_gold(resolve_path(task.gold), f"{key}.gold")
        _check_gold(splits["test"], data.gold, str(resolve_path(task.gold)), f"{key}.gold")
    return data


# --------------------------------------------------------------------------------------- the splits


def _split_files(task: TaskEntry, key: str) -> dict[str, Optional[Path]]:
    root = resolve_path(task.path)
    if not root.exists():
        raise ConfigError(task.path, f"{key}.path", "not found")
    named = {"train": task.train, "dev": task.dev, "test": task.test}
    if root.is_file():  # a single file is train; dev and test are named beside it
        base, named["train"] = root.parent, named["train"] or root.name
    else:
        base = root
    out: dict[str, Optional[Path]] = {}
    for split in SPLITS:
        if named[split]:
            path = base / named[split]
            if not path.is_file():
                raise ConfigError(str(path), f"{key}.{split}", "not found")
            out[split] = path
        else:
            out[split] = _find(base, split, key) if root.is_dir() else None
    if out["train"] is None or out["test"] is None:
        missing = [s for s in ("train", "test") if out[s] is None]
        raise ConfigError(
            str(base), f"{key}.{missing[0]}", f"no {missing[0]} file found: name it with {key}.{missing[0]}"
        )
    if out["dev"] is None and task.kind == "ner" and (base / TRAIN_DEV).is_file():
        out["dev"] = base / TRAIN_DEV  # BioBERT's: train + devel; the train sentences are removed below
    return out


def _sentence(s: Sentence) -> tuple:
    return tuple(s.words), tuple(s.labels)


def _less_train(sentences: list[Sentence], train: list[Sentence]) -> list[Sentence]:
    seen = set(map(_sentence, train))
    return [s for s in sentences if _sentence(s) not in seen]


def _agrees_with_train_dev(devel: Path, splits: dict[str, list], reader, task: TaskEntry) -> None:
    """devel.tsv is the dev split; say so when BioBERT's train_dev.tsv beside it, less train, holds other
    sentences (a folder mixing two releases), since the authors' script would have validated on those."""
    derived = _less_train(reader(devel.parent / TRAIN_DEV, task), splits["train"])
    if sorted(map(_sentence, derived)) != sorted(map(_sentence, splits["dev"])):
        print(f"[eval] note: {devel} is the dev split; {TRAIN_DEV} beside it, less train, holds {len(derived)} "
              f"sentences against its {len(splits['dev'])}: they disagree, and the authors' script reads the latter",
              file=sys.stderr, flush=True)  # fmt: skip


def _find(base: Path, split: str, key: str) -> Optional[Path]:
    found = []
    for path in sorted(base.iterdir()):
        if path.suffix.lower() not in _EXTENSIONS or path.name.startswith("."):
            continue
        words = set(re.split(r"[_\-.\s]+", path.stem.lower()))
        if words & _SPLIT_WORDS[split] and not (split == "train" and words & _SPLIT_WORDS["dev"]):
            found.append(path)
    if split == "dev" and len(found) == 2 and TRAIN_DEV in {p.name for p in found}:
        # BioBERT's NER folders hold devel.tsv beside train_dev.tsv (train + devel): one dev split, devel.tsv
        found = [p for p in found if p.name != TRAIN_DEV]
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ConfigError(str(base), f"{key}.{split}", f"several files could be the {split} split ({names}): name one")
    return found[0] if found else None


def _format(task: TaskEntry, train: Path, key: str) -> str:
    if task.format != "auto":
        expected = {"ner": {"biobert", "conll", "jsonl"}, "qa": {"squad"}}.get(
            task.kind, {"mednli", "jsonl", "csv", "tsv", "biobert_re"}
        )
        if task.format not in expected:
            raise ConfigError(task.path, f"{key}.format", f"{task.kind} reads {', '.join(sorted(expected))}")
        return f"ner_{task.format}" if task.kind == "ner" else task.format
    suffix = train.suffix.lower()
    if task.kind == "qa":
        return "squad"
    if task.kind == "ner":
        return "ner_jsonl" if suffix == ".jsonl" else "ner_biobert" if suffix == ".tsv" else "ner_conll"
    if suffix == ".jsonl":
        return "mednli" if "mli" in train.name.lower() else "jsonl"
    if suffix == ".csv":
        return "csv"
    return "biobert_re" if task.kind == "relation" else "tsv"


def _labels(task: TaskEntry, splits: dict[str, list]) -> list[str]:
    """The label set, from train. A dev or test label never seen in training is an error: the model could
    never predict it, and a score against it would mean nothing."""
    if task.kind == "ner":
        known = {label for s in splits["train"] for label in s.labels}
        for name in ("dev", "test"):
            for s in splits[name]:
                for i, label in enumerate(s.labels):
                    if label not in known:
                        raise ConfigError(_line(s.where, i), "label", f"'{label}' is not in the train split's labels ({', '.join(sorted(known))})")  # fmt: skip
        # Outside first, then by entity type and B before I: the head's order, readable in predictions.
        return sorted(known, key=lambda x: (x != "O", x.partition("-")[2], x))
    known = {p.label for p in splits["train"]}
    for name in ("dev", "test"):
        for p in splits[name]:
            if p.label not in known:
                raise ConfigError(p.where, task.label_field, f"'{p.label}' is not in the train split's labels ({', '.join(sorted(known))})")  # fmt: skip
    return sorted(known)


def _negative(task: TaskEntry, labels: list[str], key: str) -> str:
    if task.negative_label:
        if task.negative_label not in labels:
            raise ConfigError(task.path, f"{key}.negative_label", f"'{task.negative_label}' is not a label of the train split ({', '.join(labels)})")  # fmt: skip
        return task.negative_label
    # GAD / EU-ADR: 0; ChemProt: false (BLURB: CPR:false); DDI: DDI-false; TACRED-style sets: no_relation
    guesses = [label for label in labels if re.split(r"[-:]", label.lower())[-1] in _NEGATIVE_WORDS]
    if len(guesses) == 1:
        return guesses[0]
    found = f" ({' and '.join(guesses)} both could)" if guesses else ""
    raise ConfigError(task.path, f"{key}.negative_label", f"which of {', '.join(labels)} means no relation{found}? Name it")  # fmt: skip


_NEGATIVE_WORDS = {"0", "false", "negative", "none", "no_relation", "norelation", "other"}


def _line(where: str, offset: int) -> str:
    path, _, line = where.rpartition(":")
    return f"{path}:{int(line) + offset}"


# ------------------------------------------------------------------------------------------- NER


def read_ner_columns(path: Path, task: TaskEntry, exact: bool) -> list[Sentence]:
    """BioBERT's TSV (``exact``: exactly token<TAB>label) or CoNLL columns (token first, label last,
    whitespace separated, ``-DOCSTART-`` lines skipped). A blank line ends a sentence."""
    sentences, words, labels, start = [], [], [], 0
    with open(path, encoding=TEXT) as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip() or line.startswith("-DOCSTART-"):
                if words:
                    sentences.append(Sentence(words, labels, f"{path}:{start}"))
                words, labels = [], []
                continue
            cols = line.split("\t") if exact else line.split()
            if (exact and len(cols) != 2) or len(cols) < 2:
                want = "token<TAB>label" if exact else "a token and a label"
                raise ConfigError(
                    f"{path}:{number}", "columns", f"{len(cols)} column(s), expected {want}: {line[:80]!r}"
                )
            if not words:
                start = number
            words.append(cols[0])
            labels.append(_label(cols[-1], f"{path}:{number}", "label"))
    if words:
        sentences.append(Sentence(words, labels, f"{path}:{start}"))
    return sentences


def read_ner_jsonl(path: Path, task: TaskEntry) -> list[Sentence]:
    """One sentence a line: ``tokens`` and ``ner_tags`` lists (a Hugging Face dataset's to_json)."""
    out = []
    for number, row in _jsonl(path):
        where = f"{path}:{number}"
        tokens = _typed(_field(row, "tokens", path, number), where, "tokens", "a list of strings", _strings)
        tags = _typed(_field(row, "ner_tags", path, number), where, "ner_tags", "a list of labels (strings or ids)",
                      lambda v: isinstance(v, list) and all(_is_label(t) for t in v))  # fmt: skip
        if len(tokens) != len(tags):
            raise ConfigError(where, "ner_tags", f"{len(tags)} labels for {len(tokens)} tokens")
        out.append(Sentence(tokens, [_named(tag, task, where, "ner_tags", required=True) for tag in tags], where))
    return out


def _named(label, task: TaskEntry, where: str, name: str, required: bool = False) -> str:
    """A label as the scores see it: integer ids become their ``label_names``. NER ids must have names
    (seqeval reads entity types from the B-/I- names); a class id may stand for itself."""
    if not _is_label(label):
        raise ConfigError(where, name, f"{label!r} is not a label: a string or an integer id")
    if isinstance(label, str):
        return _label(label, where, name)
    if not (task.label_names or required):
        return str(label)
    if not task.label_names:
        raise ConfigError(where, name, f"integer label {label}: give the names of the ids as label_names, "
                          "in order (e.g. [O, B-Disease, I-Disease])")  # fmt: skip
    if not 0 <= label < len(task.label_names):
        raise ConfigError(where, name, f"label id {label} is outside label_names ({len(task.label_names)} names)")
    return task.label_names[label]


# --------------------------------------------------------------------------- classification, relation


def read_jsonl_pairs(path: Path, task: TaskEntry, fields=None) -> list[Pair]:
    text, pair, label = fields or (task.text_field, task.text_pair_field, task.label_field)
    out = []
    for number, row in _jsonl(path):
        where = f"{path}:{number}"
        out.append(Pair(
            _typed(_field(row, text, path, number), where, text, "a string", _is_str),
            _typed(_field(row, pair, path, number), where, pair, "a string", _is_str) if pair else None,
            _named(_field(row, label, path, number), task, where, label),
            where,
        ))  # fmt: skip
    return out


def read_mednli(path: Path, task: TaskEntry) -> list[Pair]:
    """MedNLI as distributed: sentence1, sentence2, gold_label (and fields to ignore)."""
    return read_jsonl_pairs(path, task, ("sentence1", "sentence2", "gold_label"))


def read_table(path: Path, task: TaskEntry) -> list[Pair]:
    """csv or tsv with a header row naming the text (and text_pair) and label columns."""
    delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    with open(path, encoding=TEXT, newline="") as f:
        rows = csv.reader(f, delimiter=delimiter)
        header = next(rows, None)
        if header is None:
            return []
        wanted = [c for c in (task.text_field, task.text_pair_field, task.label_field) if c]
        for column in wanted:
            if column not in header:
                raise ConfigError(f"{path}:1", column, f"no such column; the header has {', '.join(header)}")
        index = {c: header.index(c) for c in wanted}
        out = []
        for number, row in enumerate(rows, 2):
            if not row:
                continue
            if len(row) != len(header):
                raise ConfigError(f"{path}:{number}", "columns", f"{len(row)} columns, the header has {len(header)}")
            pair = row[index[task.text_pair_field]] if task.text_pair_field else None
            where, label = f"{path}:{number}", row[index[task.label_field]]
            out.append(Pair(row[index[task.text_field]], pair, _label(label, where, task.label_field), where))
    return out


def read_biobert_re(path: Path, task: TaskEntry) -> list[Pair]:
    """BioBERT's RE TSVs: sentence<TAB>label, entities masked (@GENE$, @DISEASE$, @CHEMICAL$, @DRUG$);
    test files carry an index column and a header line (index, sentence, label)."""
    out = []
    with open(path, encoding=TEXT) as f:
        lines = f.read().splitlines()
    header = lines[0].split("\t") if lines else []
    indexed = [h.strip().lower() for h in header] == ["index", "sentence", "label"]
    for number, line in enumerate(lines[1:] if indexed else lines, 2 if indexed else 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        want = 3 if indexed else 2
        if len(cols) != want:
            shape = "index<TAB>sentence<TAB>label" if indexed else "sentence<TAB>label"
            raise ConfigError(f"{path}:{number}", "columns", f"{len(cols)} column(s), expected {shape}")
        out.append(Pair(cols[-2], None, _label(cols[-1], f"{path}:{number}", "label"), f"{path}:{number}"))
    return out


# ------------------------------------------------------------------------------------------- QA


def read_squad(path: Path, task: TaskEntry) -> list[Question]:
    """SQuAD v1.1 JSON (data -> paragraphs -> context, qas), as BioASQ's factoid sets are distributed for
    training. Every level is checked for its type, and every answer_start must point at its answer text in
    the context."""
    doc = _json(path)
    out = []
    for a, article in enumerate(_list(doc, "data", str(path))):
        for p, paragraph in enumerate(_list(article, "paragraphs", f"{path}: data[{a}]", required=False)):
            at = f"{path}: data[{a}].paragraphs[{p}]"
            context = _typed(_field(paragraph, "context", at, None), at, "context", "a string", _is_str)
            for q, qa in enumerate(_list(paragraph, "qas", at, required=False)):
                where = f"{at}.qas[{q}]"
                qid = _typed(_field(qa, "id", where, None), where, "id", "a string or an integer", _is_label)
                question = _typed(_field(qa, "question", where, None), where, "question", "a string", _is_str)
                answers = []
                for j, answer in enumerate(_list(qa, "answers", where, required=False)):
                    text, start = (answer.get("text"), answer.get("answer_start")) if isinstance(answer, dict) else (None, None)  # fmt: skip
                    if not _is_str(text) or type(start) is not int or context[start : start + len(text)] != text:
                        found = context[start : start + len(text)] if _is_str(text) and type(start) is int else None
                        raise ConfigError(
                            f"{path}: question {qid}", f"answers[{j}].answer_start",
                            f"{start!r} does not point at the answer {text!r} in its context (it reads {found!r})",
                        )  # fmt: skip
                    answers.append((text, start))
                out.append(Question(str(qid), question, context, answers, where))
    return out


def read_bioasq_gold(path: Path, key: str) -> dict[str, list[list[str]]]:
    """BioASQ's golden JSON: questions -> id, type, exact_answer. For factoid questions exact_answer is a
    list of synonym lists (older years: a list of strings, or one string); each becomes synonym lists."""
    if not path.is_file():
        raise ConfigError(str(path), key, "not found")
    doc = _json(path)
    gold = {}
    for i, q in enumerate(_list(doc, "questions", str(path))):
        where = f"{path}: questions[{i}]"
        if not isinstance(q, dict):
            raise ConfigError(where, "question", f"expected an object, got {type(q).__name__}")
        if q.get("type", "factoid") != "factoid":
            continue
        qid = _typed(_field(q, "id", where, None), where, "id", "a string", _is_str)
        exact = q.get("exact_answer")
        if exact is None:
            raise ConfigError(f"{where} ({qid})", "exact_answer", "missing")
        if isinstance(exact, str):
            exact = [[exact]]
        _typed(exact, f"{where} ({qid})", "exact_answer", "a list of synonym lists of strings", _synonym_lists)
        gold[qid] = [[a] if isinstance(a, str) else list(a) for a in exact]
    if not gold:
        raise ConfigError(str(path), key, "no factoid question with an exact_answer: nothing to score the test set on")
    return gold


def _check_gold(test: list[Question], gold: dict[str, list[list[str]]], path: str, key: str) -> None:
    """The golden file must be the test set's: scored against another batch's, every question would be 0."""
    asked = {bioasq_id(q.id) for q in test}
    if not asked & set(gold):
        example = next(iter(sorted(asked)), "")
        raise ConfigError(path, key, f"holds none of the test set's {len(asked)} question ids (e.g. {example!r}): "
                          "is it the golden file of another batch?")  # fmt: skip


def bioasq_id(squad_id: str) -> str:
    """The BioASQ question a SQuAD-format question came from: its id before the "_" suffix (one per snippet)."""
    return squad_id.split("_")[0]


# ----------------------------------------------------------------------------------------- shared


def _jsonl(path: Path):
    with open(path, encoding=TEXT) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{number}", "json", f"not valid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{number}", "json", "expected an object")
            yield number, row


def _json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding=TEXT))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}", "json", f"not valid JSON: {e.msg}") from None


def _is_str(value) -> bool:
    return isinstance(value, str)


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _synonym_lists(value) -> bool:
    return isinstance(value, list) and all(_is_str(a) or _strings(a) for a in value)


def _is_label(value) -> bool:
    """A label in JSON: a string, or an integer id (not a bool, which JSON's true would pass as 1)."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _label(text: str, where: str, name: str) -> str:
    """Labels are names: surrounding whitespace ('O ' from a trailing space) is not a new class."""
    label = text.strip()
    if not label:
        raise ConfigError(where, name, "an empty label")
    return label


def _typed(value, where: str, name: str, expected: str, ok):
    if not ok(value):
        raise ConfigError(where, name, f"expected {expected}, got {type(value).__name__} {str(value)[:40]!r}")
    return value


def _list(row, name: str, where: str, required: bool = True) -> list:
    """``row[name]`` as a list (``[]`` when absent and not ``required``), or an error naming where it is."""
    if not required and isinstance(row, dict) and name not in row:
        return []
    value = _field(row, name, where, None)
    return _typed(value, where, name, "a list", lambda v: isinstance(v, list))


def _field(row: dict, name: str, path, line: Optional[int]):
    if not isinstance(row, dict) or name not in row:
        where = f"{path}:{line}" if line else str(path)
        have = ", ".join(row) if isinstance(row, dict) else type(row).__name__
        raise ConfigError(where, name, f"missing (the entry has {have})")
    return row[name]


_READERS = {
    "ner_biobert": lambda p, t: read_ner_columns(p, t, exact=True),
    "ner_conll": lambda p, t: read_ner_columns(p, t, exact=False),
    "ner_jsonl": read_ner_jsonl,
    "mednli": read_mednli,
    "jsonl": read_jsonl_pairs,
    "csv": read_table,
    "tsv": read_table,
    "biobert_re": read_biobert_re,
    "squad": read_squad,
}
