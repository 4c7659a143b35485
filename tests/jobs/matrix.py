"""A real multi-rank job that trains one recipe under several settings, one after another, in one
process group (a launch costs ~17 s here, nearly all of it imports and start-up; a Trainer ~2 s). A setting
may name its own recipe (``--config``) and ask for its smoke version (``--smoke``, as launch/train.py does);
each goes through the entry point's start-up checks (engine/plan.py, ``make_plan``) before its Trainer. Each setting
writes its own output directory (``<out>.d/<name>``, or the smoke version's: monitor CSVs, checkpoints,
summary.json); rank 0 also writes, per setting, its summary (job shape, held-out metrics, per-rank weight
digests, memory, step time, ``output_dir``) to ``--out``. ``--count-syncs`` adds, per setting, the host-device
syncs its training steps made on rank 0 (``syncs.py``).

    deepspeed --num_gpus 2 tests/jobs/matrix.py --config r.yaml --out results.json \
        --run zero0 --deepspeed.zero_stage 0 --run zero3-bf16 --deepspeed.zero_stage 3 --train.precision bf16 \
        --run tiny --config configs/tinybiobert.yaml --smoke
"""

from __future__ import annotations

import argparse
import json
import sys

import syncs
import torch.distributed as dist

from biodistill.engine.config import Recipe, load_recipe
from biodistill.engine.models.smoke import smoke
from biodistill.engine.plan import make_plan
from biodistill.engine.runtime import hub
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


def at(recipe: Recipe, output_dir: str) -> Recipe:
    recipe.train.output_dir = output_dir
    return recipe


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", help="the recipe of every setting that does not name its own")
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--count-syncs", action="store_true")
    argv = sys.argv[1:]
    first = argv.index("--run") if "--run" in argv else len(argv)
    args = parser.parse_args(argv[:first])  # the job's own flags; each setting's follow its --run
    rest = argv[first:]
    results, trainer = {}, None
    calls = syncs.install() if args.count_syncs else None
    hub.decide()
    for name, overrides in settings(rest).items():
        own = argparse.ArgumentParser(allow_abbrev=False)
        own.add_argument("--config", default=args.config)
        own.add_argument("--smoke", action="store_true")
        run, overrides = own.parse_known_args(overrides)
        out = f"{args.out}.d/{name}"
        if run.smoke:  # the smoke version lives beside its output_dir, as launch/train.py --smoke puts it
            recipe = load_recipe(run.config, overrides, transform=lambda r, out=out: smoke(at(r, out)))
        else:
            recipe = load_recipe(run.config, [*overrides, "--train.output_dir", out])
        trainer = Trainer(make_plan(recipe, None))  # the start-up checks first, as the entry point runs them
        results[name] = {**trainer.fit(), "output_dir": recipe.train.output_dir}
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
