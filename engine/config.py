"""Typed recipes: YAML files loaded into dataclasses, dotted command-line overrides, validation at start.

Every error names the file (or the command-line flag) and the dotted key at fault, e.g.
``configs/demo.yaml: train.max_steps: expected an integer, got 'ten'``. Nothing is built before the
whole recipe has been checked, so a typo costs seconds, not a queue slot on a cluster.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import glob
import json
import math
import os
import types
import typing
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

LayerMap = Union[str, list[list[int]]]
"""A student<->teacher layer map: "last", "uniform", or explicit [student, teacher] pairs.

Layers are numbered as Hugging Face numbers ``hidden_states``: 0 is the embedding output, i is the
output of layer i. Attention maps are numbered 1..L (the attention of layer i).
"""


class ConfigError(ValueError):
    """A recipe that cannot run. The message names the source (file or flag) and the key."""

    def __init__(self, source: str, key: str, message: str):
        self.source, self.key, self.message = source, key, message
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")

    def __reduce__(self):  # crosses process boundaries whole (data preparation raises it in workers)
        return type(self), (self.source, self.key, self.message)


# --------------------------------------------------------------------------------------------------
# The recipe schema. Field comments are the documentation users read: keep them short and exact.
# --------------------------------------------------------------------------------------------------


@dataclass
class TeacherConfig:
    path: str = ""  # HF model directory, hub name, or pkg://<package>/<dir> for a model shipped in a package
    # auto: follows train.precision on a GPU (bf16 or fp16; an fp32 student gets bf16 where the GPU has it,
    # else fp16), fp32 on CPU (no fast half-precision matmul there)
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    # replicated: a full copy per rank (BERT-size teachers); partitioned: ZeRO-3 shards it across the ranks,
    # an inference-only DeepSpeed engine; offload: ZeRO-3 shards held in CPU memory, fetched layer by layer
    placement: Literal["replicated", "partitioned", "offload"] = "replicated"
    # by_token: the student checkpoint (student.path) keeps its own tokenizer; the data is tokenised with it,
    # and the teacher's inputs and logits are mapped through token strings (a token it lacks reads as [UNK]
    # and gets no probability)
    vocab_map: Literal["", "by_token"] = ""


@dataclass
class StudentConfig:
    # teacher_layers: the teacher's embeddings and chosen layers; config: a random init; checkpoint: continue one
    init: Literal["config", "teacher_layers", "checkpoint"] = "teacher_layers"
    teacher_layers: list[int] = field(default_factory=list)  # 0-indexed teacher layers copied (teacher_layers)
    path: str = ""  # checkpoint to continue from (checkpoint), or a config to start from (config)
    overrides: dict[str, Any] = field(default_factory=dict)  # HF config fields changed for a random init
    mlm_head: bool = True  # build the student with its masked-LM head (a task recipe's student has the task's head)


@dataclass
class DataConfig:
    # PubMed/MEDLINE .xml(.gz); PMC .nxml, .xml, oa_*_xml.*.tar.gz; MIMIC-III NOTEEVENTS or MIMIC-IV-Note
    # .csv(.gz); .txt (a document a line), .jsonl, .parquet; globs ok
    train_files: list[str] = field(default_factory=list)
    dataset: str = ""  # a `datasets` name instead of files (needs a reachable hub or local cache)
    dataset_config: str = ""  # the dataset's configuration name, if it has several
    dataset_split: str = "train"  # the split of data.dataset read
    text_field: str = "text"  # the field (jsonl, parquet, dataset column) that holds a document's text
    max_length: int = 128  # tokens a sequence, [CLS] and [SEP] included (8 to 8192)
    packing: bool = True  # concatenate documents and cut full blocks; false: keep document boundaries
    long_documents: Literal["truncate", "split"] = "truncate"  # without packing: cut at max_length, or continue
    whole_word_masking: bool = False  # mask every piece of a chosen word, not single word pieces
    note_categories: list[str] = field(default_factory=list)  # NOTEEVENTS CATEGORY values to keep; empty: all
    note_types: list[str] = field(default_factory=list)  # MIMIC-IV-Note note_type values (DS, AD, RR, AR); empty: all
    deid: Literal["keep", "normalise", "remove"] = "keep"  # MIMIC-III's [** ... **], MIMIC-IV's ___
    require_abstract: bool = True  # PubMed: skip citations that have a title but no abstract
    pmc_parts: list[str] = field(default_factory=lambda: ["title", "abstract", "body"])  # PMC: the text kept
    pmc_section_titles: Literal["label", "drop"] = "label"  # PMC: "Methods: <first paragraph>", or no titles
    pmc_require_body: bool = False  # PMC: skip (and count) articles with no body paragraphs (abstract-only)
    on_bad_input: Literal["skip", "error"] = "skip"  # unreadable records: count and go on, or stop
    streaming: bool = False  # read and tokenise on the fly, each rank its shard (no cache; corpora beyond disk)
    mlm_probability: float = 0.15  # share of tokens masked (80% [MASK], 10% random, 10% kept)
    heldout_fraction: float = 0.05  # documents held out for evaluation
    cache_dir: str = "~/.cache/biodistill/datasets"  # the prepared Arrow caches, one folder per content key
    num_workers: int = 1  # tokenisation processes
    seed: int = 1234  # the held-out split, the sample order and the masks


@dataclass
class LossTermConfig:
    kind: str = ""  # a name in the loss registry (engine/losses.py, LOSSES)
    weight: float = 1.0  # the term's weight in the total (>= 0; at least one term > 0)
    layer_map: LayerMap = "last"  # hidden/attention terms: "last", "uniform" or [[student, teacher], ...]
    temperature: Optional[float] = None  # logit_kl / soft_ce: overrides losses.temperature
    projection: bool = False  # hidden_mse: learn a student->teacher width projection (dropped at export)
    # relation_kl (MiniLMv2): which self-attention relations, softmax(X X^T / sqrt(d_r)) for X in these
    relations: list[Literal["query", "key", "value"]] = field(default_factory=lambda: ["query", "key", "value"])
    relation_heads: int = 0  # relation_kl: heads both models' X are split into (0: the teacher's attention heads)


@dataclass
class LossesConfig:
    temperature: float = 2.0  # logit_kl / soft_ce temperature T (the loss is scaled by T^2)
    logit_rows: Literal["masked", "all"] = "masked"  # rows where the LM heads run: MLM-masked or all non-pad
    # How attention terms read the maps. fused: from each layer's captured queries and keys, by the kernel in
    # kernels/attention.py (no T x T tensor; both models keep SDPA / flash). maps: eager attention's [B, heads, T, T]
    # maps of every layer (quadratic memory). auto: fused where both families allow it (DeBERTa's do not).
    attention_path: Literal["auto", "fused", "maps"] = "auto"
    terms: list[LossTermConfig] = field(default_factory=list)


@dataclass
class OptimConfig:
    lr: float = 5e-4  # AdamW's peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW's beta1, beta2
    eps: float = 1e-8  # AdamW's epsilon
    weight_decay: float = 0.0  # decoupled weight decay (not on biases and norm weights)
    warmup_steps: int = 0  # linear warmup, then linear decay to zero at train.max_steps


@dataclass
class TrainConfig:
    max_steps: int = 100  # optimiser steps
    micro_batch_size: int = 8  # sequences per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimiser step
    global_batch_size: int = 0  # set: grad_accum = global / (micro_batch_size x world), whatever the world size
    grad_clip: float = 1.0  # 0 disables clipping
    # auto: bf16 on GPUs that have it (A100, H100, ...), fp16 with DeepSpeed's loss scaling on older ones, fp32 on CPU
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = 42  # random inits (the same on every rank) and dropout (offset by the rank)
    output_dir: str = "runs/default"  # checkpoints/, monitor/, metrics.jsonl, summary.json, student/
    log_every: int = 10  # optimiser steps between log lines (and host reads of the device)
    eval_every: int = 0  # 0: evaluate only before and after training
    eval_batches: int = 8  # held-out micro-batches per rank for each evaluation
    save_every: int = 0  # 0: save only at the end
    export: bool = True  # write the student as a Hugging Face directory at the end
    sample_log: bool = False  # each rank writes the sample ids of every micro-batch to output_dir/samples/
    keep_checkpoints: int = 0  # 0: keep every checkpoint; n: delete all but the newest n after each save
    # Seconds a collective may wait for a peer, and a rank may go without progress, before the job is ended
    # naming the rank at fault. Covers the data-cache build's barrier too: raise it for a first run on a big corpus.
    collective_timeout: float = 1800.0
    max_consecutive_skips: int = 10  # micro-batches with a non-finite loss or teacher output skipped in a row: stop
    # Seconds a signalled job (SIGTERM, SIGUSR1) has to reach the next step boundary and write its checkpoint
    # before it exits without one (exit code 75 either way). Under Slurm's KillWait (30 s by default).
    preempt_grace: float = 25.0


@dataclass
class TaskEntry:
    """A downstream task as biodistill-evaluate reads it (a suite's ``tasks`` entry, a task recipe's ``task``)."""

    name: str = ""  # the task's name (a suite's column; a task recipe's record)
    kind: Literal["ner", "classification", "relation", "qa"] = "ner"  # per-token labels, a label per text, or QA
    # A folder holding the splits (train / devel or dev / test files, found by name), or a single file
    # for train with dev and test named below.
    path: str = ""
    train: str = ""  # file names inside path, when they are not found by name
    dev: str = ""  # no dev split: 10% of train, by a fixed seed
    test: str = ""  # the split the table reports
    # ner: biobert (token<TAB>label) or conll (token first, label last); classification/relation: mednli,
    # jsonl, csv, tsv, biobert_re (sentence<TAB>label; test files index<TAB>sentence<TAB>label with a header);
    # qa: squad (BioASQ factoid in SQuAD format); auto: from the kind and file names.
    format: Literal["auto", "biobert", "conll", "mednli", "jsonl", "csv", "tsv", "biobert_re", "squad"] = "auto"
    text_field: str = "text"  # jsonl / csv: the field holding the text
    text_pair_field: str = ""  # pair classification and NLI
    label_field: str = "label"  # jsonl / csv: the field holding the label
    negative_label: str = ""  # relation: the no-relation class ("0", "false"); scores exclude it
    gold: str = ""  # qa: BioASQ's golden JSON for the test questions
    metric: str = ""  # the score the grid selects by; default per kind: ner f1, classification accuracy, ...
    subword_labels: Literal["first", "all"] = "first"  # ner: label the first piece (others -100) or every piece
    # Integer-coded labels (a Hugging Face dataset's to_json writes a ClassLabel column as its ids): the name
    # of each id, in order, e.g. [O, B-Disease, I-Disease] for ncbi_disease's ner_tags.
    label_names: list[str] = field(default_factory=list)


@dataclass
class TeacherFinetune:
    """How a base teacher is fine-tuned on the task first (one cell of biodistill-evaluate's protocol)."""

    lr: float = 5e-5  # the authors' grid starts here
    epochs: float = 3.0  # passes over the task's train split
    batch_size: int = 16  # examples a step
    seed: int = 1  # the new head's init and the data order
    weight_decay: float = 0.01  # AdamW's, as the evaluation protocol
    cache_dir: str = "~/.cache/biodistill/teachers"  # fine-tuned teachers, one folder per content key


@dataclass
class TaskSection(TaskEntry):
    """Task-specific distillation: set ``path`` and the loss terms read a task head (task_kl, task_ce). The task's
    files are read by biodistill-evaluate's readers; data.train_files, when given, are unlabeled in-domain text the
    teacher labels (split into sentences); data.max_length cuts the examples."""

    # auto: the teacher's task logits are computed once and stored when every term reads nothing else of it (the
    # teacher is then never loaded again); live: the teacher runs every step; or a directory of stored outputs
    teacher_outputs: str = "auto"
    outputs_dir: str = "~/.cache/biodistill/teacher-outputs"  # stored outputs, one folder per content key
    max_unlabeled: int = 0  # sentences taken from data.train_files (0: all)
    finetune: TeacherFinetune = field(
        default_factory=TeacherFinetune
    )  # how a teacher without the task's head is fine-tuned


@dataclass
class DeepSpeedSection:
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3 (without deepspeed.config)
    config: str = ""  # a user's DeepSpeed JSON; when set it is passed to DeepSpeed as it is
    tensorboard: bool = True  # DeepSpeed's TensorBoard monitor in output_dir/monitor
    csv: bool = True  # DeepSpeed's CSV monitor in output_dir/monitor


@dataclass
class Recipe:
    name: str = "biodistill"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    losses: LossesConfig = field(default_factory=LossesConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    task: TaskSection = field(default_factory=TaskSection)  # task-specific distillation (task.path set)
    source: str = field(default="<defaults>", metadata={"internal": True})  # the file it came from
    flags: dict = field(default_factory=dict, metadata={"internal": True})  # dotted key -> the flag that set it

    @property
    def is_task(self) -> bool:
        """A task-specific distillation: both models carry the task's head."""
        return bool(self.task.path)

    def where(self, key: str) -> str:
        """Where ``key``'s value came from: the flag that set it (``command line --optim.lr``), else the file."""
        return _where(key, self.source, self.flags)

    def error(self, key: str, message: str) -> ConfigError:
        """A ConfigError about ``key``, naming the flag or the file its value came from."""
        return ConfigError(self.where(key), key, message)

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if not f.metadata}


# --------------------------------------------------------------------------------------------------
# Loading: YAML -> dict -> overrides -> typed dataclasses -> value checks.
# --------------------------------------------------------------------------------------------------


def load_recipe(
    path: str | os.PathLike,
    overrides: list[str] | None = None,
    deepspeed_config: str = "",
    transform: Callable[[Recipe], Recipe] | None = None,
    check_paths: bool = True,
) -> Recipe:
    """Load ``path``, apply ``transform`` (e.g. ``--smoke``), then the ``--a.b value`` overrides, and
    validate. ``check_paths=False`` checks everything but the existence of the data files.

    The transform sees the recipe with the overrides already applied (``--smoke`` writes its models under the
    ``--train.output_dir`` given, not the file's), and the overrides are applied again over what it changed: a
    flag always has the last word."""
    source = str(path)
    raw = read_yaml(path, "recipe")
    if transform is not None:
        sources = apply_overrides(raw, overrides or [], source)
        base = _convert(Recipe, raw, "", source, sources)
        base.source = source
        raw = transform(base).to_dict()
    sources = apply_overrides(raw, overrides or [], source)
    if deepspeed_config:
        _set_dotted(raw, "deepspeed.config", deepspeed_config, source)
        sources["deepspeed.config"] = "command line --deepspeed_config"
    recipe = _convert(Recipe, raw, "", source, sources)
    recipe.source = source
    recipe.flags = {k: v for k, v in sources.items() if v.startswith("command line")}
    validate(recipe, sources, check_paths)
    return recipe


def read_yaml(path: str | os.PathLike, what: str) -> dict:
    """The mapping at the top of the YAML file ``path`` (a recipe, an evaluation suite), or a ConfigError."""
    source = str(path)
    if not Path(path).is_file():
        raise ConfigError(source, "", f"{what} file not found")
    text = Path(path).read_text(encoding="utf-8")
    try:
        _refuse_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), source)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(source, "", f"not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, "", f"the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def _refuse_duplicate_keys(node, source: str, key: str = "") -> None:
    """A key written twice in one mapping, at any depth: PyYAML keeps the last in silence, and a section written
    twice (``train:`` ... ``train:``) loses the first one's every value. Refused, naming both lines."""
    if isinstance(node, yaml.MappingNode):
        lines: dict = {}
        for key_node, value_node in node.value:
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            dotted = f"{key}.{name}" if key else str(name)
            if name is not None and name != "<<":
                if name in lines:
                    raise ConfigError(
                        source, dotted, f"written twice, at lines {lines[name]} and {key_node.start_mark.line + 1}; "
                        "YAML would keep only the second: merge them into one",
                    )  # fmt: skip
                lines[name] = key_node.start_mark.line + 1
            _refuse_duplicate_keys(value_node, source, dotted)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, source, f"{key}[{i}]")


def apply_overrides(raw: dict, overrides: list[str], source: str) -> dict[str, str]:
    """Apply ``--a.b value`` flags to ``raw`` in place; returns dotted key -> where its value came from, so
    that a bad override's error names the flag, not the file."""
    sources = {}
    for key, value in parse_overrides(overrides):
        _set_dotted(raw, key, value, source)
        sources[key] = f"command line --{key}"
    return sources


def load_typed(tp: Any, path: str | os.PathLike, overrides: list[str], what: str) -> tuple[Any, dict[str, str]]:
    """YAML file ``path`` with ``overrides`` applied, as the dataclass ``tp`` (types checked, key by key)."""
    raw = read_yaml(path, what)
    sources = apply_overrides(raw, overrides, str(path))
    return _convert(tp, raw, "", str(path), sources), sources


def resolve_precision(recipe: Recipe, device_type: str, bf16_supported: bool) -> Recipe:
    """``recipe`` with ``train.precision`` and ``teacher.dtype`` "auto" made concrete for the device the job
    runs on (``device_type`` "cpu", "cuda", ...). Explicit values are kept as written, except that a user's
    DeepSpeed JSON that decides the precision (``fp16``/``bf16`` ``enabled`` not "auto") decides it for the
    whole job (teacher dtype, memory plan, summary, export), as it does for DeepSpeed; a flag it contradicts is
    refused at start (``runtime/distributed.check_deepspeed_json``)."""
    train, teacher = recipe.train, recipe.teacher
    if (trained := json_precision(recipe)) is not None:  # DeepSpeed trains in the JSON's: so does every part
        train = dataclasses.replace(train, precision=trained)
    if train.precision == "auto":
        precision = "fp32" if device_type == "cpu" else "bf16" if bf16_supported else "fp16"
        train = dataclasses.replace(train, precision=precision)
    if teacher.dtype == "auto":
        if device_type == "cpu":
            dtype = "fp32"
        elif train.precision in ("bf16", "fp16"):
            dtype = train.precision  # one half type in the step: the terms compare like with like
        else:  # an fp32 student still gets a half-precision teacher: it is frozen, and this halves its cost
            dtype = "bf16" if bf16_supported else "fp16"
        teacher = dataclasses.replace(teacher, dtype=dtype)
    return dataclasses.replace(recipe, train=train, teacher=teacher)


def json_precision(recipe: Recipe) -> Optional[str]:
    """The precision a user's DeepSpeed JSON trains in ("fp32", "bf16", "fp16"), or None without a JSON or when
    it leaves the choice to the recipe (``"enabled": "auto"``). Both enabled is refused, naming the JSON."""
    if not recipe.deepspeed.config:
        return None
    path = recipe.deepspeed.config
    cfg = load_deepspeed_json(path, recipe.where("deepspeed.config"))
    enabled = {k: cfg[k].get("enabled", False) for k in ("fp16", "bf16") if isinstance(cfg.get(k), dict)}
    if "auto" in enabled.values():
        return None
    if enabled.get("fp16") is True and enabled.get("bf16") is True:
        raise ConfigError(
            str(resolve_path(path)), "bf16.enabled", "fp16 and bf16 are both enabled: DeepSpeed trains in one; "
            "disable one of them",
        )  # fmt: skip
    return "bf16" if enabled.get("bf16") is True else "fp16" if enabled.get("fp16") is True else "fp32"


def parse_overrides(argv: list[str]) -> list[tuple[str, Any]]:
    """``["--train.max_steps", "50", "--data.packing=false"]`` -> ``[("train.max_steps", 50), ...]``.

    Values are read as YAML scalars/lists, so ``5e-4``, ``true`` and ``[0,2,4]`` mean what they look like.
    """
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError("command line", arg, "expected --section.key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or (argv[i + 1].startswith("--") and not _is_number(argv[i + 1])):
                raise ConfigError(f"command line --{key}", key, "missing value")
            value, i = argv[i + 1], i + 1
        try:
            pairs.append((key, yaml.safe_load(value) if value != "" else ""))
        except yaml.YAMLError:
            pairs.append((key, value))
        i += 1
    return pairs


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _set_dotted(raw: dict, key: str, value: Any, source: str) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"command line --{key}", key, f"'{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _where(key: str, source: str, sources: dict[str, str]) -> str:
    for k, src in sources.items():
        if key == k or key.startswith(k + ".") or key.startswith(k + "["):
            return src
    return source


def _convert(tp: Any, value: Any, key: str, source: str, sources: dict[str, str]) -> Any:
    """Convert a YAML value to the annotated type ``tp``, or raise naming ``key``."""
    where = _where(key, source, sources)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(where, key or "<top>", f"expected a mapping, got {value!r}")
        fields = {f.name: f for f in dataclasses.fields(tp) if not f.metadata.get("internal")}
        hints = typing.get_type_hints(tp)
        for k in value:
            if k not in fields:
                close = difflib.get_close_matches(str(k), fields, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(fields)}"
                sub = f"{key}.{k}" if key else str(k)
                raise ConfigError(_where(sub, source, sources), sub, f"unknown key{hint}")
        kwargs = {k: _convert(hints[k], v, f"{key}.{k}" if key else k, source, sources) for k, v in value.items()}
        return tp(**kwargs)
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise ConfigError(where, key, f"must be one of {choices}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key, source, sources)
            except ConfigError as e:
                errors.append(str(e).rsplit(": ", 1)[-1])
        raise ConfigError(where, key, f"got {value!r}, which fits none of the accepted forms ({'; '.join(errors)})")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(where, key, f"expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{key}[{i}]", source, sources) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(where, key, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(where, key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(where, key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        # PyYAML reads "5e-4" (no dot) as a string; accept any spelling float() accepts.
        if isinstance(value, bool):
            raise ConfigError(where, key, f"expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(where, key, f"expected a number, got {value!r}") from None
        if not math.isfinite(number):  # .inf / .nan: a learning rate, weight or temperature that trains nothing
            raise ConfigError(where, key, f"expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(where, key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a schema bug, not a user error


def validate(r: Recipe, sources: dict[str, str] | None = None, check_paths: bool = True) -> None:
    """Value checks that types cannot express, one section at a time. Raises the first :class:`ConfigError` found.

    What a loss term's kind needs (a teacher, the MLM head) and its own options are checked by the term classes
    themselves (``losses.validate_terms``): this module does not know the kinds."""

    def check(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(_where(key, r.source, sources or {}), key, message)

    _check_losses(r, check)
    _check_student(r, check)
    _check_data(r, check, sources or {}, check_paths)
    _check_train(r, check)
    _check_optim(r, check)
    if r.is_task:
        _check_task(r, check)
    check(
        r.deepspeed.zero_stage in (0, 1, 2, 3),
        "deepspeed.zero_stage",
        f"must be 0, 1, 2 or 3, got {r.deepspeed.zero_stage}",
    )
    if r.deepspeed.config:
        load_deepspeed_json(r.deepspeed.config, _where("deepspeed.config", r.source, sources or {}))


def _check_losses(r: Recipe, check: Callable[[bool, str, str], None]) -> None:
    check(bool(r.losses.terms), "losses.terms", "at least one loss term is required")
    for i, term in enumerate(r.losses.terms):
        check(term.weight >= 0, f"losses.terms[{i}].weight", f"must be >= 0, got {term.weight}")
    check(r.losses.temperature > 0, "losses.temperature", f"must be > 0, got {r.losses.temperature}")
    check(
        any(t.weight > 0 for t in r.losses.terms),
        "losses.terms",
        "every term's weight is 0: the student would learn nothing; give at least one term a positive weight",
    )


def _check_student(r: Recipe, check: Callable[[bool, str, str], None]) -> None:
    s = r.student
    check(
        not r.teacher.vocab_map or (s.init != "teacher_layers" and bool(s.path)),
        "teacher.vocab_map",
        "maps the tokenizer of a student checkpoint (student.path, student.init 'checkpoint' or 'config') to the "
        "teacher's; a student made of teacher layers already has the teacher's",
    )
    if s.init == "checkpoint":
        check(bool(s.path), "student.path", "student.init 'checkpoint' needs the checkpoint to continue from")
    check(
        s.init != "teacher_layers" or not s.path,
        "student.path",
        f"{s.path!r} would not be read: student.init 'teacher_layers' builds the student from the teacher's layers; "
        "drop student.path, or set student.init: checkpoint to continue from it",
    )
    check(
        s.init == "teacher_layers" or not s.teacher_layers,
        "student.teacher_layers",
        f"{s.teacher_layers} would not be read: layers are copied only under student.init 'teacher_layers' (this "
        f"recipe says {s.init!r}); drop student.teacher_layers, or set student.init: teacher_layers",
    )
    if s.init != "teacher_layers":
        return
    for depth_key in ("num_hidden_layers", "layer_types"):
        check(
            depth_key not in s.overrides,
            f"student.overrides.{depth_key}",
            f"{s.overrides.get(depth_key)!r} contradicts student.teacher_layers {s.teacher_layers}: a student "
            f"copied from teacher layers has one layer per entry ({len(s.teacher_layers)}); drop the override",
        )
    check(bool(r.teacher.path), "teacher.path", "student.init 'teacher_layers' copies layers from a teacher")
    check(bool(s.teacher_layers), "student.teacher_layers", "list the teacher layers to copy, e.g. [0, 2, 4]")
    check(
        len(set(s.teacher_layers)) == len(s.teacher_layers) and min(s.teacher_layers) >= 0,
        "student.teacher_layers",
        f"must be distinct layer indices >= 0, got {s.teacher_layers}",
    )


def _check_task(r: Recipe, check: Callable[[bool, str, str], None]) -> None:
    t = r.task
    check(t.kind in ("ner", "classification", "relation"), "task.kind",
          f"task distillation trains ner, classification or relation heads, got {t.kind!r}")  # fmt: skip
    check(t.teacher_outputs in ("auto", "live") or bool(t.teacher_outputs.strip()), "task.teacher_outputs",
          "'auto', 'live' or a directory of stored outputs")  # fmt: skip
    check(t.max_unlabeled >= 0, "task.max_unlabeled", f"must be >= 0 (0: every sentence), got {t.max_unlabeled}")
    unlabeled = bool(r.data.train_files or r.data.dataset)
    check(not (unlabeled and t.text_pair_field), "data.train_files",
          f"unlabeled text makes single-text examples; task {t.kind!r} reads pairs (task.text_pair_field)")  # fmt: skip
    check(not r.data.streaming, "data.streaming", "a task's examples are read whole, each epoch in a seeded order")
    check(not r.teacher.vocab_map, "teacher.vocab_map",
          "a task's outputs are read token by token: the student must use the teacher's tokenizer")  # fmt: skip
    f = t.finetune
    check(f.lr > 0, "task.finetune.lr", f"must be > 0, got {f.lr}")
    check(f.epochs > 0, "task.finetune.epochs", f"must be > 0, got {f.epochs}")
    check(f.batch_size > 0, "task.finetune.batch_size", f"must be > 0, got {f.batch_size}")


def _check_data(r: Recipe, check: Callable[[bool, str, str], None], sources: dict, check_paths: bool) -> None:
    d = r.data
    if r.is_task:  # the task's own examples; text files are optional (unlabeled sentences)
        check(not (d.train_files and d.dataset), "data.train_files", "give data.train_files or data.dataset, not both")
    else:
        check(
            bool(d.train_files) != bool(d.dataset), "data.train_files", "give either data.train_files or data.dataset"
        )
    if check_paths:
        data_files(d, _where("data.train_files", r.source, sources))
    check(8 <= d.max_length <= 8192, "data.max_length", f"must be between 8 and 8192, got {d.max_length}")
    check(0 < d.mlm_probability < 1, "data.mlm_probability", f"must be in (0, 1), got {d.mlm_probability}")
    check(0 < d.heldout_fraction < 1, "data.heldout_fraction", f"must be in (0, 1), got {d.heldout_fraction}")
    check(d.num_workers >= 1, "data.num_workers", "must be >= 1")
    parts = ("title", "abstract", "body")
    check(
        bool(d.pmc_parts) and set(d.pmc_parts) <= set(parts),
        "data.pmc_parts",
        f"must be a non-empty list of {', '.join(parts)}, got {d.pmc_parts}",
    )
    check(not (d.streaming and d.dataset), "data.streaming", "streams files (data.train_files), not data.dataset")


def _check_train(r: Recipe, check: Callable[[bool, str, str], None]) -> None:
    t = r.train
    check(t.max_steps >= 1, "train.max_steps", f"must be >= 1, got {t.max_steps}")
    check(t.micro_batch_size >= 1, "train.micro_batch_size", f"must be >= 1, got {t.micro_batch_size}")
    check(t.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {t.grad_accum}")
    check(t.global_batch_size >= 0, "train.global_batch_size", f"must be >= 0, got {t.global_batch_size}")
    check(
        not (t.global_batch_size and t.grad_accum != 1),
        "train.global_batch_size",
        "set either train.global_batch_size or train.grad_accum, not both (accumulation follows from the global batch)",
    )
    check(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0, got {t.grad_clip}")
    for name in ("log_every", "eval_every", "save_every"):
        check(getattr(t, name) >= 0, f"train.{name}", "must be >= 0")
    check(t.log_every >= 1, "train.log_every", "must be >= 1")
    check(t.eval_batches >= 1, "train.eval_batches", "must be >= 1")
    check(t.keep_checkpoints >= 0, "train.keep_checkpoints", f"must be >= 0, got {t.keep_checkpoints}")
    check(t.collective_timeout > 0, "train.collective_timeout", f"must be > 0 seconds, got {t.collective_timeout}")
    check(t.preempt_grace > 0, "train.preempt_grace", f"must be > 0 seconds, got {t.preempt_grace}")
    check(
        t.max_consecutive_skips >= 1,
        "train.max_consecutive_skips",
        f"must be >= 1, got {t.max_consecutive_skips}",
    )


def _check_optim(r: Recipe, check: Callable[[bool, str, str], None]) -> None:
    o = r.optim
    check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    check(
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
        "optim.betas",
        f"must be two values in [0, 1), got {o.betas}",
    )
    check(o.eps > 0, "optim.eps", "must be > 0")
    check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    check(
        0 <= o.warmup_steps < max(r.train.max_steps, 1),
        "optim.warmup_steps",
        f"must be in [0, train.max_steps), got {o.warmup_steps}",
    )


def load_deepspeed_json(path: str, where: str = "deepspeed.config") -> dict:
    """Read a user's DeepSpeed JSON; errors name the file."""
    p = resolve_path(path)
    if not p.is_file():
        raise ConfigError(where, "deepspeed.config", f"DeepSpeed config not found: {path}")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(str(p), "", f"not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(str(p), "", "a DeepSpeed config must be a JSON object")
    return cfg


def data_files(data: DataConfig, source: str) -> list[tuple[str, Path]]:
    """``(key, path)`` for every file of ``data.train_files``, glob patterns expanded in sorted order."""
    out, seen = [], set()
    for i, name in enumerate(data.train_files):
        key = f"data.train_files[{i}]"
        if glob.has_magic(name):
            matches = expand_glob(str(resolve_path(name)))
            if not matches:
                raise ConfigError(source, key, f"no file matches {name!r} (from {os.getcwd()})")
            found = [(f"{key} ({p.name})", p) for p in matches]
        else:
            path = resolve_path(name)
            if path.is_dir():
                raise ConfigError(source, key, f"{name} is a directory; give a glob such as {_glob_for(name, path)}")
            if not path.is_file():
                raise ConfigError(source, key, f"file not found: {name} (from {os.getcwd()})")
            found = [(key, path)]
        for entry in found:  # each real file once, however many patterns or links reach it
            if (real := os.path.realpath(entry[1])) not in seen:
                seen.add(real)
                out.append(entry)
    return out


def expand_glob(pattern: str) -> list[Path]:
    """The files ``pattern`` matches, as ``glob.glob(pattern, recursive=True)`` would find them (``**`` is any
    number of directories, hidden names need a pattern that starts with a dot), sorted, each real file once.
    Unlike glob, a directory reached again through a symbolic link (``self -> .``, ``up -> ../loop``) is not
    walked again: glob follows such a loop until the path is too long, which takes minutes and reads the same
    files over and over."""
    parts = Path(pattern).parts
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root, wanted = Path(*parts[:first]) if first else Path("."), parts[first:]
    if "**" not in wanted:  # no recursion, so no loop: glob as it is
        matches = (Path(p) for p in glob.glob(pattern))
    else:
        matches, walked = [], set()
        for directory, subdirs, files in os.walk(root, followlinks=True):
            walked.add(os.path.realpath(directory))
            subdirs[:] = sorted(d for d in subdirs if os.path.realpath(os.path.join(directory, d)) not in walked)
            relative = Path(directory).relative_to(root).parts
            matches += [Path(directory, f) for f in files if _glob_match((*relative, f), wanted)]
    out, seen = [], set()
    for path in sorted(p for p in matches if p.is_file()):
        if (real := os.path.realpath(path)) not in seen:
            seen.add(real)
            out.append(path)
    return out


def _glob_match(names: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Path components ``names`` against glob components ``pattern`` (``**``: zero or more directories)."""
    if not pattern:
        return not names
    if pattern[0] == "**":
        return any(
            _glob_match(names[k:], pattern[1:])
            for k in range(len(names) + 1)
            if not any(n.startswith(".") for n in names[:k])
        )
    head = pattern[0]
    return (
        bool(names)
        and (head.startswith(".") or not names[0].startswith("."))
        and fnmatch.fnmatchcase(names[0], head)
        and _glob_match(names[1:], pattern[1:])
    )


def _glob_for(name: str, directory: Path) -> str:
    """``DIR/*.<ext>`` for the extension most files in ``directory`` have (``*.jsonl`` when it has none)."""
    suffixes = Counter("".join(p.suffixes[-2:]) for p in directory.iterdir() if p.is_file() and p.suffix)
    ext = suffixes.most_common(1)[0][0] if suffixes else ".jsonl"
    return f"{name.rstrip('/')}/*{ext}"


def resolve_path(path: str) -> Path:
    """Resolve ``pkg://package/sub/dir`` (files shipped inside an installed package) and ``~``."""
    if path.startswith("pkg://"):
        package, _, rest = path[len("pkg://") :].partition("/")
        import importlib.util

        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(path, "", f"package '{package}' is not installed")
        return Path(list(spec.submodule_search_locations)[0]) / rest
    return Path(path).expanduser()


def model_location(path: str) -> str:
    """A local directory (pkg:// resolved) or the hub name as given."""
    local = resolve_path(path)
    return str(local) if local.exists() or path.startswith("pkg://") else path


def is_local(path: str) -> bool:
    """A path, not a hub name: a hub name is fetched (or found in the hub cache) by the loader."""
    return path.startswith(("/", ".", "~", "pkg://")) or resolve_path(path).exists()


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if not f.metadata}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
