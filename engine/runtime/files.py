"""Writing files and directories whole or not at all, and never over what the user put there.

Two rules every writer in the project follows:

- a small file (a checkpoint's record, a report) is written beside its target and renamed over it
  (:func:`write_atomic`);
- a directory the tools replace whole (a student export, an ONNX export, a prepared cache, an evaluation's
  output) is built under a temporary name and renamed into place (:func:`replace_dir`). What it replaces must
  be a previous product of the same tool, recognised by the marker file that tool writes into every product
  (``export.json`` for an ONNX export, ``distillation.json`` for a student export, ...). Anything else that
  exists at that path, a file, a model directory, a folder of results, is refused by :func:`check_replaceable`,
  which the tools call at start, before any compute, and :func:`replace_dir` calls again before it renames.

Kept apart from checkpoint.py so that light tools (biodistill-evaluate, biodistill-export) need not import
DeepSpeed for it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Optional


def sha256_of(path: Path) -> str:
    """The file's sha256, read in 16 MiB blocks (checkpoint shards and stored outputs are GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` whole: written beside it, flushed, renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def not_replaceable(target: Path, marker: str, what: str, keep: tuple[Path, ...] = ()) -> Optional[str]:
    """Why ``target`` may not be replaced by a new ``what`` (a sentence naming it), or None when it may: it does
    not exist, or it is a directory holding ``marker`` (a previous ``what``) and none of the paths in ``keep``
    (the tool's own inputs, e.g. the model being exported) lies inside it."""
    target = Path(target)
    if not os.path.lexists(target):
        return None
    if target.is_symlink() or not target.is_dir():
        kind = "a symbolic link" if target.is_symlink() else "a file"
        return f"{target} is {kind}, not a previous {what}: refusing to replace it; choose another path"
    resolved = target.resolve()
    for path in keep:
        inside = Path(path).resolve()
        if inside == resolved or resolved in inside.parents:
            held = "is" if inside == resolved else f"holds {path},"
            return f"{target} {held} what this command reads: refusing to replace it; write the {what} elsewhere"
    if not (target / marker).is_file():
        return (
            f"{target} exists and is not a previous {what} (it has no {marker}): refusing to replace it; choose "
            "a new path, or move it away yourself"
        )
    return None


def replace_dir(tmp: Path, final: Path, marker: str, what: str, keep: tuple[Path, ...] = ()) -> None:
    """Move the finished directory ``tmp`` to ``final``, replacing a previous ``what`` there whole. The rule of
    :func:`not_replaceable` is checked again here, since the world may have changed since the start; on a
    refusal ``tmp`` is removed and a FileExistsError names what is in the way."""
    final = Path(final)
    refusal = not_replaceable(final, marker, what, keep)
    if refusal is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FileExistsError(refusal)
    if not os.path.lexists(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
        return
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)  # a directory cannot be renamed over a non-empty one: the previous product steps aside
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
