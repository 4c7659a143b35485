"""Fault injection on real 2-rank DeepSpeed jobs (CPU, gloo): SIGKILL at many points and exact resume,
a rank that dies or stalls, NaN batches, a full disk while saving.

Faults come from the engine's failpoints (``BIODISTILL_FAILPOINTS``, see engine/runtime/faults.py) or from the
test itself (SIGKILL of the whole process group at an arbitrary moment, a tmpfs that fills up).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    REPO,
    assert_checkpoints_consistent,
    deepspeed_cmd,
    exact,
    job_env,
    launch,
    metrics,
    reached,
    shm_released,
    summary,
)  # fmt: skip

pytestmark = pytest.mark.multirank


def faulty(recipe: Path, failpoints: str, *extra: str, **kw) -> subprocess.CompletedProcess:
    os.environ["BIODISTILL_FAILPOINTS"] = failpoints
    try:
        return launch(recipe, *extra, **kw)
    finally:
        del os.environ["BIODISTILL_FAILPOINTS"]


def announced(proc: subprocess.CompletedProcess, action: str) -> float:
    """When the failpoint fired (the engine prints it with a timestamp)."""
    m = re.search(rf"failpoint \S+ \(step \S+\) on rank \d+: {action} at ([\d.]+)", proc.stderr)
    assert m, proc.stderr[-3000:]
    return float(m.group(1))


@pytest.fixture(scope="module")
def job(dropout_job):
    return dropout_job


# One failpoint per launch; each launch resumes from whatever the previous one left. POINT[@STEP][#HIT][:RANK].
KILLS = [
    "train.micro@1#2:0",  # mid-accumulation, before the first checkpoint exists
    "save.file@2#1:1",  # rank 1 has written one file of the first checkpoint
    "save.meta@2:0",  # every file written and biodistill.json in place, the folder not yet renamed
    "save.renamed@2:0",  # step2 in place, `latest` not yet written: the next run starts over
    "save.latest@2:0",  # `latest` moved, the other rank still in the save
    "eval.batch@3#1:1",  # inside the step-3 evaluation
    "train.step@4:1",  # the step-4 update applied but never saved
    "save.prune@6:0",  # step6 complete and latest; step2 about to be deleted
    "save.file@8#2:0",  # rank 0 in the middle of the step-8 checkpoint
    None,  # the test kills the whole job (launcher and ranks) once it has logged step 9
    "export.begin:0",  # after the final checkpoint, during the export
]


def test_killed_anywhere_resumes_bit_identically(job):
    """SIGKILL at 11 points, mid-save included; every run resumes from `latest` and every loss it logs,
    train and held-out, equals the uninterrupted run's bit for bit, as do the final weights."""
    tmp, recipe = job
    run = tmp / "killed"
    common = ["--resume", "--train.output_dir", str(run)]
    reference = {r["step"]: exact(r) for r in metrics(tmp / "reference")}
    reference_eval = {r["step"]: r for r in metrics(tmp / "reference", "eval")}
    for point in KILLS:
        if point is None:
            proc = kill_job_after(recipe, run, step=9, extra=common)
        else:
            proc = faulty(recipe, f"{point}=kill", *common)
            announced(proc, "kill")
        assert proc.returncode != 0, point
        assert_checkpoints_consistent(run / "checkpoints")
    proc = launch(recipe, *common)
    assert proc.returncode == 0
    logged = metrics(run)
    assert {r["step"] for r in logged} == set(reference)
    for row in logged:  # every run's lines, the repeated steps included
        assert exact(row) == reference[row["step"]], row["step"]
    for row in metrics(run, "eval"):
        assert row == reference_eval[row["step"]], row["step"]
    digests = {r["student_sha256"] for r in summary(run)["ranks"] + summary(tmp / "reference")["ranks"]}
    assert len(digests) == 1
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())  # no dot-folders left either
    assert kept == ["step10", "step12"] and (run / "checkpoints" / "latest").read_text() == "step12"


def kill_job_after(recipe: Path, run: Path, step: int, extra: list[str]) -> subprocess.CompletedProcess:
    """SIGKILL the launcher and every rank at once (a node losing power) as soon as ``step`` is logged."""
    cmd = deepspeed_cmd(recipe, *extra)
    log = run.parent / "killed-job.log"
    with shm_released(), open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=job_env(), cwd=REPO, start_new_session=True
        )
        reached(proc, run, step, log)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, log.read_text(), "")


@pytest.mark.parametrize(
    "failpoint, bound, named",
    [
        (
            "train.micro@3:1=kill",
            10,
            r"rank 1 \(pid \d+ on \S+\) died; its last heartbeat, [\d.]+ s before, was at step \d",
        ),
        ("train.micro@3:0=kill", 10, r"rank 0 died or its host is unreachable"),
        ("train.micro@3:1=stall", 10 + 10, r"rank 1 stalled at step 3 \(micro-batch 0\) while the others went on"),
    ],
    ids=["rank1-dies", "rank0-dies", "rank1-stalls"],
)
def test_a_rank_that_dies_or_stalls_ends_the_job_naming_it(job, failpoint, bound, named):
    """Every rank exits non-zero within the bound (the collective timeout is 10 s here), and the report
    names the rank at fault."""
    tmp, recipe = job
    run = tmp / re.sub(r"\W", "-", failpoint)
    proc = faulty(recipe, failpoint, "--train.output_dir", str(run), "--train.collective_timeout", "10")
    ended = time.time()
    assert proc.returncode != 0
    assert ended - announced(proc, failpoint.rsplit("=")[1]) < bound
    assert re.search(r"biodistill: error: rank \d: .*" + named, proc.stderr), proc.stderr[-3000:]


def test_nan_batches_are_skipped_counted_and_abort_when_in_a_row(job):
    tmp, recipe = job
    run = tmp / "nan"
    common = ["--train.output_dir", str(run), "--train.max_steps", "6", "--train.export", "false"]
    # Rank 1's first micro-batch of step 3 has a NaN loss; every teacher output of step 5's first micro-batch
    # is NaN (what an overflowing fp16 teacher gives). Both ranks zero that micro-batch's gradients (decided on
    # the device) and stay replicas.
    proc = faulty(recipe, "train.loss@3#1:1=nan;teacher.outputs@5#1=nan", *common)
    assert proc.returncode == 0
    out = proc.stdout + proc.stderr
    assert re.search(r"rank 1: step 3: non-finite student loss on the batch of epoch 0 sequences \[\d+, \d+\]", out)
    assert "rank 0: step 5: non-finite teacher outputs" in out and "rank 1: step 5: non-finite teacher outputs" in out
    counts = {r["step"]: (r["skipped/nonfinite_loss"], r["skipped/teacher_nonfinite"]) for r in metrics(run)}
    assert counts == {1: (0, 0), 2: (0, 0), 3: (1, 0), 4: (1, 0), 5: (1, 1), 6: (1, 1)}
    s = summary(run)  # written only when every rank's weights hash the same
    assert s["skipped"] == {"nonfinite_loss": 1, "teacher_nonfinite": 1, "fp16_overflow_steps": 0}
    assert len({r["student_sha256"] for r in s["ranks"]}) == 1
    # Every micro-batch of steps 2 and 3 is NaN on both ranks: the third in a row (step 3's first) stops the
    # job at the next log point, naming the batches.
    common[1] = str(tmp / "nan-abort")
    proc = faulty(recipe, "train.loss@2=nan;train.loss@3=nan", *common, "--train.max_consecutive_skips", "3")
    assert proc.returncode != 0
    assert re.search(
        r"biodistill: error: rank 0: rank 0 failed at step 3 \(log\): JobError: step 3 \(micro-batch 0\): 3 micro-batches "
        r"in a row had a non-finite student loss \(train.max_consecutive_skips = 3\); the last on rank 0: the batch "
        r"of epoch 0 sequences \[\d+, \d+\], rank 1: the batch of epoch 0 sequences \[\d+, \d+\]",
        proc.stderr,
    ), proc.stderr[-3000:]


def test_a_full_disk_during_a_save_leaves_the_previous_checkpoint(job):
    """Checkpoints on a tmpfs with room for one and a half: the step-4 save fills it. The job stops with
    the reason; step2 stays the latest, whole and loadable; the partial step-4 files are gone."""
    tmp, recipe = job
    one = sum(f.stat().st_size for f in (tmp / "reference" / "checkpoints" / "step12").rglob("*") if f.is_file())
    run = tmp / "full"
    ckpts = run / "checkpoints"
    ckpts.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(one * 1.5)}", "tmpfs", str(ckpts)])
    if mounted.returncode != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    try:
        common = ["--train.output_dir", str(run), "--train.export", "false", "--resume"]
        proc = launch(recipe, *common)
        assert proc.returncode != 0
        assert re.search(
            rf"saving checkpoint {ckpts}/step4 failed: rank \d: RuntimeError: .*\([\d.]+ MiB free on the "
            rf"filesystem of {ckpts}\); the latest complete checkpoint is still {ckpts}/step2",
            proc.stderr,
        ), proc.stderr[-3000:]
        assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step2"]
        assert (ckpts / "latest").read_text() == "step2"
        # Room made (the start-up check refuses a filesystem without room for one more checkpoint): step2 loads.
        subprocess.run(["mount", "-o", f"remount,size={one * 4}", str(ckpts)], check=True)
        proc = launch(recipe, *common, "--train.max_steps", "2")
        assert proc.returncode == 0 and f"resumed from {ckpts}/step2 at step 2" in proc.stdout + proc.stderr
    finally:
        subprocess.run(["umount", str(ckpts)], check=True)
