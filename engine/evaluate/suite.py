"""An evaluation suite: which models to fine-tune on which tasks, under which protocol. YAML in
``configs/eval/``, dotted overrides from the command line, every error naming the file and key.

The protocol defaults are the authors' (Lightweight-Clinical-Transformers' RE-CLS-Finetuning.py): 3 epochs,
lr grid {5e-5, 2e-5, 1e-5}, batch 16, linear schedule, weight decay 0.01; we add seeds (3), because single
runs of small biomedical sets vary by a point or more of F1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..config import ConfigError, TaskEntry, load_typed

KINDS = ("ner", "classification", "relation", "qa")
__all__ = ["TaskEntry"]  # the task schema lives in config.py: task recipes read tasks as suites do
# The score each kind is compared by (the grid picks the lr by it on validation; the table reports it).
DEFAULT_METRIC = {"ner": "f1", "classification": "accuracy", "relation": "f1", "qa": "mrr"}
METRICS = {
    "ner": ("f1", "precision", "recall"),
    "classification": ("accuracy", "macro_f1", "micro_f1"),
    "relation": ("f1", "precision", "recall", "accuracy"),
    "qa": ("mrr", "strict_accuracy", "lenient_accuracy"),
}


@dataclass
class ModelEntry:
    name: str = ""  # its row in the table
    # A Hugging Face directory or hub name, pkg://<package>/<dir>, a student this engine exported
    # (runs/<recipe>/student) or a published MiniALBERT checkpoint.
    path: str = ""
    # Or: the student a distillation recipe starts from, before any training (its copy of teacher layers,
    # or its random init): "how much did distillation add?"
    recipe: str = ""
    # Or: a task recipe (configs/task/*.yaml): this row is its student task-distilled on each task, under the
    # protocol's lr, batch size, epochs and seed (one distillation a cell), then scored as it is
    task_recipe: str = ""
    teacher: str = ""  # task_recipe: the entry whose model teaches (fine-tuned on each task first, cached)
    student: str = ""  # task_recipe: the entry whose model the student starts from (empty: the recipe's student)
    # task_recipe: epochs of distillation over the labelled train split (0: the protocol's epochs). A task
    # distillation gains from running longer than a fine-tuning (docs/task.md, "How long to distil").
    epochs: float = 0.0
    adapters_only: bool = False  # MiniALBERT: train only its bottleneck adapters and the task head
    finetune: bool = True  # false: a task model already (a task-distilled student): scored as it is, one cell a seed


@dataclass
class Protocol:
    epochs: float = 3.0
    lrs: list[float] = field(default_factory=lambda: [5e-5, 2e-5, 1e-5])
    batch_sizes: list[int] = field(default_factory=lambda: [16])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    weight_decay: float = 0.01
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = 0.0
    max_length: int = 128  # tokens; longer sentences are cut, and counted in the report
    qa_max_length: int = 384  # question + context window, the authors' value; longer contexts overlap by
    qa_stride: int = 128
    # ner: also score as the compact models' ner.py does (seqeval over the sub-word sequences, every piece carrying its
    # word's label): the figure their paper reports, a column of its own; word-level entity F1 stays the score
    subword_f1: bool = False
    # Processes: "auto" is one per visible GPU, and one on a CPU (cells then run one after another).
    workers: int | Literal["auto"] = "auto"


@dataclass
class Throughput:
    length: int = 128
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    seconds: float = 2.0  # timed per measurement, after a warm-up


@dataclass
class Deploy:
    """The fine-tuned models as they would be deployed (biodistill.engine.deploy): every cell's model is exported
    to ONNX Runtime and its test split scored again in fp32 and int8; each model's ORT throughput and size on
    disk join the costs. "auto": on where there is no GPU (CPU serving is what ORT int8 is for)."""

    onnx: bool | Literal["auto"] = "auto"
    int8: bool = True  # with onnx: the int8 model too (made from the ONNX export)

    def enabled(self) -> bool:
        import torch

        return self.onnx is True or (self.onnx == "auto" and not torch.cuda.is_available())


@dataclass
class Suite:
    name: str = "eval"
    output_dir: str = "runs/eval"
    models: list[ModelEntry] = field(default_factory=list)
    tasks: list[TaskEntry] = field(default_factory=list)
    protocol: Protocol = field(default_factory=Protocol)
    throughput: Throughput = field(default_factory=Throughput)
    deploy: Deploy = field(default_factory=Deploy)
    source: str = field(default="", metadata={"internal": True})
    flags: dict = field(default_factory=dict, metadata={"internal": True})  # dotted key -> the flag that set it

    def where(self, key: str) -> str:
        """The flag that set ``key``, else the suite file."""
        return next((src for k, src in self.flags.items() if key == k or key.startswith(k + ".")), self.source)

    def metric(self, task: TaskEntry) -> str:
        return task.metric or DEFAULT_METRIC[task.kind]


def load_suite(path: str, overrides: list[str] | None = None) -> Suite:
    suite, sources = load_typed(Suite, path, overrides or [], "evaluation suite")
    suite.source, suite.flags = str(path), sources
    _validate(suite, sources)
    return suite


def _validate(s: Suite, sources: dict[str, str]) -> None:
    def check(ok: bool, key: str, message: str) -> None:
        if not ok:
            where = next((src for k, src in sources.items() if key == k or key.startswith(k + ".")), s.source)
            raise ConfigError(where, key, message)

    check(bool(s.models), "models", "name at least one model to fine-tune")
    check(bool(s.tasks), "tasks", "name at least one task")
    for key, entries in (("models", s.models), ("tasks", s.tasks)):
        names = [e.name for e in entries]
        for i, e in enumerate(entries):
            check(bool(e.name), f"{key}[{i}].name", "every entry needs a name (its row or column in the table)")
            check(names.index(e.name) == i, f"{key}[{i}].name", f"'{e.name}' names two entries")
            check("/" not in e.name and not e.name.startswith("."), f"{key}[{i}].name", "a name is a directory")
    by_name = {m.name: m for m in s.models}
    for i, m in enumerate(s.models):
        check(sum(map(bool, (m.path, m.recipe, m.task_recipe))) == 1, f"models[{i}]",
              "give exactly one of path (a model), recipe or task_recipe")  # fmt: skip
        if not m.task_recipe:
            check(not (m.teacher or m.student), f"models[{i}].teacher", "teacher and student go with task_recipe")
            check(not m.epochs, f"models[{i}].epochs", "epochs of task distillation go with task_recipe")
            continue
        check(m.epochs >= 0, f"models[{i}].epochs", f"epochs of task distillation, positive (0: the protocol's), "
              f"got {m.epochs}")  # fmt: skip
        for role in ("teacher", "student"):
            other = by_name.get(getattr(m, role))
            check(getattr(m, role) == "" and role == "student" or (other is not None and bool(other.path)),
                  f"models[{i}].{role}", f"the name of another entry with a path, got {getattr(m, role)!r}")  # fmt: skip
        qa = [t.name for t in s.tasks if t.kind == "qa"]
        check(not qa, f"models[{i}].task_recipe", f"task distillation trains ner, classification or relation heads; "
              f"drop the qa task(s) {', '.join(qa)} or this entry")  # fmt: skip
    for i, t in enumerate(s.tasks):
        check(bool(t.path), f"tasks[{i}].path", "the folder or file holding the task's data")
        metric = s.metric(t)
        check(metric in METRICS[t.kind], f"tasks[{i}].metric", f"{t.kind} reports {', '.join(METRICS[t.kind])}")
        check(t.kind != "qa" or bool(t.gold), f"tasks[{i}].gold", "qa scores its test set on BioASQ's golden JSON")
    p = s.protocol
    check(p.epochs > 0, "protocol.epochs", f"must be positive, got {p.epochs}")
    check(bool(p.lrs) and all(lr > 0 for lr in p.lrs), "protocol.lrs", "a list of positive learning rates")
    check(bool(p.batch_sizes) and min(p.batch_sizes) > 0, "protocol.batch_sizes", "a list of positive sizes")
    check(bool(p.seeds), "protocol.seeds", "at least one seed")
    check(8 <= p.max_length <= 8192, "protocol.max_length", f"must be between 8 and 8192, got {p.max_length}")
    check(0 <= p.warmup_ratio < 1, "protocol.warmup_ratio", f"a fraction of the steps in [0, 1), got {p.warmup_ratio}")
    check(0 <= p.qa_stride < p.qa_max_length, "protocol.qa_stride",
          f"windows overlap by fewer tokens than they hold ({p.qa_max_length}), got {p.qa_stride}")  # fmt: skip
    check(p.workers == "auto" or p.workers >= 1, "protocol.workers", "'auto' or at least 1")
    t = s.throughput  # checked now: the report measures it after every cell has trained
    check(8 <= t.length <= 8192, "throughput.length", f"tokens, between 8 and 8192, got {t.length}")
    check(bool(t.batch_sizes) and min(t.batch_sizes) > 0, "throughput.batch_sizes",
          f"a list of positive batch sizes (each a column of the table), got {t.batch_sizes}")  # fmt: skip
    check(t.seconds > 0, "throughput.seconds", f"seconds timed per measurement, must be positive, got {t.seconds}")
