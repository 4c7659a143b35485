"""``deepspeed launch/train.py --config configs/<recipe>.yaml [--smoke] [--section.key value ...] [--resume [TAG]]``

Parse, check, train, close. Anything after the known flags is a dotted override of the recipe. Exit codes:
0 done; 2 a bad recipe, flag or file (the message names it); 75 preempted (SIGTERM or SIGUSR1): the same
command with ``--resume`` continues from the checkpoint written on the way out; anything else a failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from .config import ConfigError, load_recipe
from .runtime import preempt


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(
        prog="biodistill-train",
        description="Distil a frozen teacher into a student under DeepSpeed. "
        "Override any recipe key with --section.key value (e.g. --train.max_steps 50).",
    )
    parser.add_argument("--config", required=True, help="recipe YAML (configs/*.yaml)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="TAG",
        help="continue from the latest checkpoint in train.output_dir (or from TAG, e.g. step400)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="shrink models, data and steps, keeping the recipe's losses, layer maps and init rule "
        "(runs anywhere in about a minute, offline)",
    )
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    import deepspeed  # its standard flags: --deepspeed, --deepspeed_config ds.json

    deepspeed.add_config_arguments(parser)
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    # First, before torch or DeepSpeed start a thread: SIGTERM and SIGUSR1 save the step reached and exit 75.
    with preempt.installed() as preemption:
        return run(argv, preemption)


def run(argv: list[str] | None, preemption: preempt.Preemption) -> int:
    args, overrides = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the loader forks; HF tokenizers warn otherwise
    # DeepSpeed's ZeRO calls torch's all_gather_into_tensor, which torch 2.13 deprecates, once per rank per job:
    # not ours to fix, and nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    import datasets
    import transformers

    # Library progress bars (tokenising, saving shards, loading weights) would print once per rank.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if os.environ.get("RANK", "0") != "0":
        datasets.disable_progress_bars()
    from .runtime import hub

    hub.decide()  # once, before any hub name is asked for: an offline node must not wait on retries
    try:
        transform = None
        if args.smoke:
            from .models.smoke import smoke as transform
        recipe = load_recipe(args.config, overrides, deepspeed_config=args.deepspeed_config or "", transform=transform)
        preemption.configure(recipe.train.output_dir, recipe.train.preempt_grace)
        from .plan import make_plan
        from .runtime import faults
        from .runtime.health import JobError
        from .trainer import Trainer

        faults.arm()
        plan = make_plan(recipe, args.resume)  # the start-up checks, before any process group, weights or compute
        trainer = Trainer(plan)
        try:
            trainer.fit()
        except preempt.Preempted as stop:
            said = preemption.summary(stop.tag, stop.step, stop.seconds)  # from the store, before close ends it
            trainer.close()
            if trainer.dist.is_main:
                print(said, file=sys.stderr, flush=True)
            return preempt.PREEMPTED
        except ConfigError:
            raise
        except Exception as e:
            if trainer.health is None:
                raise
            # Names the rank at fault, ends every rank of the job, exits non-zero; never returns.
            trainer.health.fail(e, quiet=isinstance(e, JobError) and trainer.dist.rank != 0)
        trainer.close()
    except ConfigError as e:
        print(f"biodistill: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
