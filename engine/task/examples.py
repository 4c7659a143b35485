"""A task's examples as the engine trains on them.

The labelled splits are read by biodistill-evaluate's readers (``evaluate/tasks.py``) and tokenised by its
feature code (``evaluate/finetune.py``), so a task recipe and an evaluation read a set identically. Unlabeled text
(``data.train_files``, any corpus format the engine reads) is split into the task's units, sentences, each with no
gold label (-100): the teacher's soft outputs are all the student learns from it. Sentences that occur in the
task's dev or test split are left out (the teacher would otherwise label the student's exam).

Every example has one index, train first, then dev: the sampler, the ledger and the stored teacher outputs name
an example by it.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import Recipe, data_files
from ..evaluate.tasks import TaskData, read_task

# A sentence ends at . ! or ? followed by space and a capital, digit or bracket (abbreviations such as "e.g." or
# "et al." are followed by a lower-case word and stay inside). Words: BioBERT's NER files split punctuation off.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")
_WORD = re.compile(r"\w+|[^\w\s]")
MIN_WORDS = 3  # shorter pieces (headings, stray numbers) teach nothing


@dataclass
class TaskExamples:
    task: TaskData
    train: list[dict]  # labelled train examples, then unlabeled sentences (labels all -100)
    heldout: list[dict]  # the dev split
    unlabeled: int  # of train
    cut: int  # examples longer than data.max_length, cut
    left_out: int  # unlabeled sentences that are in the dev or test split

    @property
    def every(self) -> list[dict]:
        """Train then dev: the order the stored teacher outputs are indexed by."""
        return self.train + self.heldout

    def digest(self) -> str:
        """What decides the teacher's outputs on them: every example's token ids and segments, in order."""
        h = hashlib.sha256()
        for row in self.every:
            h.update(repr((row["input_ids"], row.get("token_type_ids"))).encode())
        return h.hexdigest()

    def describe(self) -> str:
        s = self.task.splits
        text = f"{len(s['train'])} labelled and {self.unlabeled} unlabeled training examples, {len(s['dev'])} dev"
        return text + (f"; {self.cut} cut at data.max_length" if self.cut else "")


def read(recipe: Recipe) -> TaskData:
    """The task's splits, checked (every error names the file and the ``task`` key)."""
    return read_task(recipe.task, "task")


def build(recipe: Recipe, task: TaskData, tokenizer) -> TaskExamples:
    from ..evaluate.finetune import ner_features, pair_features  # transformers' Trainer: imported when used

    kind, length = recipe.task.kind, recipe.data.max_length
    if kind == "ner":
        train, _, cut = ner_features(task.splits["train"], tokenizer, task.labels, length, recipe.task.subword_labels)
        dev, _, _ = ner_features(task.splits["dev"], tokenizer, task.labels, length, recipe.task.subword_labels)
    else:
        train, cut = pair_features(task.splits["train"], tokenizer, task.labels, length)
        dev, _ = pair_features(task.splits["dev"], tokenizer, task.labels, length)
    exam = {tuple(_words(_text(row))) for split in ("dev", "test") for row in task.splits[split]}
    sentences, left_out = [], 0
    for words in unlabeled_sentences(recipe):
        if tuple(words) in exam:
            left_out += 1
            continue
        sentences.append(words)
    extra = unlabeled_features(sentences, tokenizer, kind, length)
    return TaskExamples(task, list(train.rows) + extra, list(dev.rows), len(extra), cut, left_out)


def _text(row) -> str:
    return " ".join(row.words) if hasattr(row, "words") else row.text


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def sentences_of(text: str) -> Iterator[list[str]]:
    """A document's sentences, each as words (punctuation split off, as BioBERT's NER files have it)."""
    for line in text.splitlines():
        for sentence in _SENTENCE_END.split(line.strip()):
            words = _words(sentence)
            if len(words) >= MIN_WORDS:
                yield words


def unlabeled_sentences(recipe: Recipe) -> Iterator[list[str]]:
    """Sentences of ``data.train_files``, in file order, up to ``task.max_unlabeled`` (0: all)."""
    from ..data import corpora

    if not recipe.data.train_files:
        return
    options, skipped, n = corpora.read_options(recipe.data), Counter(), 0
    for _, path in data_files(recipe.data, recipe.source):
        for _, text in corpora.read(path, options, skipped):
            for words in sentences_of(text or ""):
                yield words
                n += 1
                if n == recipe.task.max_unlabeled:
                    return


def unlabeled_features(sentences: list[list[str]], tokenizer, kind: str, max_length: int) -> list[dict]:
    if not sentences:
        return []
    if kind == "ner":
        enc = tokenizer(sentences, is_split_into_words=True, truncation=True, max_length=max_length)
        return [
            {"input_ids": ids, "attention_mask": mask, "labels": [-100] * len(ids)}
            for ids, mask in zip(enc["input_ids"], enc["attention_mask"])
        ]
    enc = tokenizer([" ".join(s) for s in sentences], truncation=True, max_length=max_length)
    return [
        {"input_ids": enc["input_ids"][n], "attention_mask": enc["attention_mask"][n], "labels": -100}
        | ({"token_type_ids": enc["token_type_ids"][n]} if "token_type_ids" in enc else {})
        for n in range(len(sentences))
    ]


class TaskView:
    """The sampler's view of a list of examples: ``view[(epoch, i)]`` is ``(example, epoch, offset + i)``, the
    index every example keeps (train first, dev after)."""

    def __init__(self, rows: list[dict], offset: int = 0):
        self.rows, self.offset = rows, offset

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> tuple[dict, int, int]:
        epoch, i = key
        return self.rows[i], epoch, self.offset + i


class TaskCollator:
    """Pads a batch of examples: ``input_ids``, ``attention_mask``, ``labels`` (-100 where there is no gold label
    or no token), ``token_type_ids`` for pair tasks, and, when the teacher's outputs are stored, ``teacher_logits``
    ([B, T, C] per token, zero at padding; [B, C] per example). ``rows`` is empty: no MLM head runs."""

    def __init__(self, tokenizer, per_token: bool, stored: Optional[list[torch.Tensor]] = None):
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.per_token, self.stored = per_token, stored

    def __call__(self, items: list[tuple[dict, int, int]]) -> dict:
        rows = [row for row, _, _ in items]
        width = max(len(r["input_ids"]) for r in rows)

        def pad(key: str, value) -> torch.Tensor:
            return torch.tensor([r[key] + [value] * (width - len(r[key])) for r in rows], dtype=torch.long)

        batch = {
            "input_ids": pad("input_ids", self.pad_id),
            "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", -100) if self.per_token else torch.tensor([r["labels"] for r in rows]),
            "rows": torch.empty(0, dtype=torch.long),
            "padded": any(len(r["input_ids"]) < width for r in rows),
            "sample_epochs": torch.tensor([e for _, e, _ in items]),
            "sample_ids": torch.tensor([i for _, _, i in items]),
        }
        if "token_type_ids" in rows[0]:
            batch["token_type_ids"] = pad("token_type_ids", 0)
        if self.stored is not None:
            logits = [self.stored[i] for _, _, i in items]
            if self.per_token:
                out = logits[0].new_zeros(len(logits), width, logits[0].shape[-1])
                for b, x in enumerate(logits):
                    out[b, : x.shape[0]] = x
                batch["teacher_logits"] = out
            else:
                batch["teacher_logits"] = torch.stack(logits)
        return batch
