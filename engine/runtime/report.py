"""What a job reports: training metrics per log interval, held-out metrics before, during and after,
each rank's resources at the end, and the before/after table.

Every event goes to DeepSpeed's monitors (TensorBoard, CSV) when they are on and, exactly (JSON floats
round-trip), to ``metrics.jsonl`` on rank 0; the progress bar shows the loss, tokens/s and skips.
"""

from __future__ import annotations

import json
import os
import resource
import socket
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import checkpoint
from .distributed import Dist


class Reporter:
    def __init__(self, engine, dist_: Dist, out: Path, term_names: list[str]):
        self.engine, self.dist, self.term_names = engine, dist_, term_names
        self.metrics_log = None
        if dist_.is_main:
            out.mkdir(parents=True, exist_ok=True)
            self.metrics_log = open(out / "metrics.jsonl", "a", encoding="utf-8")

    def train(self, step: int, window: torch.Tensor, seconds: float, skips: dict, bar) -> None:
        """One log interval: ``window`` is [loss, *terms, tokens, kept] summed over this rank's micro-batches,
        ``kept`` counting those not skipped (the only ones in the sums)."""
        window = window.clone()
        dist.all_reduce(window)  # one collective per log interval, not per step
        *sums, tokens, kept = window.tolist()  # the interval's one host read
        means = [x / max(kept, 1) for x in sums]
        metrics = {
            "loss": means[0],
            **dict(zip(self.term_names, means[1:])),
            "lr": self.engine.get_lr()[0],
            "tokens_per_s": tokens / max(seconds, 1e-9),
            **{f"skipped/{k}": v for k, v in skips.items()},
            "skipped/fp16_overflow_steps": self.engine.skipped_steps,  # DeepSpeed's loss-scale skips
        }
        self.write("train", metrics, step)
        skipped = sum(skips.values())
        shown = {"skipped": skipped} if skipped else {}
        bar.set_postfix(loss=f"{means[0]:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}", **shown, refresh=False)

    def write(self, prefix: str, metrics: dict[str, float], step: int) -> None:
        if self.engine.monitor.enabled:
            self.engine.monitor.write_events([(f"{prefix}/{k}", v, step) for k, v in metrics.items()])
        if self.metrics_log is not None:  # exact values (JSON floats round-trip), one line per event
            self.metrics_log.write(json.dumps({"step": step, "split": prefix, **metrics}) + "\n")
            self.metrics_log.flush()

    def heldout(self, when: str, metrics: dict[str, float], step: int) -> None:
        """The held-out metrics before or after training: written, and printed on rank 0."""
        self.write(f"eval_{when}", metrics, step)
        if self.dist.is_main:
            shown = "  ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            tqdm.write(f"[biodistill] held-out {when} (step {step}): {shown}")

    def close(self) -> None:
        if self.metrics_log is not None:
            self.metrics_log.close()


def resources(engine, student, step: int, step_seconds: list[float], teacher_bytes: int, dist_: Dist) -> list[dict]:
    """Per rank: host, threads, a digest of the student's weights, peak memory, teacher parameter bytes
    held, step time (median, after the first step). Raises when the replicas' weights differ."""
    timed = sorted(step_seconds[1:] or step_seconds)
    mine = {
        "rank": dist_.rank,
        "local_rank": dist_.local_rank,
        "host": socket.gethostname(),
        "threads": torch.get_num_threads(),
        "student_sha256": checkpoint.weights_digest(engine, student),
        "rss_mib": _rss_mib(),  # now, after training: what the job holds in its steady state
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux reports KiB
        "peak_device_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "teacher_param_mib": teacher_bytes / 2**20,
        "step_seconds": timed[len(timed) // 2] if timed else None,
    }
    ranks = [None] * dist_.world
    dist.all_gather_object(ranks, mine)
    digests = {r["student_sha256"] for r in ranks}
    if len(digests) > 1:  # a replica that drifted (a rank-dependent bug, a flaky device) spoils the export
        groups = {d: [r["rank"] for r in ranks if r["student_sha256"] == d] for d in digests}
        raise RuntimeError(f"student weights differ across ranks after step {step}: {list(groups.values())}")
    return ranks


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def format_report(before: dict[str, float], after: dict[str, float]) -> str:
    """The held-out table printed at the end: each metric before and after distillation."""
    lines = ["", "held-out teacher-student comparison   before      after", "-" * 58]
    for key in before:
        better = "higher is better" if key.startswith("agreement") or key.endswith("accuracy") else "lower is better"
        lines.append(f"{key:<36}{before[key]:>8.4f} {after.get(key, float('nan')):>10.4f}   ({better})")
    return "\n".join(lines)


def write_summary(out: Path, summary: dict, dist_: Dist) -> None:
    """``summary.json`` on rank 0, and the before/after table."""
    if dist_.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        tqdm.write(format_report(summary["before"], summary["after"]))
