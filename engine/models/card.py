"""The model card (README.md) written into every exported student, as the published compact models' cards are: what
it was distilled from, how it was initialised, its architecture and parameter count, the distillation procedure
(terms, temperature, layer maps, data, steps, batch), held-out figures, how to load it, and the citation of the
method its recipe reproduces; with Hugging Face's YAML metadata (library, pipeline, base model, datasets, tags), so
that it renders on the Hub and ``huggingface_hub.ModelCard.load`` reads it.
"""

from __future__ import annotations

from typing import Optional

import yaml

_COMPACT_BIOMEDICAL = """@article{rohanian2023effectiveness,
  title = {On the effectiveness of compact biomedical transformers},
  author = {Rohanian, Omid and Nouriborji, Mohammadmahdi and Kouchaki, Samaneh and Clifton, David A.},
  journal = {Bioinformatics},
  volume = {39},
  number = {3},
  pages = {btad103},
  year = {2023},
  doi = {10.1093/bioinformatics/btad103}
}"""
_LIGHTWEIGHT_CLINICAL = """@article{rohanian2023lightweight,
  title = {Lightweight transformers for clinical natural language processing},
  author = {Rohanian, Omid and Nouriborji, Mohammadmahdi and Jauncey, Hannah and Kouchaki, Samaneh and
            Nooralahzadeh, Farhad and Clifton, Lei and Merson, Laura and Clifton, David A. and
            ISARIC Clinical Characterisation Group},
  journal = {Natural Language Engineering},
  pages = {1--28},
  year = {2023},
  publisher = {Cambridge University Press}
}"""
_MINILMV2 = """@inproceedings{wang2021minilmv2,
  title = {{MiniLMv2}: Multi-Head Self-Attention Relation Distillation for Compressing Pretrained Transformers},
  author = {Wang, Wenhui and Bao, Hangbo and Huang, Shaohan and Dong, Li and Wei, Furu},
  booktitle = {Findings of the Association for Computational Linguistics: ACL-IJCNLP 2021},
  pages = {2140--2151},
  year = {2021}
}"""
# recipe name -> (the published model it reproduces, the paper that describes the method)
REPRODUCES: dict[str, tuple[str, str]] = {
    **{name: (name, _COMPACT_BIOMEDICAL) for name in
       ("DistilBioBERT", "CompactBioBERT", "TinyBioBERT", "BioDistilBERT", "BioTinyBERT", "BioMobileBERT")},
    **{name: (name, _LIGHTWEIGHT_CLINICAL) for name in
       ("DistilClinicalBERT", "TinyClinicalBERT", "ClinicalDistilBERT", "ClinicalMobileBERT",
        "clinical-miniALBERT-312", "clinical-miniALBERT-128")},
    "BioMiniLM-L6-H384": ("MiniLMv2's relation distillation", _MINILMV2),
}  # fmt: skip


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").removesuffix("smoke")


def reproduced(recipe_name: str) -> Optional[tuple[str, str]]:
    """(what the recipe reproduces, its BibTeX) for a shipped recipe's name, else None."""
    return next((v for k, v in REPRODUCES.items() if _key(k) == _key(recipe_name)), None)


def _hub_name(path: str) -> Optional[str]:
    """``org/name`` when ``path`` is a hub name (what the Hub's base_model field takes), else None."""
    parts = path.split("/")
    return path if len(parts) == 2 and all(parts) and not path.startswith((".", "/", "~", "pkg:")) else None


def _task_lines(task: dict) -> list[str]:
    return [
        "## Task", "",
        f"A {task['kind']} model over the labels {', '.join(f'`{x}`' for x in task['labels'])}, task-distilled "
        f"(TinyBERT's second stage) from the fine-tuned teacher `{task['teacher']}`; the teacher's outputs were "
        f"{task['teacher_outputs'].split(' (')[0].split(':')[0]}.", "",
    ]  # fmt: skip


def model_card(record: dict, config, parameters: int, mlm_head: bool, heldout: Optional[dict] = None) -> str:
    """The README.md of an exported student. ``record`` is its distillation.json (what the trainer knows of the
    job), ``config`` the student's config, ``heldout`` the held-out figures before and after distillation."""
    teacher, student = record.get("teacher") or "", record.get("student", {})
    losses, data = record.get("losses", {}), record.get("data", {})
    method = reproduced(record.get("recipe", ""))
    domain = "clinical" if "clinical" in record.get("recipe", "").lower() else "biomedical"
    task = record.get("task")  # a task-distilled student: its head is the task's
    pipeline = "fill-mask" if mlm_head else "feature-extraction"
    head = "AutoModelForMaskedLM" if mlm_head else "AutoModel"
    if task:
        per_token = task["kind"] == "ner"
        pipeline = "token-classification" if per_token else "text-classification"
        head = "AutoModelForTokenClassification" if per_token else "AutoModelForSequenceClassification"
    meta = {
        "library_name": "transformers",
        "pipeline_tag": pipeline,
        "language": ["en"],
        "tags": ["biodistill", "knowledge-distillation", domain, config.model_type],
    }
    if base := _hub_name(teacher):
        meta["base_model"] = base
    if data.get("dataset"):
        meta["datasets"] = [data["dataset"]]
    init = student.get("init")
    if init == "teacher_layers":
        start = f"the teacher's embeddings and its layers {student.get('teacher_layers')} (0-indexed), copied"
    elif init == "checkpoint":
        start = f"the checkpoint `{student.get('path')}`, continued"
    else:
        start = "a random initialisation of the configuration below"
    terms = losses.get("terms", [])
    rows = ["| term | weight | layer map | temperature |", "|---|---|---|---|"]
    for t in terms:
        temperature = t.get("temperature") or (
            losses.get("temperature") if t["kind"] in ("logit_kl", "soft_ce") else None
        )
        rows.append(
            f"| `{t['kind']}` | {t.get('weight', 1.0):g} | {t.get('layer_map', 'last')} | {temperature or '-'} |"
        )
    corpus = ", ".join(f"`{f}`" for f in data.get("train_files") or []) or f"the `{data.get('dataset')}` dataset"
    if task:
        corpus = f"the task's examples ({task['examples']})" + (
            f" with unlabeled sentences of {corpus}" if data.get("train_files") else ""
        )
        meta["tags"].append("task-distillation")
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {record.get('recipe', 'student')}", "",
        "## Model description", "",
        f"A compact {domain} encoder distilled from `{teacher or 'no teacher'}` with biodistill (recipe "
        f"`{record.get('recipe_file', '')}`)" + (f", reproducing {method[0]}." if method else "."), "",
        "## Initialisation", "", f"The student starts from {start}.", "",
        "## Architecture", "",
        f"{config.model_type}, {getattr(config, 'num_hidden_layers', '?')} layers, hidden size "
        f"{getattr(config, 'hidden_size', getattr(config, 'dim', '?'))}, "
        f"{getattr(config, 'num_attention_heads', getattr(config, 'n_heads', '?'))} attention heads, vocabulary "
        f"{config.vocab_size:,}: {parameters:,} parameters" + (
            f" (with its {task['kind']} head)." if task else " (with its masked-LM head)." if mlm_head else "."), "",
        *(_task_lines(task) if task else []),
        "## Distillation", "",
        f"{record.get('steps', 0):,} optimiser steps of {record.get('global_batch', '?')} sequences of "
        f"{data.get('max_length', '?')} tokens on {corpus}, in {record.get('precision', 'fp32')}, under DeepSpeed. "
        "The loss is the weighted sum of these terms (layer maps pair student with teacher layers; hidden state 0 "
        "is the embeddings):", "",
        *rows, "",
    ]  # fmt: skip
    if heldout and heldout.get("before") and heldout.get("after"):
        lines += [("The task's dev split" if task else "Held-out documents") + " (never trained on), before and after "
                  "distillation:", "",
                  "| metric | before | after |", "|---|---|---|"]  # fmt: skip
        lines += [
            f"| {k} | {v:.4f} | {heldout['after'].get(k, float('nan')):.4f} |" for k, v in heldout["before"].items()
        ]
        lines.append("")
    lines += [
        "## How to use", "", "```python", f"from transformers import AutoTokenizer, {head}", "",
        'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_HUB_NAME")',
        f'model = {head}.from_pretrained("PATH_OR_HUB_NAME")', "```", "",
        "Score it with `biodistill-evaluate` (`finetune: false` scores it as it is)" if task else
        "Fine-tune and score it on biomedical tasks with `biodistill-evaluate`",
        "and deploy it with `biodistill-export`.",
    ]  # fmt: skip
    if method:
        lines += ["", "## Citation", "", "If you use this model, please cite the paper whose method it reproduces:", "",
                  "```bibtex", method[1], "```"]  # fmt: skip
    return "\n".join(lines) + "\n"
