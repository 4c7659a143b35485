"""Start-up checks of the world: everything about paths, disks and checkpoints that can be found wrong
without loading weights or touching a GPU, before the job joins its process group, each failure naming
the key at fault. ``cli.check`` runs these, then the checks of the corpus formats (``data/corpora.py``),
the models' configs and layer maps (``models/students.py``, ``losses.py``) and the tokenizers
(``data/tokenise.py``).

- every local path the recipe names exists and is readable (model directories with a valid
  config.json, corpora);
- the output directory is writable, has room for a checkpoint, and holds no checkpoints a fresh start
  would overwrite (``--resume`` continues them) - and ``--resume TAG`` names one that exists;
- on a node without the hub, every hub name the job loads is in the local cache.

The recipe's values were checked when it loaded (config.validate); these are checks of the world.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

from ..config import ConfigError, Recipe, data_files, is_local, resolve_path
from . import checkpoint, hub

# Bytes a checkpoint holds per student parameter: the weights (fp32, or bf16 with an fp32 master copy)
# and AdamW's two fp32 moments. ZeRO shards change where the bytes go, not how many there are.
CHECKPOINT_BYTES_PER_PARAM = 16


def check(recipe: Recipe, resume: Optional[str]) -> None:
    """The checks of the world: local model directories and corpora readable, output and cache
    directories writable, the resume target whole. Raises the first ConfigError found."""
    r = recipe
    for key, path in (("teacher.path", r.teacher.path), ("student.path", r.student.path)):
        if path and is_local(path):
            _model_dir(r, key, path)
    if r.data.train_files:
        for key, path in data_files(r.data, r.source):
            _readable(r, key, path)
    _writable(r, "train.output_dir", Path(r.train.output_dir))
    if r.data.train_files and not r.data.streaming:
        _writable(r, "data.cache_dir", resolve_path(r.data.cache_dir))
    resume_point(r, resume)
    for key, name, weights in (("teacher.path", r.teacher.path, True),
                               ("student.path", r.student.path, r.student.init == "checkpoint")):  # fmt: skip
        missing = hub.check_cached(name, weights) if name else None
        if missing:  # an offline node: fail now, not after the process group and the hub client's retries
            raise ConfigError(r.source, key, missing)


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


def room_for_a_checkpoint(r: Recipe, params: int) -> None:
    """Room in ``train.output_dir`` for one checkpoint of a student of ``params`` parameters."""
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
