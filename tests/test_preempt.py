"""Preemption on real 2-rank DeepSpeed jobs (CPU, gloo): SIGTERM to the whole job, SIGUSR1 to one rank, a
second signal or a stalled save within the grace, a signal at start-up and during an evaluation, and the
Slurm template's requeue; every interrupted job resumes to the uninterrupted run's losses and weights.

Signals come from the test (a whole process group, as a scheduler ends a job) or from the engine's
failpoints (``=sigterm``, ``=sigusr1``: at an exact step, see engine/runtime/faults.py).
"""

from __future__ import annotations

import contextlib
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
    fake_slurm,
    free_port,
    job_env,
    metrics,
    reached,
    shm_released,
    summary,
)

from biodistill.engine.runtime.preempt import DEFAULT_GRACE, PREEMPTED

pytestmark = pytest.mark.multirank


@contextlib.contextmanager
def started(cmd: list[str], log: Path, **env: str):
    """``cmd`` running in a session (process group) of its own, its output in ``log``; SIGKILLed on the
    way out if it is still there."""
    with shm_released(), open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=job_env(**env), cwd=REPO, start_new_session=True
        )
        try:
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def alive(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(stat.parent.name))
    return pids


def gone(proc: subprocess.Popen, within: float) -> float:
    """Seconds until every process of ``proc``'s group has exited; fails past ``within``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        proc.poll()  # reap the leader
        if not alive(proc.pid):
            proc.wait()
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"pids {alive(proc.pid)} still alive {within:g} s after the signal")


def run_to_end(cmd: list[str], log: Path, timeout: float = 600, **env: str) -> int:
    with started(cmd, log, **env) as proc:
        return proc.wait(timeout)


def same_as_reference(tmp: Path, run: Path) -> None:
    """Every train row any of the run's launches logged, and the final weights, equal the uninterrupted run's."""
    reference = {r["step"]: exact(r) for r in metrics(tmp / "reference")}
    logged = metrics(run)
    assert {r["step"] for r in logged} == set(reference)
    for row in logged:
        assert exact(row) == reference[row["step"]], row["step"]
    digests = {r["student_sha256"] for r in summary(run)["ranks"] + summary(tmp / "reference")["ranks"]}
    assert len(digests) == 1


def test_sigterm_to_the_whole_job_saves_the_step_reached_and_resumes_exactly(dropout_job):
    """`kill -TERM -PGID` of a plain `deepspeed` job (runner, launcher, ranks) at step >= 4: every process is
    gone within the grace, one checkpoint holds the step reached, the report says what happened, and a
    resume equals the uninterrupted run bit for bit."""
    tmp, recipe = dropout_job
    run, log = tmp / "sigterm", tmp / "sigterm.log"
    with started(deepspeed_cmd(recipe, "--train.output_dir", str(run), "--train.save_every", "0"), log) as proc:
        reached(proc, run, 4, log)
        os.killpg(proc.pid, signal.SIGTERM)
        seconds = gone(proc, within=DEFAULT_GRACE)
    print(f"every process of the job gone {seconds:.1f} s after SIGTERM")  # the README's measured exit time
    text = log.read_text()
    m = re.search(
        r"biodistill: preempted: the job was ended by SIGTERM \(the scheduler or a user; first seen on rank \d, "
        rf"from pid \d+\) at step (\d+); wrote checkpoint {run}/checkpoints/step(\d+) in [\d.]+ s; the same "
        rf"command with --resume continues from it \(exit code {PREEMPTED}: resume me\)",
        text,
    )
    assert m and m[1] == m[2], text[-3000:]
    step = int(m[1])
    assert 4 <= step < 12 and "died" not in text and "error" not in text, text[-3000:]
    assert (run / "checkpoints" / "latest").read_text() == f"step{step}"
    assert max(r["step"] for r in metrics(run)) == step  # at most the step reached was lost: none
    assert_checkpoints_consistent(run / "checkpoints")
    assert run_to_end(deepspeed_cmd(recipe, "--resume", "--train.output_dir", str(run)), tmp / "resumed.log") == 0
    assert f"resumed from {run}/checkpoints/step{step} at step {step}" in (tmp / "resumed.log").read_text()
    same_as_reference(tmp, run)


def test_sigusr1_during_an_evaluation_then_a_loop_that_runs_it_again(dropout_job):
    """SIGUSR1 to rank 1 alone (Slurm's warning, forwarded) during the step-3 evaluation: the ranks stop at
    the same held-out batch, save step 3 and exit 75. Then `launch/until_done.sh` runs the resume; SIGUSR1
    at step 5 ends that run with 75 too, and the loop starts it again, to the end."""
    tmp, recipe = dropout_job
    run = tmp / "sigusr1"
    common = ["--resume", "--train.output_dir", str(run), "--train.save_every", "5"]
    log = tmp / "sigusr1-eval.log"
    assert run_to_end(deepspeed_cmd(recipe, *common), log, BIODISTILL_FAILPOINTS="eval.batch@3#1:1=sigusr1") == 75
    text = log.read_text()
    assert re.search(rf"ended by SIGUSR1 .*at step 3; wrote checkpoint {run}/checkpoints/step3 ", text), text[-3000:]
    assert (run / "checkpoints" / "latest").read_text() == "step3"
    assert not [r for r in metrics(run, "eval") if r["step"] == 3]  # cut short: not reported as if whole
    log = tmp / "sigusr1-loop.log"
    cmd = [str(REPO / "launch" / "until_done.sh"), *deepspeed_cmd(recipe, *common)]
    assert run_to_end(cmd, log, BIODISTILL_FAILPOINTS="train.micro@5#1:1=sigusr1") == 0
    text = log.read_text()
    assert f"resumed from {run}/checkpoints/step3 at step 3" in text
    assert "run 1 was preempted (exit 75): starting again with the same command" in text, text[-3000:]
    assert f"resumed from {run}/checkpoints/step5 at step 5" in text
    same_as_reference(tmp, run)


@pytest.mark.parametrize(
    "failpoints, grace, why",
    [
        ("train.micro@4#1:0=sigterm;save.file@4#1:0=sigterm", DEFAULT_GRACE, r"on a second signal \(SIGTERM\)"),
        (
            "train.micro@4#1:0=sigterm;save.file@4#1:0=stall",
            5,
            r"the step boundary and the save did not finish within train.preempt_grace = 5 s \(at step 4\)",
        ),
    ],
    ids=["second-signal", "save-past-the-grace"],
)
def test_a_save_cut_short_leaves_the_previous_checkpoint(dropout_job, failpoints, grace, why):
    """SIGTERM to the job at step 4 (checkpoints every 3 steps), then during the step-4 save a second
    SIGTERM, or a save that stalls past the grace: every rank exits 75 within the grace, step3 and `latest`
    stay as they were, and the message says which checkpoint a resume will use."""
    tmp, recipe = dropout_job
    run, log = tmp / f"cut-{grace:g}", tmp / f"cut-{grace:g}.log"
    cmd = deepspeed_cmd(recipe, "--train.output_dir", str(run), "--train.save_every", "3")
    with started([*cmd, "--train.preempt_grace", str(grace)], log, BIODISTILL_FAILPOINTS=failpoints) as proc:
        reached(proc, run, 3, log)
        gone(proc, within=120)
    text = log.read_text()
    resume = f"a resume will use {run}/checkpoints/step3"
    assert re.search(rf"rank \d: preempted {why}; exiting without a new checkpoint: {resume}", text), text[-3000:]
    assert "died" not in text and "wrote checkpoint" not in text
    assert (run / "checkpoints" / "latest").read_text() == "step3"
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step")) == ["step3"]
    assert_checkpoints_consistent(run / "checkpoints")


def test_a_signal_during_start_up_exits_at_once_saying_so(dropout_job):
    tmp, recipe = dropout_job
    run, log = tmp / "start-up", tmp / "start-up.log"
    with started(deepspeed_cmd(recipe, "--train.output_dir", str(run)), log, BIODISTILL_FAILPOINTS="train.start:0=sigterm") as proc:  # fmt: skip
        gone(proc, within=60)
    ended, text = time.time(), log.read_text()
    signalled = re.search(r"failpoint train.start \(step 0\) on rank 0: sigterm at ([\d.]+)", text)
    assert signalled and ended - float(signalled[1]) < 5, text[-3000:]
    assert re.search(
        r"rank \d: preempted during start-up \(before the first training step\): nothing to save; exiting without "
        r"a new checkpoint: no checkpoint exists yet: a resume starts from step 0 \(exit code 75\)",
        text,
    ), text[-3000:]
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())


# ----------------------------------------------------------------------------------------- Slurm


def test_slurm_template_requeues_a_warned_job_which_resumes(dropout_job, tmp_path):
    """launch/slurm.sbatch in a 2-node allocation (one rank per node). Slurm's warning (USR1 to the batch
    script) after step 3: the script passes it to the ranks, they save and exit 75, and the script requeues
    the job and exits 0. The requeued job (the same command) resumes and finishes, equal to the run never
    interrupted."""
    tmp, recipe = dropout_job
    bin_dir = fake_slurm(tmp_path)
    run = tmp_path / "run"
    cmd = ["bash", str(REPO / "launch" / "slurm.sbatch"), "--config", str(recipe), "--train.output_dir", str(run)]
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4243", "SLURM_JOB_NODELIST": "gpu-node-[7-8]", "SLURM_NNODES": "2",
        "SLURM_GPUS_ON_NODE": "1", "SLURM_SUBMIT_DIR": str(REPO),
        "HOSTFILE": str(tmp_path / "hostfile"), "MASTER_PORT": str(free_port()),
    }  # fmt: skip
    log = tmp_path / "slurm-4243.out"
    with started(cmd, log, **env) as proc:
        reached(proc, run, 3, log)
        proc.send_signal(signal.SIGUSR1)  # Slurm: --signal=B:USR1@300, to the batch script
        assert proc.wait(120) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert (tmp_path / "requeued").read_text() == "4243\n", text[-3000:]
    assert "biodistill: job 4243 preempted (exit 75, USR1): requeued; it resumes from latest" in text
    step = int((run / "checkpoints" / "latest").read_text().removeprefix("step"))
    assert re.search(rf"ended by SIGUSR1 .*at step {step}; (wrote )?checkpoint {run}/checkpoints/step{step} ", text)
    env["SLURM_RESTART_COUNT"] = "1"  # what Slurm sets in the requeued job
    assert run_to_end(cmd, log.with_suffix(".requeued"), **env) == 0
    assert (tmp_path / "requeued").read_text() == "4243\n"  # finished: not requeued again
    assert f"resumed from {run}/checkpoints/step{step} at step {step}" in log.with_suffix(".requeued").read_text()
    same_as_reference(tmp, run)
