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
from typing import Optional

from .config import ConfigError, Recipe, data_files, load_recipe
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


def check(recipe: Recipe, resume: Optional[str]) -> None:
    """The start-up checks: everything that can be found wrong without weights, a process group or a
    GPU, each failure a ConfigError naming the key at fault. The world first (paths, writable
    directories, the resume target, an offline node's cache), then the corpus formats, then the models'
    configs: copied layers, position limits, every loss term's layer map, the tokenizers, and room on
    disk for a checkpoint of this student."""
    from .data import corpora, tokenise
    from .losses import build_terms, validate_terms
    from .models.outputs import hidden_size
    from .models.students import check_positions, parameter_count, student_config, teacher_config
    from .models.teacher import seen_by_terms
    from .runtime import preflight
    from .runtime.distributed import check_deepspeed_json, check_precision, launch_world

    r = recipe
    validate_terms(r)  # each term's kind and options, by its own class
    preflight.check(r, resume)
    if r.data.train_files:
        for key, path in data_files(r.data, r.source):
            corpora.require_known_format(r.where("data.train_files"), key, path)
    teacher = teacher_config(r)
    student = student_config(r, teacher)  # student.teacher_layers against the teacher
    check_positions(r, teacher, student)  # data.max_length against both models' position embeddings
    params = parameter_count(r, student)  # built on the meta device: a config its family refuses is named now
    check_precision(r)  # fp16 only where there is a GPU
    for note in check_deepspeed_json(r, launch_world(), hidden_size(student)):  # batch arithmetic, flags vs JSON
        if os.environ.get("RANK", "0") == "0":
            print(f"[biodistill] note: {note}", file=sys.stderr, flush=True)
    build_terms(r.losses, student, seen_by_terms(r, teacher, student), r.source)  # every layer map
    tokenise.check_tokenizers(r, teacher, student)
    preflight.room_for_a_checkpoint(r, params)


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
        from .runtime import faults
        from .runtime.health import JobError
        from .trainer import Trainer

        faults.arm()
        check(recipe, args.resume)  # before any process group, weights or compute
        trainer = Trainer(recipe, resume=args.resume)
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
