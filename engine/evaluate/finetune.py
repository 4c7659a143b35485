"""One cell of the grid: fine-tune one model on one task at one (lr, batch size, seed) with transformers'
Trainer, as the authors' scripts did, then predict dev and test and score them.

Sub-word alignment (NER): the first piece of a word carries its label and the others -100 ("first"), or
every piece carries it ("all", the authors' ner.py); either way a word's prediction is its first piece's.
Words cut off by ``max_length`` are predicted "O" and counted, as are cut classification inputs and QA
contexts longer than one window (those are read in overlapping windows, not cut).
"""

from __future__ import annotations

import collections
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from ..config import ConfigError, model_location
from ..models import minialbert
from ..runtime import hub
from . import metrics
from .suite import Deploy, Protocol
from .tasks import TaskData, bioasq_id

_HEADS = {
    "ner": AutoModelForTokenClassification,
    "classification": AutoModelForSequenceClassification,
    "relation": AutoModelForSequenceClassification,
    "qa": AutoModelForQuestionAnswering,
}
N_BEST, MAX_ANSWER_TOKENS = 5, 30  # BioASQ takes 5 candidates; answers longer than 30 pieces are not factoids


@dataclass(frozen=True)
class Cell:
    model: str  # suite names
    task: str
    lr: float
    batch_size: int
    seed: int

    @property
    def id(self) -> str:
        return f"{self.model}/{self.task}/lr{self.lr:g}-bs{self.batch_size}-seed{self.seed}"


# Files a saved tokenizer consists of (one suffices). transformers 5 otherwise builds a tokenizer from the
# model's config alone, holding nothing but the special tokens: a model would silently read [UNK]s.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spm.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


def load_tokenizer(path: str, key: str):
    local = Path(model_location(path))
    if local.is_dir() and not any((local / name).is_file() for name in _TOKENIZER_FILES):
        raise ConfigError(path, key, f"no tokenizer saved beside the weights (none of {', '.join(_TOKENIZER_FILES)}); "
                          "save the model's tokenizer into the directory")  # fmt: skip
    try:
        tokenizer = AutoTokenizer.from_pretrained(hub.location(path))
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(path, key, f"no tokenizer could be loaded from it ({type(e).__name__}: {str(e)[:200]}); "
                          "save the model's tokenizer beside its weights") from None  # fmt: skip
    if not tokenizer.is_fast:
        raise ConfigError(
            path, key, "needs a fast (Rust) tokenizer: word and character offsets align labels and answers"
        )
    return tokenizer


def check_weights(path: str, key: str) -> None:
    """A local model directory must hold weights where from_pretrained will look, or its first cell would fail
    after every earlier cell had trained."""
    local = Path(model_location(path))
    if local.is_dir() and not any((local / name).is_file() for name in hub.WEIGHT_FILES):
        have = ", ".join(sorted(f.name for f in local.iterdir())[:8]) or "nothing"
        raise ConfigError(path, key, f"no weights file (none of {', '.join(hub.WEIGHT_FILES)}; it holds {have}): "
                          "save the model with save_pretrained")  # fmt: skip


def model_config(path: str, key: str, task: TaskData, as_is: bool = False):
    """The model's config set up for ``task``'s head. A checkpoint that already has a head of this kind must
    have as many labels as the task: its head would otherwise be silently re-initialised. ``as_is``: the model is
    scored without fine-tuning, so it must have that head, trained (a fresh one would score noise)."""
    try:
        config = minialbert.resolve_config(AutoConfig.from_pretrained(hub.location(path)))
    except (OSError, ValueError) as e:
        raise ConfigError(path, key, f"cannot read its config: {str(e)[:200]}") from None
    kind = task.entry.kind
    if kind != "qa":
        head = "TokenClassification" if kind == "ner" else "SequenceClassification"
        trained = any(a.endswith(f"For{head}") for a in config.architectures or [])
        if as_is and not trained:
            raise ConfigError(path, key, f"has no trained {head} head ({', '.join(config.architectures or ['none'])}) "
                              f"to score on task '{task.entry.name}' as it is (finetune: false)")  # fmt: skip
        if trained and config.num_labels != len(task.labels):
            raise ConfigError(
                path, key, f"its {head} head has {config.num_labels} labels ({', '.join(map(str, config.id2label.values()))}), "
                f"task '{task.entry.name}' has {len(task.labels)} ({', '.join(task.labels)})",
            )  # fmt: skip
        config.num_labels = len(task.labels)
        config.id2label = dict(enumerate(task.labels))
        config.label2id = {label: i for i, label in enumerate(task.labels)}
    return config


def build_model(path: str, key: str, task: TaskData, adapters_only: bool) -> torch.nn.Module:
    config = model_config(path, key, task)
    cls = _HEADS[task.entry.kind]
    try:
        model = cls.from_pretrained(hub.location(path), config=config)
    except ValueError as e:  # e.g. a family without this head (MiniALBERT has no QA head)
        raise ConfigError(path, key, f"no {task.entry.kind} head for it: {str(e)[:200]}") from None
    if adapters_only:
        if not hasattr(model, "train_adapters_only"):
            raise ConfigError(
                path, key.rsplit(".", 1)[0] + ".adapters_only", f"{config.model_type} has no adapters (MiniALBERT has)"
            )
        model.train_adapters_only()
    return model


# ------------------------------------------------------------------------------------ features


class Features(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def ner_features(sentences, tokenizer, labels: list[str], max_length: int, subword: str):
    index = {label: i for i, label in enumerate(labels)}
    enc = tokenizer([s.words for s in sentences], is_split_into_words=True, truncation=True, max_length=max_length)
    rows, firsts, cut = [], [], 0
    for n, s in enumerate(sentences):
        ids, previous, first, aligned = enc.word_ids(n), None, {}, []
        for position, word in enumerate(ids):
            if word is None:
                aligned.append(-100)
            elif word != previous:
                first[word] = position
                aligned.append(index[s.labels[word]])
            else:
                aligned.append(index[s.labels[word]] if subword == "all" else -100)
            previous = word
        cut += len(first) < len(s.words)
        rows.append({"input_ids": enc["input_ids"][n], "attention_mask": enc["attention_mask"][n], "labels": aligned})
        firsts.append(first)
    return Features(rows), firsts, cut


def pair_features(pairs, tokenizer, labels: list[str], max_length: int):
    index = {label: i for i, label in enumerate(labels)}
    texts, others = [p.text for p in pairs], [p.pair for p in pairs] if pairs[0].pair is not None else None
    enc = tokenizer(texts, others, truncation=True, max_length=max_length)
    whole = tokenizer(texts, others, truncation=False)["input_ids"]
    cut = sum(len(ids) > max_length for ids in whole)
    rows = [
        {"input_ids": enc["input_ids"][n], "attention_mask": enc["attention_mask"][n], "labels": index[p.label]}
        | ({"token_type_ids": enc["token_type_ids"][n]} if "token_type_ids" in enc else {})
        for n, p in enumerate(pairs)
    ]
    return Features(rows), cut


def qa_features(questions, tokenizer, protocol: Protocol, train: bool):
    """Question + context windows of ``qa_max_length`` overlapping by ``qa_stride`` (the authors' 384 / 128).
    Training windows point at the first answer, or at [CLS] when the answer is not wholly inside."""
    enc = tokenizer(
        [q.question for q in questions], [q.context for q in questions], truncation="only_second",
        max_length=protocol.qa_max_length, stride=protocol.qa_stride, return_overflowing_tokens=True,
        return_offsets_mapping=True, padding="max_length",
    )  # fmt: skip
    rows, owners, offsets = [], [], []
    for f in range(len(enc["input_ids"])):
        q = questions[enc["overflow_to_sample_mapping"][f]]
        sequence = enc.sequence_ids(f)
        spans = [o if sequence[i] == 1 else None for i, o in enumerate(enc["offset_mapping"][f])]
        row = {"input_ids": enc["input_ids"][f], "attention_mask": enc["attention_mask"][f]}
        if "token_type_ids" in enc:
            row["token_type_ids"] = enc["token_type_ids"][f]
        if train:
            start_pos = end_pos = 0
            if q.answers:
                text, start = q.answers[0]
                end = start + len(text)
                inside = [i for i, s in enumerate(spans) if s is not None]
                if inside and spans[inside[0]][0] <= start and spans[inside[-1]][1] >= end:
                    start_pos = next(i for i in inside if spans[i][1] > start)
                    end_pos = max(i for i in inside if spans[i][0] < end)
            row |= {"start_positions": start_pos, "end_positions": end_pos}
        rows.append(row)
        owners.append(enc["overflow_to_sample_mapping"][f])
        offsets.append(spans)
    windows = collections.Counter(owners)
    return Features(rows), owners, offsets, sum(n > 1 for n in windows.values())


def qa_candidates(questions, owners, offsets, start_logits, end_logits) -> dict[str, list[tuple[str, float]]]:
    """Up to 5 distinct answer strings per BioASQ question, best first: spans from every window of every
    snippet-question with that BioASQ id, scored by start + end logit, compared case-insensitively."""
    best: dict[str, dict[str, tuple[str, float]]] = collections.defaultdict(dict)
    for f, owner in enumerate(owners):
        q, spans = questions[owner], offsets[f]
        starts = np.argsort(start_logits[f])[::-1][:20]
        ends = np.argsort(end_logits[f])[::-1][:20]
        for s in starts:
            for e in ends:
                if spans[s] is None or spans[e] is None or e < s or e - s + 1 > MAX_ANSWER_TOKENS:
                    continue
                text = q.context[spans[s][0] : spans[e][1]].strip()
                score = float(start_logits[f][s] + end_logits[f][e])
                seen = best[bioasq_id(q.id)]
                if text and (text.lower() not in seen or seen[text.lower()][1] < score):
                    seen[text.lower()] = (text, score)
    return {qid: sorted(c.values(), key=lambda x: -x[1])[:N_BEST] for qid, c in best.items()}


# ------------------------------------------------------------------------------------------ a cell

LOG_EVERY = 10  # optimiser steps between the training loss lines a cell writes into its log.jsonl
PROGRESS_SECONDS = 30.0  # at most one progress line this often (and one at the end of training)


class CellProgress(TrainerCallback):
    """What a cell is doing while it trains, so that a slow cell is told from a hung one (a cell of MiniLM on
    NCBI-disease's 5,424 sentences takes over 15 minutes on 2 CPU cores): every Trainer log line goes into the
    cell's log.jsonl as it comes, and a line with the step, epoch, loss and time left is printed at most every
    PROGRESS_SECONDS (each worker process prints its own cells)."""

    def __init__(self, cell_id: str, log):
        self.cell_id, self.log, self.started, self.shown, self.loss = cell_id, log, time.perf_counter(), 0.0, None

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        self.log(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}))
        self.loss = logs.get("loss", self.loss)

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if now - self.shown < PROGRESS_SECONDS and state.global_step < state.max_steps:
            return
        self.shown = now
        elapsed = now - self.started
        left = elapsed / max(state.global_step, 1) * (state.max_steps - state.global_step)
        loss = f", loss {self.loss:.4f}" if self.loss is not None else ""
        print(f"[eval]   {self.cell_id}: step {state.global_step}/{state.max_steps}, epoch {state.epoch:.2f}/"
              f"{args.num_train_epochs:g}{loss}, {_minutes(elapsed)} so far, about {_minutes(left)} left", flush=True)  # fmt: skip


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60)} s" if seconds >= 60 else f"{seconds:.0f} s"


def run_cell(cell: Cell, model_path: str, model_key: str, adapters_only: bool, task: TaskData,
             protocol: Protocol, out: Path, log, deploy: Deploy | None = None,
             train: bool = True) -> tuple[dict, torch.nn.Module]:  # fmt: skip
    """Train, predict, score; writes predictions into ``out``; returns the cell's metrics and the fine-tuned
    model (which the grid does not keep: a cell's record is its scores and predictions). With ``deploy``
    enabled, the model is exported to ONNX Runtime and the test split scored again in fp32 and int8.
    ``train`` False: the model is a task model already (task-distilled): predicted and scored as it is."""
    started = time.perf_counter()
    tokenizer = load_tokenizer(model_path, model_key)
    torch.manual_seed(cell.seed)  # the new head's init
    model = build_model(model_path, model_key, task, adapters_only)
    kind = task.entry.kind
    splits, extra = {}, {}
    for name, rows in task.splits.items():
        if kind == "ner":
            ds, firsts, cut = ner_features(rows, tokenizer, task.labels, protocol.max_length, task.entry.subword_labels)
            splits[name], extra[name] = ds, firsts
        elif kind == "qa":
            ds, owners, offsets, cut = qa_features(rows, tokenizer, protocol, train=name == "train")
            splits[name], extra[name] = ds, (owners, offsets)
        else:
            ds, cut = pair_features(rows, tokenizer, task.labels, protocol.max_length)
            splits[name] = ds
        extra[f"{name}_cut"] = cut
    collator = (
        DataCollatorForTokenClassification(tokenizer) if kind == "ner"
        else default_data_collator if kind == "qa" else DataCollatorWithPadding(tokenizer)
    )  # fmt: skip
    args = TrainingArguments(
        output_dir=str(out / "trainer"), learning_rate=cell.lr, per_device_train_batch_size=cell.batch_size,
        per_device_eval_batch_size=64, num_train_epochs=protocol.epochs, weight_decay=protocol.weight_decay,
        # transformers 5 reads a warmup_steps below 1 as a fraction of the steps (warmup_ratio is deprecated)
        lr_scheduler_type=protocol.schedule, warmup_steps=protocol.warmup_ratio, seed=cell.seed,
        save_strategy="no", eval_strategy="no", logging_strategy="steps", logging_steps=LOG_EVERY, report_to=[],
        disable_tqdm=True, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=splits["train"], data_collator=collator)
    trainer.remove_callback(PrinterCallback)  # its lines go to the cell's log.jsonl instead, as they come
    trainer.add_callback(CellProgress(cell.id, log))
    trained = trainer.train() if train else None
    result = {
        "cell": cell.id, "train_loss": float(trained.training_loss) if trained else None,
        "train_seconds": trained.metrics["train_runtime"] if trained else 0.0,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "truncated": {name: extra[f"{name}_cut"] for name in task.splits},
    }  # fmt: skip
    for name in ("dev", "test"):
        prediction = trainer.predict(splits[name])
        scores, rows = _score(task, name, prediction, extra.get(name))
        if kind == "ner" and protocol.subword_f1:
            scores["subword_f1"] = subword_f1(task.labels, splits[name], prediction.predictions)
        result[name] = scores
        _write_jsonl(out / f"predictions_{name}.jsonl", rows)
        if kind == "qa" and name == "test":
            submission = {"questions": [{"id": r["id"], "type": "factoid", "exact_answer": [[c] for c in r["candidates"]],
                                         "ideal_answer": ""} for r in rows]}  # fmt: skip
            (out / "bioasq_submission.json").write_text(json.dumps(submission, indent=1))
    if deploy is not None and deploy.enabled():
        result |= deployed_scores(model, tokenizer, task, splits["test"], extra.get("test"), collator, deploy.int8, out)
    result["seconds"] = time.perf_counter() - started
    return result, model


def deployed_scores(model, tokenizer, task: TaskData, test, extra, collator, int8: bool, out: Path) -> dict:
    """The test split scored through ONNX Runtime, fp32 and int8, from this cell's fine-tuned model exported
    as biodistill-export would (then deleted: the cell keeps its scores, not its models)."""
    from types import SimpleNamespace

    from ..deploy.export import export, session

    source, target = out / "deploy-model", out / "deploy-onnx"
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    try:
        exported = export(str(source), target, int8=int8)
        names = exported.report["inputs"]
        scores = {}
        for label, path in (("onnx", exported.fp32), ("int8", exported.int8)):
            if path is None:
                continue
            runner = session(path)
            outputs = [[] for _ in exported.report["outputs"]]
            for start in range(0, len(test), 64):
                batch = collator([test[i] for i in range(start, min(start + 64, len(test)))])
                ids = batch["input_ids"].numpy()  # features without token_type_ids mean zeros, as in PyTorch
                feed = {n: batch[n].numpy() if n in batch else np.zeros_like(ids) for n in names}
                for kept, got in zip(outputs, runner.run(None, feed)):
                    kept.append(got)
            joined = [_concat(parts) for parts in outputs]
            prediction = SimpleNamespace(predictions=tuple(joined) if len(joined) > 1 else joined[0])
            scores[f"test_{label}"], _ = _score(task, "test", prediction, extra)
        scores["deploy"] = {k: exported.report[k] for k in ("fp32_max_abs_diff", "int8") if k in exported.report}
        return scores
    finally:
        shutil.rmtree(source, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    """Batches of outputs stacked; per-token logits ([B, T, C], T the batch's longest) padded to one T first."""
    if parts[0].ndim < 3:
        return np.concatenate(parts)
    width = max(p.shape[1] for p in parts)
    return np.concatenate([np.pad(p, [(0, 0), (0, width - p.shape[1]), (0, 0)]) for p in parts])


def _score(task: TaskData, split: str, prediction, extra) -> tuple[dict, list[dict]]:
    kind, rows = task.entry.kind, task.splits[split]
    if kind == "qa":
        owners, offsets = extra
        start_logits, end_logits = prediction.predictions
        found = qa_candidates(rows, owners, offsets, start_logits, end_logits)
        if split == "test":
            gold = task.gold
        else:  # dev questions come with their SQuAD answers: each answer text is a gold answer
            gold = collections.defaultdict(list)
            for q in rows:
                gold[bioasq_id(q.id)] += [[text] for text, _ in q.answers]
        ranked = {qid: [text for text, _ in c] for qid, c in found.items()}
        out = [{"id": qid, "candidates": ranked.get(qid, [])} for qid in sorted({bioasq_id(q.id) for q in rows})]
        return metrics.bioasq_factoid(ranked, dict(gold)), out
    best = prediction.predictions.argmax(-1)
    if kind == "ner":
        gold, predicted, out = [], [], []
        for n, s in enumerate(rows):
            first = extra[n]  # word -> its first piece's position; words cut off are predicted "O"
            words = [task.labels[best[n][first[w]]] if w in first else "O" for w in range(len(s.words))]
            gold.append(s.labels)
            predicted.append(words)
            out.append({"where": s.where, "words": s.words, "gold": s.labels, "predicted": words})
        return metrics.ner_scores(gold, predicted), out
    predicted = [task.labels[i] for i in best]
    gold = [p.label for p in rows]
    out = [{"where": p.where, "gold": p.label, "predicted": y} for p, y in zip(rows, predicted)]
    if kind == "relation":
        return metrics.relation_scores(gold, predicted, task.labels, task.negative), out
    return metrics.classification_scores(gold, predicted), out


def subword_f1(labels: list[str], features: Features, logits: np.ndarray) -> float:
    """Entity F1 as the compact models' ner.py computes it: seqeval over each sentence's sub-word sequence, every
    position whose label is not -100 (with ``subword_labels: all``, every piece of every word). Not word-level F1: a
    word of k pieces counts k times, and an entity split across pieces is scored piece by piece."""
    gold, predicted = [], []
    best = logits.argmax(-1)
    for n, row in enumerate(features.rows):
        kept = [p for p, label in enumerate(row["labels"]) if label != -100]
        gold.append([labels[row["labels"][p]] for p in kept])
        predicted.append([labels[best[n][p]] for p in kept])
    return metrics.ner_scores(gold, predicted)["f1"]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
