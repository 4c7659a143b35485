"""The scores the papers report, from fixed predictions: seqeval for NER (entity-level, exact span and type,
micro P / R / F1, and per type), scikit-learn for classification and relations, and BioASQ's factoid
measures (written here: no library implements them) for QA.
"""

from __future__ import annotations

from seqeval.metrics import classification_report
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support


def ner_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict:
    """Entity-level micro precision, recall and F1 (seqeval's default mode, IOB2), and the same per type.
    Plain B / I / O labels (one entity type per set, as BioBERT's) are reported as type "entity"."""
    report = classification_report(gold, predicted, output_dict=True, zero_division=0)
    overall = report["micro avg"]
    per_type = {
        ("entity" if name == "_" else name): _prf(values)
        for name, values in report.items()
        if not name.endswith(" avg")
    }
    return {**_prf(overall), "per_type": per_type}


def _prf(values: dict) -> dict:
    return {
        "precision": float(values["precision"]),
        "recall": float(values["recall"]),
        "f1": float(values["f1-score"]),
        "support": int(values["support"]),
    }


def classification_scores(gold: list[str], predicted: list[str]) -> dict:
    """Accuracy (MedNLI), macro-F1 and micro-F1 (multi-class clinical sets)."""
    return {
        "accuracy": float(accuracy_score(gold, predicted)),
        "macro_f1": float(f1_score(gold, predicted, average="macro", zero_division=0)),
        "micro_f1": float(f1_score(gold, predicted, average="micro", zero_division=0)),
    }


def relation_scores(gold: list[str], predicted: list[str], labels: list[str], negative: str) -> dict:
    """Relation extraction as BLURB scores it: with two classes, P / R / F1 of the positive class (GAD,
    EU-ADR); with more, micro P / R / F1 over the positive classes, the negative one excluded (ChemProt,
    DDI). ``negative`` is the no-relation label."""
    if negative not in labels:
        raise ValueError(f"negative label {negative!r} is not among the labels {labels}")
    positives = [label for label in labels if label != negative]
    # micro over the positive classes (with one positive class, that is its own P / R / F1)
    p, r, f, _ = precision_recall_fscore_support(gold, predicted, labels=positives, average="micro", zero_division=0)
    return {
        "precision": float(p),
        "recall": float(r),
        "f1": float(f),
        "accuracy": float(accuracy_score(gold, predicted)),
    }


def bioasq_factoid(candidates: dict[str, list[str]], gold: dict[str, list[list[str]]]) -> dict:
    """BioASQ's factoid measures over the questions in ``gold`` (id -> each exact answer's synonyms), from up
    to 5 ranked candidates per question, each compared case-insensitively with every synonym:
    strict accuracy (the first candidate is right), lenient accuracy (any of the five is), and MRR (mean of
    1 / rank of the first right candidate, 0 when none is). A question with no candidates scores 0."""
    if not gold:
        raise ValueError("no factoid questions in the gold answers")
    strict = lenient = reciprocal = 0.0
    for qid, answers in gold.items():
        right = {s.strip().lower() for synonyms in answers for s in synonyms}
        ranked = [c.strip().lower() for c in candidates.get(qid, [])[:5]]
        rank = next((i + 1 for i, c in enumerate(ranked) if c in right), None)
        if rank is not None:
            strict += rank == 1
            lenient += 1
            reciprocal += 1 / rank
    n = len(gold)
    return {"strict_accuracy": strict / n, "lenient_accuracy": lenient / n, "mrr": reciprocal / n, "questions": n}
