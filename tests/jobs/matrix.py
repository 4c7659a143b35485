"""A real multi-rank job that trains one recipe under several settings, one after another, in one
process group (a launch costs ~20 s here; a Trainer ~2 s). Each setting writes its own output
directory (``<out>.d/<name>``: monitor CSVs, checkpoints, summary.json); rank 0 also writes, per
setting, its summary (job shape, held-out metrics, per-rank weight digests, memory, step time) to
``--out``. ``--count-syncs`` adds, per setting, the host-device syncs its training steps made on rank 0
(``syncs.py``).

    deepspeed --num_gpus 2 tests/jobs/matrix.py --config r.yaml --out results.json \
        --run zero0 --deepspeed.zero_stage 0 --run zero3-bf16 --deepspeed.zero_stage 3 --train.precision bf16
"""

from __future__ import annotations

import argparse
import json
import sys

import syncs
import torch.distributed as dist

from biodistill.engine.config import load_recipe
from biodistill.engine.trainer import Trainer


def settings(argv: list[str]) -> dict[str, list[str]]:
    """``--run a --x 1 --run b --y 2`` -> ``{"a": ["--x", "1"], "b": ["--y", "2"]}``."""
    runs: dict[str, list[str]] = {}
    words = iter(argv)
    for word in words:
        if word == "--run":
            current = runs.setdefault(next(words), [])
        else:
            current.append(word)
    return runs


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--count-syncs", action="store_true")
    args, rest = parser.parse_known_args()
    results, trainer = {}, None
    calls = syncs.install() if args.count_syncs else None
    for name, overrides in settings(rest).items():
        recipe = load_recipe(args.config, [*overrides, "--train.output_dir", f"{args.out}.d/{name}"])
        trainer = Trainer(recipe)
        results[name] = trainer.fit()
        if calls is not None:
            by_owner: dict[str, list[str]] = {}
            for call in calls:
                by_owner.setdefault(syncs.owner(call), []).append(call)
            results[name]["syncs_in_train_step"], calls[:] = by_owner, []
        trainer.health.stop()  # each setting's watchdog; the next Trainer starts its own
        for engine in (trainer.engine, trainer.teacher_engine):
            if engine is not None:
                engine.destroy()  # its hooks and buffers, before the next setting builds its own
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2, default=str)
    trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
