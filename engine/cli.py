"""``deepspeed launch/train.py --config configs/<recipe>.yaml [--smoke] [--section.key value ...] [--resume [TAG]]``

Parse, build, train, close. Anything after the known flags is a dotted override of the recipe.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from biodistill.engine.config import ConfigError, load_recipe


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
    args, overrides = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the loader forks; HF tokenizers warn otherwise
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    import datasets
    import transformers

    # Library progress bars (tokenising, saving shards, loading weights) would print once per rank.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if os.environ.get("RANK", "0") != "0":
        datasets.disable_progress_bars()
    try:
        transform = None
        if args.smoke:
            from biodistill.engine.smoke import smoke as transform
        recipe = load_recipe(args.config, overrides, deepspeed_config=args.deepspeed_config or "", transform=transform)
        from biodistill.engine import faults, preflight
        from biodistill.engine.health import JobError
        from biodistill.engine.trainer import Trainer

        faults.arm()
        preflight.check(recipe, args.resume)  # before any process group, weights or compute
        trainer = Trainer(recipe, resume=args.resume)
        try:
            trainer.fit()
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
