"""Start-up checks: everything that can be found wrong without loading weights or touching a GPU is
found here, before the job joins its process group, each failure naming the key at fault.

- every local path the recipe names exists and is readable (models, corpora of a known format, the
  DeepSpeed JSON);
- the output directory is writable, has room for a checkpoint, and holds no checkpoints a fresh start
  would overwrite (``--resume`` continues them) - and ``--resume TAG`` names one that exists;
- the teacher's and the student's tokenizers are the same (or ``teacher.vocab_map`` maps one to the
  other), and each model's embeddings cover its tokenizer;
- the recipe's layer maps and copied layers fit both models.

The recipe's values were checked when it loaded (config.validate); these are checks of the world.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from biodistill.engine import checkpoint
from biodistill.engine.config import ConfigError, Recipe, data_files, resolve_path

# Bytes a checkpoint holds per student parameter: the weights (fp32, or bf16 with an fp32 master copy)
# and AdamW's two fp32 moments. ZeRO shards change where the bytes go, not how many there are.
CHECKPOINT_BYTES_PER_PARAM = 16


def check(recipe: Recipe, resume: Optional[str]) -> None:
    """Run every start-up check; raises the first ConfigError found."""
    r = recipe
    for key, path in (("teacher.path", r.teacher.path), ("student.path", r.student.path)):
        if path and _is_local(path):
            _model_dir(r, key, path)
    if r.data.train_files:
        from biodistill.engine.prepare import require_known_format

        for key, path in data_files(r.data, r.source):
            _readable(r, key, path)
            require_known_format(r.source, key, path)
    _writable(r, "train.output_dir", Path(r.train.output_dir))
    if r.data.train_files and not r.data.streaming:
        _writable(r, "data.cache_dir", resolve_path(r.data.cache_dir))
    resume_point(r, resume)
    _room_for_a_checkpoint(r, _models(r))


def resume_point(recipe: Recipe, resume: Optional[str]) -> Optional[tuple[str, dict]]:
    """``(tag, job)`` to resume from, None for a fresh start. ``resume`` is None without ``--resume``,
    "" for the latest, else a tag. A fresh start in a directory with checkpoints is refused: its saves
    would replace them one by one."""
    directory = Path(recipe.train.output_dir) / "checkpoints"
    if resume is None:
        if (directory / "latest").is_file():
            raise ConfigError(
                recipe.source, "train.output_dir",
                f"{directory} already holds checkpoints (latest: {(directory / 'latest').read_text().strip()}); "
                "pass --resume to continue from them, or choose another train.output_dir",
            )  # fmt: skip
        return None
    try:
        return checkpoint.find(str(directory), resume or None)
    except FileNotFoundError as e:
        raise ConfigError("--resume", "", str(e)) from None


def _is_local(path: str) -> bool:
    """A path, not a hub name: a hub name is fetched (or found in the hub cache) by the loader."""
    return path.startswith(("/", ".", "~", "pkg://")) or resolve_path(path).exists()


def _model_dir(r: Recipe, key: str, path: str) -> None:
    where = resolve_path(path)
    if not where.is_dir():
        what = "not a directory" if where.exists() else "not found"
        raise ConfigError(
            r.source, key, f"{path}: {what} (a Hugging Face model directory, pkg://package/dir, or a hub name)"
        )
    config = where / "config.json"
    if not config.is_file():
        raise ConfigError(r.source, key, f"{where} has no config.json: not a Hugging Face model directory")
    _readable(r, key, config)
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(r.source, key, f"{config} is not valid JSON: {e}") from None


def _readable(r: Recipe, key: str, path: Path) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise ConfigError(r.source, key, f"cannot read {path}: {e.strerror}") from None


def _writable(r: Recipe, key: str, directory: Path) -> None:
    probe = directory / f".biodistill-write-test-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(r.source, key, f"cannot write in {directory}: {e.strerror}") from None


def _models(r: Recipe):
    """The teacher's and student's configs, without any weights; the layer maps and copied layers are
    checked against them, and the tokenizers against each other and against both embeddings."""
    from biodistill.engine.losses import build_terms
    from biodistill.engine.students import student_config, teacher_config
    from biodistill.engine.teacher import VocabMap, seen_by_terms

    teachers = teacher_config(r)
    student = student_config(r, teachers)  # checks student.teacher_layers against the teacher
    build_terms(r.losses, student, seen_by_terms(r, teachers, student), r.source)  # every layer map
    teacher_tok = _tokenizer(r, "teacher.path", r.teacher.path) if r.teacher.path else None
    own = bool(r.teacher.vocab_map) or not r.teacher.path  # the student's tokenizer is the one the data uses
    student_tok = _tokenizer(r, "student.path", r.student.path, required=own) if r.student.path else None
    if r.teacher.vocab_map and teacher_tok is not None and student_tok is not None:
        coverage = VocabMap(student_tok, teacher_tok, max(student.vocab_size, len(student_tok))).coverage
        if coverage < 0.5:
            raise ConfigError(
                r.source, "teacher.vocab_map",
                f"only {coverage:.0%} of the student's tokens are in the teacher's vocabulary: the teacher would "
                "read mostly [UNK]; distil from a teacher with a similar vocabulary",
            )  # fmt: skip
        _covers(r, "teacher.path", teachers, teacher_tok)
        _covers(r, "student.path", student, student_tok)
    elif teacher_tok is not None:
        if student_tok is not None:
            _same_tokenizer(r, teacher_tok, student_tok)
        _covers(r, "teacher.path", teachers, teacher_tok)
        _covers(r, "student.path" if r.student.path else "student.overrides.vocab_size", student, teacher_tok)
    elif student_tok is not None:
        _covers(r, "student.path", student, student_tok)
    return student


def _tokenizer(r: Recipe, key: str, path: str, required: bool = True):
    if not _is_local(path):
        return None  # a hub name: the loader fetches it, or says why it cannot
    from transformers import AutoTokenizer

    where = resolve_path(path)
    has_files = any((where / name).is_file() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))
    if not has_files:
        if not required:
            return None
        raise ConfigError(
            r.source, key, f"{where} has no tokenizer (tokenizer.json, vocab.txt or tokenizer_config.json)"
        )
    try:
        return AutoTokenizer.from_pretrained(str(where))
    except (OSError, ValueError) as e:
        raise ConfigError(r.source, key, f"cannot load the tokenizer in {where}: {e}") from None


def _same_tokenizer(r: Recipe, teacher, student) -> None:
    from biodistill.engine.data import tokenizer_fingerprint

    if tokenizer_fingerprint(teacher) == tokenizer_fingerprint(student):
        return
    tv, sv = teacher.get_vocab(), student.get_vocab()
    only_s = sorted(set(sv) - set(tv), key=sv.get)[:3]
    moved = sorted((t for t in set(sv) & set(tv) if sv[t] != tv[t]), key=sv.get)[:3]
    if only_s or moved or len(sv) != len(tv):
        differs = (
            f"{len(sv)} tokens vs the teacher's {len(tv)}"
            + (f"; not in the teacher's: {only_s}" if only_s else "")
            + (f"; other ids: {[(t, sv[t], tv[t]) for t in moved]}" if moved else "")
        )
    else:
        differs = "same vocabulary, different normalisation or pre-tokenisation (e.g. cased vs uncased)"
    raise ConfigError(
        r.source, "student.path",
        f"the student's tokenizer differs from the teacher's ({differs}); the data is tokenised once, with "
        "the teacher's: start the student from a checkpoint with the teacher's tokenizer, or set "
        "teacher.vocab_map: by_token to map the student's to the teacher's",
    )  # fmt: skip


def _covers(r: Recipe, key: str, config, tokenizer) -> None:
    vocab = getattr(config, "vocab_size", None) if config is not None else None
    if vocab is not None and vocab < len(tokenizer):
        raise ConfigError(
            r.source, key,
            f"the model's vocab_size {vocab} is smaller than its tokenizer's {len(tokenizer)} tokens: token ids "
            f">= {vocab} have no embedding",
        )  # fmt: skip


def _room_for_a_checkpoint(r: Recipe, student_config) -> None:
    from biodistill.engine.models import Needs
    from biodistill.engine.students import _new

    with torch.device("meta"):  # shapes only, no memory
        params = sum(p.numel() for p in _new(r, student_config, Needs()).parameters())
    need = params * CHECKPOINT_BYTES_PER_PARAM
    directory = Path(r.train.output_dir) / "checkpoints"
    existing = directory if directory.exists() else directory.parent
    free = shutil.disk_usage(existing).free
    if free < need:
        raise ConfigError(
            r.source, "train.output_dir",
            f"{existing} has {free / 2**20:.1f} MiB free; a checkpoint of this student needs about "
            f"{need / 2**20:.1f} MiB ({params:,} parameters x {CHECKPOINT_BYTES_PER_PARAM} bytes: weights and "
            "AdamW moments): free some space or choose another train.output_dir",
        )  # fmt: skip
