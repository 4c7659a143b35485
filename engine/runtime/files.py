"""Writing a small file whole or not at all: checkpoints' records, the evaluation grid's records and reports.
Kept apart from checkpoint.py so that light tools (biodistill-evaluate) need not import DeepSpeed for it."""

from __future__ import annotations

import os
from pathlib import Path


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
