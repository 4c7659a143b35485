"""``biodistill-evaluate --config configs/eval/<suite>.yaml [--section.key value ...]``

Read every task and check every model first (a bad file or a missing tokenizer stops the run before any
cell trains), run the grid's unfinished cells, then measure each model's cost and write the report.
Rerunning the same command resumes an interrupted grid; finished cells are never rerun.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="biodistill-evaluate",
        description="Fine-tune models on downstream tasks and report scores against cost. "
        "Override any suite key with --section.key value (e.g. --protocol.seeds [1]).",
    )
    parser.add_argument("--config", required=True, help="evaluation suite YAML (configs/eval/*.yaml)")
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)  # set for worker processes
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    from . import grid, report
    from .suite import load_suite

    try:
        suite = load_suite(args.config, overrides)
        paths, prints = grid.run_grid(suite, overrides, args.worker, args.workers)
        if args.workers > 1:
            return 0  # a worker: the parent reports
        results = grid.aggregate(suite)
        planned = grid.cells(suite)
        done = sum(grid.finished(suite, c) for c in planned)
        table = report.write_report(suite, results, report.costs(suite, paths, prints), len(planned), done)
    except ConfigError as e:
        print(f"biodistill-evaluate: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(table)
    print(f"[eval] report: {suite.output_dir}/results.md, results.json, score_vs_parameters.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
