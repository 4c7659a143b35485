"""A catalogue of bad inputs (configs, paths, checkpoints, tokenizers, corpora) and the exact error each
gets, through the real command lines (``biodistill-train`` and ``biodistill-prepare``) in-process.

Every one is found before any process group, weights or compute: a typo costs seconds, not a queue slot.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import files_under, minilm_dir, recipe_dict, swapped_student, write_recipe

from biodistill.engine import cli
from biodistill.engine.data import cache as prepare
from biodistill.engine.losses import LOSSES
from biodistill.engine.runtime import preempt
from biodistill.engine.runtime.distributed import check_deepspeed_json

TERMS = [{"kind": "hidden_mse", "weight": 1.0, "layer_map": "last"}, {"kind": "logit_kl", "weight": 1.0}]


@dataclass
class Case:
    id: str
    error: str  # the whole message after "biodistill: error: "; {r} the recipe, {tmp}, {out}, {cwd}
    edit: Callable[[dict, Path], None] = lambda recipe, tmp: None  # change the recipe (and the world)
    argv: list[str] = field(default_factory=list)  # more command-line arguments
    env: dict[str, str] = field(default_factory=dict)
    prepare: bool = False  # run biodistill-prepare instead of the trainer
    text: Callable[[str], str] = lambda yaml_text: yaml_text  # change the recipe file's text (what a dict cannot say)
    twice: str = ""  # the start of a line written twice by ``text``: {first} and {second} are the lines it is on


def put(dotted: str, value) -> Callable[[dict, Path], None]:
    def edit(recipe: dict, tmp: Path) -> None:
        node = recipe
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value(tmp) if callable(value) else value

    return edit


def both(*edits):
    def edit(recipe: dict, tmp: Path) -> None:
        for e in edits:
            e(recipe, tmp)

    return edit


def write(relative: str, text: str) -> Callable[[Path], str]:
    """A file under the case's tmp dir, for a recipe value."""

    def make(tmp: Path) -> str:
        path = tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return str(path)

    return make


def model_dir(name: str, tokenizer: bool = True, vocab_size: int = 30522, lowercase: bool = True) -> Callable:
    """A BERT directory of the test teacher's width; without its tokenizer, with a smaller embedding, or with
    a cased tokenizer."""

    def make(tmp: Path) -> str:
        from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

        path = tmp / name
        config = BertConfig(
            vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
        )
        BertForMaskedLM(config).save_pretrained(path)
        if tokenizer:
            AutoTokenizer.from_pretrained(minilm_dir(), do_lower_case=lowercase).save_pretrained(path)
        return str(path)

    return make


def checkpoint_student(path: Callable[[Path], str]) -> Callable[[dict, Path], None]:
    """The student continued from the checkpoint ``path`` makes (no teacher layers to copy)."""

    def edit(recipe: dict, tmp: Path) -> None:
        recipe["student"] = {"init": "checkpoint", "path": path(tmp), "mlm_head": True}

    return edit


def swapped_vocab(tmp: Path) -> str:
    return str(swapped_student(Path(model_dir("swapped", tokenizer=False)(tmp))))


def checkpoints(latest: str | None, *tags: str, complete: bool = False) -> Callable[[dict, Path], None]:
    def edit(recipe: dict, tmp: Path) -> None:
        root = Path(recipe["train"]["output_dir"]) / "checkpoints"
        for tag in tags:
            (root / tag).mkdir(parents=True)
            if complete:
                (root / tag / "biodistill.json").write_text('{"step": 4, "world_size": 1}')
        if latest:
            (root / "latest").write_text(latest)

    return edit


def deepspeed_json(body: str) -> Callable[[dict, Path], None]:
    return put("deepspeed.config", write("ds.json", body))


def lenient_cache_then_strict(recipe: dict, tmp: Path) -> None:
    """A cache built under on_bad_input: skip (one broken record left out), then biodistill-prepare with
    on_bad_input: error over it: strict mode must read the files again, not reuse the cache in silence."""
    sentence = "Sepsis is a life-threatening organ dysfunction caused by a dysregulated host response. " * 6
    lines = [json.dumps({"text": sentence + str(i)}) for i in range(12)]
    lines.insert(1, '{"text": ')
    recipe["data"]["train_files"] = [write("notes.jsonl", "\n".join(lines) + "\n")(tmp)]
    assert prepare.main(["--config", str(write_recipe(tmp / "lenient.yaml", recipe))]) == 0
    recipe["data"]["on_bad_input"] = "error"


def under_a_file(key: str) -> Callable[[dict, Path], None]:
    return put(key, lambda tmp: write("plain-file", "x")(tmp) + "/run")


MINI = minilm_dir()
CASES = [
    # ------------------------------------------------------------------------------ configs and flags
    Case("unknown-key", "{r}: train.max_step: unknown key (did you mean 'max_steps'?)", put("train.max_step", 5)),
    Case("not-an-integer", "{r}: train.max_steps: expected an integer, got 'ten'", put("train.max_steps", "ten")),
    Case(
        "unknown-precision",
        "{r}: train.precision: must be one of 'auto', 'fp32', 'bf16', 'fp16', got 'fp8'",
        put("train.precision", "fp8"),
    ),
    Case("negative-lr", "{r}: optim.lr: must be > 0, got -1.0", put("optim.lr", -1)),
    Case(
        "warmup-too-long",
        "{r}: optim.warmup_steps: must be in [0, train.max_steps), got 8",
        put("optim.warmup_steps", 8),
    ),
    Case(
        "unknown-loss",
        "{r}: losses.terms[1].kind: unknown loss 'kl'; known: " + ", ".join(LOSSES),
        put("losses.terms", [TERMS[0], {"kind": "kl"}]),
    ),
    Case(
        "bad-layer-map",
        "{r}: losses.terms[0].layer_map: must be 'last', 'uniform' or a list of [student, teacher] pairs, got 'middle'",
        put("losses.terms", [{**TERMS[0], "layer_map": "middle"}]),
    ),
    Case("no-loss-terms", "{r}: losses.terms: at least one loss term is required", put("losses.terms", [])),
    Case(
        "batch-twice",
        "{r}: train.global_batch_size: set either train.global_batch_size or train.grad_accum, not both "
        "(accumulation follows from the global batch)",
        both(put("train.global_batch_size", 16), put("train.grad_accum", 2)),
    ),
    Case(
        "zero-timeout",
        "{r}: train.collective_timeout: must be > 0 seconds, got 0.0",
        put("train.collective_timeout", 0),
    ),
    Case(
        "negative-preempt-grace",
        "{r}: train.preempt_grace: must be > 0 seconds, got -1.0",
        put("train.preempt_grace", -1),
    ),
    Case(
        "flag-without-value",
        "command line --train.max_steps: train.max_steps: missing value",
        argv=["--train.max_steps"],
    ),
    Case(
        "flag-unknown-key",
        "command line --train.max_stepz: train.max_stepz: unknown key (did you mean 'max_steps'?)",
        argv=["--train.max_stepz", "3"],
    ),
    Case(
        "bad-failpoint",
        "environment: BIODISTILL_FAILPOINTS: 'save.file@x=kill' is not POINT[@STEP][#HIT][:RANK]=ACTION",
        env={"BIODISTILL_FAILPOINTS": "save.file@x=kill"},
    ),
    # ------------------------------------------------------------------------------------------ paths
    Case(
        "missing-corpus",
        "{r}: data.train_files[0]: file not found: {tmp}/nope.jsonl (from {cwd})",
        put("data.train_files", lambda tmp: [str(tmp / "nope.jsonl")]),
    ),
    Case(
        "glob-matches-nothing",
        "{r}: data.train_files[0]: no file matches '{tmp}/pubmed/*.xml.gz' (from {cwd})",
        put("data.train_files", lambda tmp: [str(tmp / "pubmed" / "*.xml.gz")]),
    ),
    Case(
        "corpus-of-unknown-format",
        "{r}: data.train_files[0]: {tmp}/notes.docx: unknown format; expected .xml(.gz) (PubMed or PMC), .nxml or "
        ".tar.gz (PMC), .csv(.gz) (MIMIC-III NOTEEVENTS, MIMIC-IV-Note), .txt, .jsonl or .parquet",
        put("data.train_files", lambda tmp: [write("notes.docx", "text")(tmp)]),
    ),
    Case(
        "missing-deepspeed-json",
        "{r}: deepspeed.config: DeepSpeed config not found: {tmp}/ds.json",
        put("deepspeed.config", lambda tmp: str(tmp / "ds.json")),
    ),
    Case(
        "broken-deepspeed-json",
        "{tmp}/ds.json: not valid JSON: Expecting value: line 1 column 1 (char 0)",
        put("deepspeed.config", write("ds.json", "zero_optimization: 2")),
    ),
    Case(
        "deepspeed-json-batch-arithmetic",
        "{tmp}/ds.json: train_batch_size: 7 is not train_micro_batch_size_per_gpu x gradient_accumulation_steps x "
        "world size = 4 x 1 x 1 = 4",
        deepspeed_json(
            '{"train_batch_size": 7, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}'
        ),  # fmt: skip
    ),
    Case(
        "deepspeed-json-contradicts-a-flag",
        "command line --train.grad_accum: train.grad_accum: 2, but {tmp}/ds.json makes DeepSpeed train with "
        'gradient_accumulation_steps 1: drop the flag, or change gradient_accumulation_steps in the JSON ("auto" '
        "takes the recipe's value)",
        deepspeed_json(
            '{"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 1}}'
        ),  # fmt: skip
        argv=["--train.grad_accum", "2"],
    ),
    Case(
        "missing-teacher",
        "{r}: teacher.path: {tmp}/biobert: not found (a Hugging Face model directory, pkg://package/dir, or a hub name)",
        put("teacher.path", lambda tmp: str(tmp / "biobert")),
    ),
    Case(
        "teacher-is-a-file",
        "{r}: teacher.path: {tmp}/model.bin: not a directory (a Hugging Face model directory, pkg://package/dir, or "
        "a hub name)",
        put("teacher.path", write("model.bin", "weights")),
    ),
    Case(
        "teacher-without-config",
        "{r}: teacher.path: {tmp}/weights has no config.json: not a Hugging Face model directory",
        put("teacher.path", lambda tmp: str(Path(write("weights/model.safetensors", "")(tmp)).parent)),
    ),
    Case(
        "teacher-config-broken",
        "{r}: teacher.path: {tmp}/broken/config.json is not valid JSON: Expecting property name enclosed in double "
        "quotes: line 1 column 2 (char 1)",
        put("teacher.path", lambda tmp: str(Path(write("broken/config.json", "{{")(tmp)).parent)),
    ),
    Case(
        "output-dir-not-writable",
        "{r}: train.output_dir: cannot write in {tmp}/plain-file/run: Not a directory",
        under_a_file("train.output_dir"),
    ),
    Case(
        "cache-dir-not-writable",
        "{r}: data.cache_dir: cannot write in {tmp}/plain-file/run: Not a directory",
        under_a_file("data.cache_dir"),
    ),
    # ---------------------------------------------------------------------------------- checkpoints
    Case(
        "fresh-start-over-checkpoints",
        "{r}: train.output_dir: {out}/checkpoints already holds checkpoints (latest: step4); pass --resume to "
        "continue from them, or choose another train.output_dir",
        checkpoints("step4", "step4", complete=True),
    ),
    Case(
        "resume-unknown-tag",
        "--resume: checkpoint 'step9' not found in {out}/checkpoints",
        checkpoints("step4", "step4", complete=True),
        argv=["--resume", "step9"],
    ),
    Case(
        "resume-interrupted-save",
        "--resume: checkpoint {out}/checkpoints/step8 is incomplete (no biodistill.json): its save was interrupted; "
        "resume from an earlier tag",
        checkpoints(None, "step8"),
        argv=["--resume", "step8"],
    ),
    # --------------------------------------------------------------------------- layer maps and models
    Case(
        "copy-a-layer-the-teacher-lacks",
        "{r}: student.teacher_layers: teacher '{teacher}' has 4 layers (0..3); cannot copy [9]",
        put("student.teacher_layers", [0, 9]),
    ),
    Case(
        "layer-map-out-of-range",
        "{r}: losses.terms[0].layer_map: pair [3, 4] is out of range: student has 2 layers, teacher 4; hidden "
        "states are numbered 0 (embeddings)..L",
        put("losses.terms", [{**TERMS[0], "layer_map": [[3, 4]]}]),
    ),
    Case(
        "uniform-map-not-a-multiple",
        "{r}: losses.terms[0].layer_map: 'uniform' needs teacher layers (4) to be a multiple of student layers (3)",
        both(put("student.teacher_layers", [0, 1, 2]), put("losses.terms", [{**TERMS[0], "layer_map": "uniform"}])),
    ),
    # ------------------------------------------------------------------------------------ tokenizers
    Case(
        "teacher-without-tokenizer",
        "{r}: teacher.path: {tmp}/no-tokenizer has no tokenizer (tokenizer.json, vocab.txt or tokenizer_config.json)",
        both(put("teacher.path", model_dir("no-tokenizer", tokenizer=False)), put("student.teacher_layers", [0])),
    ),
    Case(
        "teacher-embeddings-smaller-than-tokenizer",
        "{r}: teacher.path: the model's vocab_size 30000 is smaller than its tokenizer's 30522 tokens: token ids "
        ">= 30000 have no embedding",
        both(put("teacher.path", model_dir("small-vocab", vocab_size=30000)), put("student.teacher_layers", [0])),
    ),
    Case(
        "student-tokenizer-ids-differ",
        "{r}: student.path: the student's tokenizer differs from the teacher's (30522 tokens vs the teacher's 30522; "
        "other ids: [('{a}', 2000, 2001), ('{b}', 2001, 2000)]); the data is tokenised once, with the teacher's: "
        "start the student from a checkpoint with the teacher's tokenizer, or set teacher.vocab_map: by_token to map "
        "the student's to the teacher's",
        checkpoint_student(swapped_vocab),
    ),
    Case(
        "student-tokenizer-cased",
        "{r}: student.path: the student's tokenizer differs from the teacher's (same vocabulary, different "
        "normalisation or pre-tokenisation (e.g. cased vs uncased)); the data is tokenised once, with the teacher's: "
        "start the student from a checkpoint with the teacher's tokenizer, or set teacher.vocab_map: by_token to map "
        "the student's to the teacher's",
        checkpoint_student(model_dir("cased", lowercase=False)),
    ),
    # ---------------------------------------------------------------------------------------- corpora
    Case(
        "corpus-without-text-field",
        "{r}: data.text_field: {tmp}/notes.jsonl: no line has a string 'text' field; the first line has ['body']",
        put("data.train_files", lambda tmp: [write("notes.jsonl", '{"body": "chest pain"}\n' * 4)(tmp)]),
        prepare=True,
    ),
    Case(
        "corpus-with-a-broken-line",
        "{r}: data.train_files[0]: {tmp}/notes.jsonl: line 2: malformed JSON line (Expecting value: line 2 column 1 "
        "(char 10)) (data.on_bad_input: error)",
        both(
            put(
                "data.train_files", lambda tmp: [write("notes.jsonl", '{"text": "a"}\n{"text": \n{"text": "b"}\n')(tmp)]
            ),
            put("data.on_bad_input", "error"),
        ),
        prepare=True,
    ),
    Case(
        "corpus-too-small",
        "{r}: data: found 1 usable document(s); need at least 2 (one held out). Per file: {tmp}/one.txt: 1 document(s)",
        put("data.train_files", lambda tmp: [write("one.txt", "A single abstract about sepsis.\n")(tmp)]),
        prepare=True,
    ),
    Case(
        "strict-prepare-over-a-lenient-cache",
        "{r}: data.train_files[0]: {tmp}/notes.jsonl: line 2: malformed JSON line (Expecting value: line 2 column 1 "
        "(char 10)) (data.on_bad_input: error)",
        lenient_cache_then_strict,
        prepare=True,
    ),
    Case(
        "noteevents-without-text-column",
        "{r}: data.train_files[0]: {tmp}/NOTEEVENTS.csv: not a NOTEEVENTS table: no TEXT column(s) in the header",
        put("data.train_files", lambda tmp: [write("NOTEEVENTS.csv", "ROW_ID,CATEGORY,ISERROR\n1,Nursing,\n")(tmp)]),
        prepare=True,
    ),
    # ------------------------------------------------------------------------------- third round (issue 39)
    Case(
        "checkpoints-is-a-file",
        "{r}: train.output_dir: {out}/checkpoints is a file, where the job writes a directory: move it away, or "
        "choose another train.output_dir",
        lambda recipe, tmp: write("run/checkpoints", "my notes")(tmp),
    ),
    Case(
        "summary-is-a-directory",
        "{r}: train.output_dir: {out}/summary.json is a directory, where the job writes a file: move it away, or "
        "choose another train.output_dir",
        lambda recipe, tmp: write("run/summary.json/keep.txt", "mine")(tmp),
    ),
    Case(
        "student-export-over-a-model",
        "{r}: train.output_dir: {out}/student exists and is not a previous student export (it has no "
        "distillation.json): refusing to replace it; choose a new path, or move it away yourself",
        lambda recipe, tmp: write("run/student/model.safetensors", "fine-tuned weights")(tmp),
    ),
    Case("lr-inf", "command line --optim.lr: optim.lr: expected a finite number, got inf", argv=["--optim.lr", ".inf"]),
    Case(
        "all-weights-zero",
        "{r}: losses.terms: every term's weight is 0: the student would learn nothing; give at least one term a "
        "positive weight",
        put("losses.terms", [{**TERMS[0], "weight": 0}, {**TERMS[1], "weight": 0.0}]),
    ),
    Case(
        "weight-inf",
        "{r}: losses.terms[1].weight: expected a finite number, got inf",
        put("losses.terms", [TERMS[0], {**TERMS[1], "weight": float("inf")}]),
    ),
    Case(
        "temperature-inf",
        "command line --losses.temperature: losses.temperature: expected a finite number, got inf",
        argv=["--losses.temperature", ".inf"],
    ),
    Case(
        "section-twice",
        "{r}: train: written twice, at lines {first} and {second}; YAML would keep only the second: merge them "
        "into one",
        text=lambda t: t + "train:\n  max_steps: 3\n",
        twice="train:",
    ),
    Case(
        "key-twice-in-a-term",
        "{r}: losses.terms[0].weight: written twice, at lines {first} and {second}; YAML would keep only the "
        "second: merge them into one",
        text=lambda t: t.replace("    weight: 1.0\n", "    weight: 1.0\n    weight: 0.0\n", 1),
        twice="    weight:",
    ),
    Case(
        "deepspeed-json-misspelt-section",
        "{tmp}/ds.json: zero_optimisation: DeepSpeed does not read this key, and would ignore it (did you mean "
        "'zero_optimization'?)",
        deepspeed_json('{"train_micro_batch_size_per_gpu": 4, "zero_optimisation": {"stage": 2}}'),
    ),
    Case(
        "deepspeed-json-misspelt-clipping",
        "{tmp}/ds.json: gradient_cliping: DeepSpeed does not read this key, and would ignore it (did you mean "
        "'gradient_clipping'?)",
        deepspeed_json('{"train_micro_batch_size_per_gpu": 4, "gradient_cliping": 1.0}'),
    ),
    Case(
        "deepspeed-json-misspelt-zero-field",
        "{tmp}/ds.json: zero_optimization.stagee: DeepSpeed does not read this key (DeepSpeedZeroConfig)",
        deepspeed_json('{"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stagee": 2}}'),
    ),
    Case(
        "deepspeed-json-precision-contradicts-a-flag",
        "command line --train.precision: train.precision: 'fp32', but {tmp}/ds.json makes DeepSpeed train in bf16: "
        'drop the flag, or change fp16/bf16 "enabled" in the JSON ("auto" takes the recipe\'s value)',
        deepspeed_json('{"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": true}}'),
        argv=["--train.precision", "fp32"],
    ),
    Case(
        "deepspeed-json-fp16-and-bf16",
        "{tmp}/ds.json: bf16.enabled: fp16 and bf16 are both enabled: DeepSpeed trains in one; disable one of them",
        deepspeed_json('{"train_micro_batch_size_per_gpu": 4, "fp16": {"enabled": true}, "bf16": {"enabled": true}}'),
    ),
    Case(
        "fp16-on-a-cpu",
        "command line --train.precision: train.precision: fp16 does not train on a CPU (DeepSpeed's loss-scaled fp16 "
        'is for GPUs): use bf16 or fp32 here, or "auto" (fp32 on a CPU, bf16 or fp16 on a GPU)',
        argv=["--train.precision", "fp16"],
    ),
    Case(
        "deepspeed-json-fp16-on-a-cpu",
        "{tmp}/ds.json: fp16.enabled: fp16 does not train on a CPU (DeepSpeed's loss-scaled fp16 is for GPUs): use "
        'bf16 or fp32 here, or "auto" (fp32 on a CPU, bf16 or fp16 on a GPU)',
        deepspeed_json('{"train_micro_batch_size_per_gpu": 4, "fp16": {"enabled": true}}'),
    ),
    Case(
        "student-path-with-teacher-layers",
        "command line --student.path: student.path: '{tmp}/other' would not be read: student.init 'teacher_layers' "
        "builds the student from the teacher's layers; drop student.path, or set student.init: checkpoint to "
        "continue from it",
        argv=["--student.path", "{tmp}/other"],
    ),
    Case(
        "depth-override-with-teacher-layers",
        "command line --student.overrides: student.overrides.num_hidden_layers: 1 contradicts student.teacher_layers "
        "[0, 2]: a student copied from teacher layers has one layer per entry (2); drop the override",
        argv=["--student.overrides", "{num_hidden_layers: 1}"],
    ),
    Case(
        "heads-do-not-divide-the-width",
        "command line --student.overrides: student.overrides.num_attention_heads: the student's config cannot be "
        "built (bert): The hidden size (64) is not a multiple of the number of attention heads (5)",
        put("student", {"init": "config", "mlm_head": True}),
        argv=["--student.overrides", "{num_attention_heads: 5}"],
    ),
    Case(
        "train-file-is-a-directory",
        "command line --data.train_files: data.train_files[0]: {tmp}/notes is a directory; give a glob such as "
        "{tmp}/notes/*.jsonl",
        lambda recipe, tmp: write("notes/a.jsonl", '{"text": "x"}\n')(tmp),
        argv=["--data.train_files", "[{tmp}/notes]"],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_its_exact_error(case, tmp_path, tiny_teacher, tiny_corpus, capsys, monkeypatch):
    recipe = recipe_dict(tiny_teacher, tiny_corpus, tmp_path, TERMS)
    case.edit(recipe, tmp_path)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    path.write_text(case.text(path.read_text()))
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    before = files_under(tmp_path)
    run = prepare.main if case.prepare else cli.main
    code = run(["--config", str(path), *(a.replace("{tmp}", str(tmp_path)) for a in case.argv)])
    program = "biodistill-prepare" if case.prepare else "biodistill"
    vocab = (MINI / "vocab.txt").read_text(encoding="utf-8").splitlines()
    first, second, *_ = [
        n for n, line in enumerate(path.read_text().splitlines(), 1) if line.startswith(case.twice or "\0")
    ] + [0, 0]
    expected = case.error.format(
        r=path, tmp=tmp_path, out=tmp_path / "run", cwd=os.getcwd(), teacher=tiny_teacher, a=vocab[2001], b=vocab[2000],
        first=first, second=second,
    )  # fmt: skip
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"{program}: error: {expected}"
    assert files_under(tmp_path) == before  # nothing the user had is lost or changed, byte for byte
    assert not torch.distributed.is_initialized()  # found before the job joined a process group
    # The signals are this process's again (a subprocess started from here inherits the mask).
    assert not {signal.SIGTERM, signal.SIGUSR1} & signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and preempt.current() is None


def test_catalogue_is_at_least_25_strong():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)


def test_output_dir_without_room_for_a_checkpoint(tmp_path, tiny_teacher, tiny_corpus, capsys):
    """A 1 MiB filesystem cannot hold a checkpoint of the test student: refused before any compute."""
    out = tmp_path / "small"
    out.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(out)]).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    try:
        recipe = recipe_dict(tiny_teacher, tiny_corpus, tmp_path, TERMS, train={"output_dir": str(out)})
        path = write_recipe(tmp_path / "r.yaml", recipe)
        assert cli.main(["--config", str(path)]) == 2
    finally:
        subprocess.run(["umount", str(out)], check=True)
    from transformers import AutoConfig, BertForMaskedLM

    config = AutoConfig.from_pretrained(tiny_teacher)
    config.num_hidden_layers = 2  # student.teacher_layers [0, 2]
    params = sum(p.numel() for p in BertForMaskedLM(config).parameters())
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"biodistill: error: {path}: train.output_dir: {out} has 1.0 MiB free; a checkpoint of this student needs "
        f"about {params * 16 / 2**20:.1f} MiB ({params:,} parameters x 16 bytes: weights and AdamW moments): "
        "free some space or choose another train.output_dir"
    )


def test_fp16_teacher_overflow_is_detected(tiny_teacher):
    """A real overflow: in fp16 a logit beyond 65504 is inf. The trainer's check sees it; fp32 is clean."""
    from transformers import AutoModelForMaskedLM

    from biodistill.engine.distiller import _nonfinite
    from biodistill.engine.models.outputs import Needs, encode

    ids = torch.tensor([[101, 7592, 2088, 102]])
    mask, rows = torch.ones_like(ids), torch.tensor([1, 2])  # flat positions where the head runs
    for dtype, overflows in ((torch.float32, False), (torch.float16, True)):
        teacher = AutoModelForMaskedLM.from_pretrained(tiny_teacher, dtype=dtype).eval()
        head = teacher.cls.predictions
        with torch.no_grad():  # every value representable in fp16; their product is not
            head.transform.LayerNorm.weight.zero_()
            head.transform.LayerNorm.bias.fill_(1.0)  # the head's hidden state: 64 ones
            head.decoder.weight[3000] = 1000.0  # token 3000's logit: 64 x 1000 + 2000 = 66000 > 65504
            head.bias[3000] = 2000.0
            out = encode(teacher, ids, mask, Needs(hidden_states=True, logits=True), rows)
        assert out.logits[:, 3000].float().isinf().all().item() is overflows, dtype
        assert bool(_nonfinite(out)) is overflows, dtype


def test_a_nonfinite_value_in_any_teacher_layer_is_seen(tiny_teacher):
    """The check reads only the last layer of each output kind: an inf or NaN written into any earlier layer's
    output reaches it, through the residual stream and attention, at every position it was put."""
    from transformers import AutoModel

    from biodistill.engine.distiller import _nonfinite
    from biodistill.engine.models.outputs import Needs, encode

    teacher = AutoModel.from_pretrained(tiny_teacher, attn_implementation="eager").eval()
    ids = torch.tensor([[101, 7592, 2088, 2003, 102, 0], [101, 2088, 102, 0, 0, 0]])
    mask = (ids != 0).long()
    needs = Needs(hidden_states=True, attentions=True)
    with torch.no_grad():
        assert not bool(_nonfinite(encode(teacher, ids, mask, needs)))
    for layer in range(len(teacher.encoder.layer) - 1):  # not the last: that one is read directly
        for value in (float("inf"), float("nan")):
            for row, pos in ((0, 2), (1, 4)):  # a real token, and a padded one

                def poison(_module, _inputs, output, row=row, pos=pos, value=value):
                    (output[0] if isinstance(output, tuple) else output)[row, pos, 5] = value

                hook = teacher.encoder.layer[layer].register_forward_hook(poison)
                with torch.no_grad():
                    out = encode(teacher, ids, mask, needs)
                hook.remove()
                assert bool(_nonfinite(out)), (layer, value, row, pos)


def test_deepspeed_json_is_read_as_deepspeed_reads_it(tmp_path, tiny_teacher, tiny_corpus):
    """DeepSpeed's batch rules (any two of the three give the third), at a world size of 4; and a recipe-file
    value that the JSON replaces is said, not silent."""
    from biodistill.engine.config import ConfigError, load_recipe

    def check(body: dict, *flags: str, world: int = 4) -> list[str]:
        (tmp_path / "ds.json").write_text(json.dumps(body))
        recipe = recipe_dict(
            tiny_teacher, tiny_corpus, tmp_path, TERMS, deepspeed={"config": str(tmp_path / "ds.json")}
        )
        return check_deepspeed_json(load_recipe(write_recipe(tmp_path / "r.yaml", recipe), list(flags)), world, 64)

    assert check({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}) == [
        f"{tmp_path / 'ds.json'} sets gradient_accumulation_steps 2, over the recipe's train.grad_accum 1"
    ]
    assert check({"train_batch_size": 16, "train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}) == []  # fmt: skip
    assert check({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3}}) == [
        f"{tmp_path / 'ds.json'} sets zero_optimization.stage 3, over the recipe's deepspeed.zero_stage 2"
    ]
    with pytest.raises(ConfigError) as e:
        check({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4})
    assert (e.value.key, e.value.message) == ("train_batch_size", "30 is not a multiple of train_micro_batch_size_per_gpu x world size = 4 x 4")  # fmt: skip
    with pytest.raises(ConfigError) as e:
        check({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2}, "--train.micro_batch_size", "4")
    assert e.value.key == "train.micro_batch_size" and "makes DeepSpeed train with train_micro_batch_size_per_gpu 2" in e.value.message  # fmt: skip
    with pytest.raises(ConfigError) as e:
        check({"train_micro_batch_size_per_gpu": 0})
    assert (e.value.key, e.value.message) == ("train_micro_batch_size_per_gpu", "must be a positive integer, got 0")


def test_the_deepspeed_json_s_precision_is_the_whole_job_s(tmp_path, tiny_teacher, tiny_corpus):
    """A JSON that decides fp16/bf16 decides it for every part of the job, as it does for DeepSpeed: the teacher's
    dtype, the memory plan and the summary read the resolved recipe. (A JSON in fp16 beside a recipe's "auto" on a
    bf16 GPU gave a bf16 teacher beside an fp16 engine.) A recipe-file value it replaces is said."""
    from biodistill.engine.config import load_recipe, resolve_precision

    def resolved(body: dict, *flags: str, device: str = "cuda"):
        (tmp_path / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, **body}))
        raw = recipe_dict(tiny_teacher, tiny_corpus, tmp_path, TERMS, deepspeed={"config": str(tmp_path / "ds.json")})
        recipe = load_recipe(write_recipe(tmp_path / "r.yaml", raw), list(flags))
        r = resolve_precision(recipe, device, bf16_supported=True)
        return r.train.precision, r.teacher.dtype, check_deepspeed_json(recipe, 1, 64)

    assert resolved({"fp16": {"enabled": True}}) == ("fp16", "fp16", [])
    assert resolved({"bf16": {"enabled": True}}, device="cpu") == ("bf16", "fp32", [])  # a CPU teacher stays fp32
    assert resolved({"bf16": {"enabled": "auto"}}) == ("bf16", "bf16", [])  # "auto": the recipe's own rule
    assert resolved({}, device="cpu") == ("fp32", "fp32", [])
    precision, teacher, notes = resolved({"bf16": {"enabled": True}}, "--teacher.dtype", "fp32")
    assert (precision, teacher) == ("bf16", "fp32")  # an explicit teacher dtype is the user's
    raw = recipe_dict(tiny_teacher, tiny_corpus, tmp_path, TERMS, train={"precision": "fp32"})
    raw["deepspeed"]["config"] = str(tmp_path / "ds.json")
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", raw))
    assert resolve_precision(recipe, "cpu", False).train.precision == "bf16"
    assert check_deepspeed_json(recipe, 1, 64) == [
        f"{tmp_path / 'ds.json'} trains in bf16, over the recipe's train.precision 'fp32': the teacher, the memory "
        "plan, the summary and the export follow the JSON"
    ]
