"""Start-up checks of the world: everything about paths, disks and checkpoints that can be found wrong
without loading weights or touching a GPU, before the job joins its process group, each failure naming
the key at fault. ``plan.make_plan`` runs these, then the checks of the corpus formats (``data/corpora.py``),
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


def check(recipe: Recipe, resume: Optional[str]) -> Optional[tuple[str, dict]]:
    """The checks of the world: local model directories and corpora readable, output and cache
    directories writable, the resume target whole. Raises the first ConfigError found; returns the checkpoint
    ``--resume`` continues, as ``(tag, job)`` (None for a fresh start)."""
    r = recipe
    for key, path in (("teacher.path", r.teacher.path), ("student.path", r.student.path)):
        if path and is_local(path):
            _model_dir(r, key, path)
    if r.data.train_files:
        for key, path in data_files(r.data, r.source):
            _readable(r, key, path)
    _writable(r, "train.output_dir", Path(r.train.output_dir))
    written_paths(r)
    if r.data.train_files and not r.data.streaming:
        _writable(r, "data.cache_dir", resolve_path(r.data.cache_dir))
    found = resume_point(r, resume)
    for key, name, weights in (("teacher.path", r.teacher.path, True),
                               ("student.path", r.student.path, r.student.init == "checkpoint")):  # fmt: skip
        missing = hub.check_cached(name, weights) if name else None
        if missing:  # an offline node: fail now, not after the process group and the hub client's retries
            raise r.error(key, missing)
    return found


def job_paths(r: Recipe) -> tuple[list[Path], list[Path]]:
    """(directories, files) the job writes under ``train.output_dir``: each must be absent or of its kind."""
    out = Path(r.train.output_dir)
    dirs = [out / "checkpoints"]
    if r.deepspeed.tensorboard or r.deepspeed.csv:
        dirs.append(out / "monitor")
    if r.train.sample_log:
        dirs.append(out / "samples")
    return dirs, [out / "metrics.jsonl", out / "summary.json", out / "deepspeed_config.json"]


def written_paths(r: Recipe) -> None:
    """Every path the job will write, checked now: a file where a directory goes (or the reverse), or a student
    export over something that is not one, would otherwise fail the job at its first save or at the end, after
    all the compute."""
    from .checkpoint import STUDENT_MARKER
    from .files import not_replaceable

    key = "train.output_dir"
    dirs, files = job_paths(r)
    for path in dirs:
        if path.exists() and not path.is_dir():
            raise r.error(key, f"{path} is a file, where the job writes a directory: move it away, or choose another "
                          "train.output_dir")  # fmt: skip
    for path in files:
        if path.is_dir():
            raise r.error(key, f"{path} is a directory, where the job writes a file: move it away, or choose another "
                          "train.output_dir")  # fmt: skip
    if r.train.export:
        refusal = not_replaceable(Path(r.train.output_dir) / "student", STUDENT_MARKER, "student export")
        if refusal is not None:
            raise r.error(key, refusal)
    if r.is_task:  # the caches a task recipe writes: the fine-tuned teacher, the stored outputs
        for cache_key, value in (("task.finetune.cache_dir", r.task.finetune.cache_dir),
                                 ("task.outputs_dir", r.task.outputs_dir)):  # fmt: skip
            path = resolve_path(value)
            if path.exists() and not path.is_dir():
                raise r.error(cache_key, f"{path} is a file, where the job keeps a cache folder: move it away, or "
                              "choose another folder")  # fmt: skip


def resume_point(recipe: Recipe, resume: Optional[str]) -> Optional[tuple[str, dict]]:
    """``(tag, job)`` to resume from, None for a fresh start. ``resume`` is None without ``--resume``,
    "" for the latest, else a tag. A fresh start in a directory with checkpoints is refused: its saves
    would replace them one by one."""
    directory = Path(recipe.train.output_dir) / "checkpoints"
    if resume is None:
        if (directory / "latest").is_file():
            raise recipe.error(
                "train.output_dir",
                f"{directory} already holds checkpoints (latest: {(directory / 'latest').read_text().strip()}); "
                "pass --resume to continue from them, or choose another train.output_dir",
            )  # fmt: skip
        return None
    try:
        found = checkpoint.find(str(directory), resume or None)
    except FileNotFoundError as e:
        raise ConfigError("--resume", "", str(e)) from None
    if found is not None and "recipe" in found[1]:
        refused, _ = recipe_changes(found[1]["recipe"], recipe)
        if refused:
            keys = ", ".join(f"{k} ({before!r} -> {now!r})" for k, before, now in refused)
            raise ConfigError(
                "--resume", refused[0][0],
                f"{directory / found[0]} was made under another recipe: {keys}. These change {_what(refused)}, so "
                "the checkpoint cannot continue under them: resume with the recipe it was made with, or train "
                "afresh in another train.output_dir (its student can start one: student.init checkpoint)",
            )  # fmt: skip
    return found


# Recipe keys a resumed job may not change. The student's shape and source, the teacher it learns from and the terms'
# layer maps and projections make the checkpoint's weights what they are; the data keys fix which sequences the saved
# read position counts (a resume reads every sequence once, from where the checkpoint stopped).
_MODEL_KEYS = ("teacher.path", "teacher.vocab_map", "student.", "losses.terms")
_DATA_KEYS = tuple(
    f"data.{k}"
    for k in ("train_files", "dataset", "dataset_config", "dataset_split", "text_field", "max_length", "packing",
              "long_documents", "note_categories", "note_types", "deid", "require_abstract", "pmc_parts",
              "pmc_section_titles", "pmc_require_body", "heldout_fraction", "seed", "streaming")
)  # fmt: skip
# A task recipe's examples and head: every task key but where its caches live and what only names or scores it.
_TASK_FREE = ("task.teacher_outputs", "task.outputs_dir", "task.finetune.cache_dir", "task.name", "task.metric")
# Resolved at run time, so the checkpoint holds the concrete value where the recipe may say "auto"; and the output
# directory, which a copied run legitimately changes.
_RESOLVED = ("train.precision", "teacher.dtype", "train.output_dir", "deepspeed.config")


def recipe_changes(saved: dict, recipe: Recipe) -> tuple[list, list]:
    """``(refused, noted)``: the recipe keys that differ between a checkpoint's recipe and this one, each as
    ``(key, saved value, value now)``; refused are those a resume cannot honour, noted the rest (a longer
    train.max_steps, a new learning rate: the job continues under them and says so)."""
    saved = {"task": Recipe().to_dict()["task"], **saved}  # checkpoints from before task recipes: none was one
    before, now = _leaves(_comparable(saved)), _leaves(_comparable(recipe.to_dict()))
    changed = [
        (k, before.get(k), now.get(k)) for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)
    ]
    changed = [c for c in changed if not (c[0] in _RESOLVED and (c[2] == "auto" or c[0] in _RESOLVED[2:]))]
    refused = [c for c in changed if c[0].startswith(_MODEL_KEYS + _DATA_KEYS)
               or (c[0].startswith("task.") and c[0] not in _TASK_FREE)]  # fmt: skip
    return refused, [c for c in changed if c not in refused]


def _comparable(recipe: dict) -> dict:
    """The terms without their weights and temperatures: those change the objective, not what the weights are."""
    terms = recipe.get("losses", {}).get("terms", [])
    fixed = [{k: v for k, v in t.items() if k not in ("weight", "temperature")} for t in terms]
    weights = {f"losses.weights[{i}]": [t.get("weight"), t.get("temperature")] for i, t in enumerate(terms)}
    return {**recipe, "losses": {**recipe.get("losses", {}), "terms": fixed, **weights}}


def _leaves(node: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in node.items():
        if isinstance(v, dict) and v and k != "overrides":
            out |= _leaves(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _what(refused: list) -> str:
    kinds = {"the model the checkpoint holds" if k.startswith(_MODEL_KEYS + ("task.",)) else "which sequences its read position counts" for k, *_ in refused}  # fmt: skip
    return " and ".join(sorted(kinds))


def _model_dir(r: Recipe, key: str, path: str) -> None:
    where = resolve_path(path)
    if not where.is_dir():
        what = "not a directory" if where.exists() else "not found"
        raise r.error(key, f"{path}: {what} (a Hugging Face model directory, pkg://package/dir, or a hub name)")
    config = where / "config.json"
    if not config.is_file():
        raise r.error(key, f"{where} has no config.json: not a Hugging Face model directory")
    _readable(r, key, config)
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise r.error(key, f"{config} is not valid JSON: {e}") from None


def _readable(r: Recipe, key: str, path: Path) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise r.error(key, f"cannot read {path}: {e.strerror}") from None


def _writable(r: Recipe, key: str, directory: Path) -> None:
    probe = directory / f".biodistill-write-test-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise r.error(key, f"cannot write in {directory}: {e.strerror}") from None


def room_for_a_checkpoint(r: Recipe, params: int) -> None:
    """Room in ``train.output_dir`` for one checkpoint of a student of ``params`` parameters."""
    need = params * CHECKPOINT_BYTES_PER_PARAM
    directory = Path(r.train.output_dir) / "checkpoints"
    existing = directory if directory.exists() else directory.parent
    free = shutil.disk_usage(existing).free
    if free < need:
        raise r.error(
            "train.output_dir",
            f"{existing} has {free / 2**20:.1f} MiB free; a checkpoint of this student needs about "
            f"{need / 2**20:.1f} MiB ({params:,} parameters x {CHECKPOINT_BYTES_PER_PARAM} bytes: weights and "
            "AdamW moments): free some space or choose another train.output_dir",
        )  # fmt: skip
