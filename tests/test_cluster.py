"""Multi-node and multi-launcher jobs on this one machine, all real: 2 "nodes" x 2 ranks through a
hostfile with --no_ssh on loopback, DeepSpeed's openmpi launcher and plain mpirun (mpi4py), every
ZeRO stage x precision x accumulation and every teacher placement in one 2-rank job, and a checkpoint
written by 4 ranks resumed on 2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import (
    REPO,
    SAMPLE,
    csv_metric,
    fake_slurm,
    free_port,
    launch,
    make_bert,
    matrix,
    recipe_dict,
    shm_released,
    summary,
    write_recipe,
)

pytestmark = pytest.mark.multirank

TERMS = [{"kind": "mlm", "weight": 2.0}, {"kind": "logit_kl", "weight": 5.0}, {"kind": "hidden_cosine"}]
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}  # CI containers run as root


@pytest.fixture(scope="module")
def still_teacher(tmp_path_factory) -> Path:
    """No dropout: a student copied from it computes the same on any number of ranks."""
    return make_bert(tmp_path_factory.mktemp("still_teacher"), dropout=0.0)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    """40 documents: 327 sequences of 32 tokens, 40 steps of 8 per epoch."""
    path = tmp_path_factory.mktemp("corpus") / "c.jsonl"
    path.write_text("\n".join(SAMPLE.read_text(encoding="utf-8").splitlines()[:40]) + "\n", encoding="utf-8")
    return path


def run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with shm_released():
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def ledger(run_dir: Path) -> dict[int, list[tuple[int, int]]]:
    """step -> the (epoch, index) sequences all ranks trained on in it, from the per-rank sample logs."""
    steps = defaultdict(list)
    for path in (run_dir / "samples").glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            steps[row["step"]] += [tuple(x) for x in row["samples"]]
    return {step: sorted(samples) for step, samples in steps.items()}


def same_weights_everywhere(s: dict) -> bool:
    return len({r["student_sha256"] for r in s["ranks"]}) == 1 and len(s["ranks"]) == s["job"]["world_size"]


# ------------------------------------------------------------- one 2-rank job, many settings


def test_zero_stages_precisions_accumulation_and_teacher_placements(tmp_path, still_teacher, small_corpus):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        recipe_dict(still_teacher, small_corpus, tmp_path, TERMS, train={"max_steps": 3, "export": False}),
    )
    settings = {f"z{z}-{p}": ["--deepspeed.zero_stage", str(z), "--train.precision", p] for z in range(4) for p in ("fp32", "bf16")}  # fmt: skip
    settings["z1-accum"] = ["--deepspeed.zero_stage", "1", "--train.grad_accum", "2", "--train.micro_batch_size", "2"]
    for placement in ("partitioned", "offload"):
        settings[placement] = ["--teacher.placement", placement]
        settings[f"{placement}-z3-bf16-accum"] = [
            "--teacher.placement", placement, "--deepspeed.zero_stage", "3", "--train.precision", "bf16",
            "--train.grad_accum", "2", "--train.micro_batch_size", "2",
        ]  # fmt: skip
    results = matrix(recipe, tmp_path / "out.json", settings, "--count-syncs")
    loss = {name: csv_metric(tmp_path / "out.json.d" / name, "train_loss") for name in settings}

    for name, s in results.items():
        stage = int(name[1]) if name.startswith("z") else 3 if "z3" in name else 2
        assert s["job"]["zero_stage"] == stage and s["job"]["world_size"] == 2, name
        assert s["job"]["grad_accum"] == (2 if "accum" in name else 1), name
        assert s["job"]["dtype"] == ("bfloat16" if "bf16" in name else "float32"), name
        assert same_weights_everywhere(s), name
        assert sorted(loss[name]) == [1, 2, 3], name
        # Nothing in a training step waits on the device, neither the engine nor the models' forwards (their
        # masks are decided on the host): it is read only at log, eval and save points. What is left is
        # DeepSpeed's own: its optimizer step reads the gradient norm (once per optimizer step), and ZeRO-3
        # checks that every rank recorded the same parameter-fetch order while it records one (reset_step:
        # the first steps, and the first after an evaluation changed the order), never per micro-step.
        syncs = s["syncs_in_train_step"]
        assert set(syncs) <= {"deepspeed"}, (name, {k: v[:3] for k, v in syncs.items() if k != "deepspeed"})
        deepspeed_own = ("(_take_model_step)", "(reset_step)")
        assert all(any(f in call for f in deepspeed_own) for call in syncs.get("deepspeed", [])), (name, syncs)
    assert sum(len(s["syncs_in_train_step"].get("deepspeed", [])) for s in results.values()) > 0  # the counter is live
    # Partitioning the optimizer, gradients or weights does not change the arithmetic of fp32 training.
    for z in (1, 2, 3):
        assert loss[f"z{z}-fp32"] == pytest.approx(loss["z0-fp32"], rel=1e-6)
        assert results[f"z{z}-fp32"]["after"]["loss/total"] == pytest.approx(results["z0-fp32"]["after"]["loss/total"], rel=1e-6)  # fmt: skip
    for z in range(4):  # bf16 follows fp32 closely (ZeRO-0 also accumulates its gradients in bf16)
        assert loss[f"z{z}-bf16"] == pytest.approx(loss["z0-fp32"], rel=2e-3)
    # The teacher's placement changes where its weights live, not what it computes.
    for placement in ("partitioned", "offload"):
        assert loss[placement] == pytest.approx(loss["z2-fp32"], rel=1e-6)
        assert results[placement]["before"] == pytest.approx(results["z2-fp32"]["before"], rel=1e-6)
        assert loss[f"{placement}-z3-bf16-accum"] == pytest.approx(loss["z1-accum"], rel=2e-3)
        # Each rank holds half of the teacher (small norms and biases stay whole: ZeRO-3 persists them).
        whole, held = (results[k]["ranks"][0]["teacher_param_mib"] for k in ("z2-fp32", placement))
        assert 0.45 * whole < held < 0.6 * whole


# --------------------------------------------------------- 2 nodes x 2 ranks, then 4 -> 2 ranks


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, still_teacher, small_corpus):
    """launch/node.sh once per "node" of a 3-slot hostfile, one slot excluded on each: 4 ranks, 48 steps
    (an epoch is 40), checkpoints every 20, a sample log per rank."""
    tmp = tmp_path_factory.mktemp("nodes")
    (tmp / "hostfile").write_text("# two nodes\nnode-a slots=3\nnode-b slots=3\n")
    raw = recipe_dict(
        still_teacher,
        small_corpus,
        tmp,
        TERMS,
        data={"max_length": 32},
        train={"max_steps": 48, "micro_batch_size": 2, "global_batch_size": 8, "save_every": 20, "log_every": 4},
    )
    raw["train"].update(sample_log=True, export=False)
    recipe = write_recipe(tmp / "r.yaml", raw)
    env = {**os.environ, "HOSTFILE": str(tmp / "hostfile"), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    cmd = [str(REPO / "launch" / "node.sh"), "--exclude", "node-a:2@node-b:0", "--", "--config", str(recipe)]
    with shm_released():
        nodes = [
            subprocess.Popen(
                cmd,
                cwd=tmp,
                env={**env, "NODE_RANK": str(i)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
            for i in (1, 0)
        ]
        outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, out in zip(nodes, outputs):
        assert node.returncode == 0, out[-5000:]
    return tmp, recipe


def test_two_nodes_through_a_hostfile_without_ssh(two_nodes):
    tmp, _ = two_nodes
    s = summary(tmp / "run")
    assert s["job"]["world_size"] == 4 and s["job"]["grad_accum"] == 1
    assert [r["local_rank"] for r in s["ranks"]] == [0, 1, 0, 1]  # two ranks on each "node"
    assert same_weights_everywhere(s)
    steps = ledger(tmp / "run")
    assert sorted(steps) == list(range(1, 49)) and all(len(v) == 8 for v in steps.values())
    epoch0 = [x for step in range(1, 41) for x in steps[step]]
    assert {e for e, _ in epoch0} == {0} and len(set(epoch0)) == len(epoch0) == 320  # 327 // 8 steps of 8
    assert {e for step in range(41, 49) for e, _ in steps[step]} == {1}
    assert sorted(p.name for p in (tmp / "run" / "checkpoints").glob("step*")) == ["step20", "step40", "step48"]


def test_four_rank_checkpoint_resumes_on_two_ranks(two_nodes):
    """Resume step40 of the 4-rank job on 2 ranks (accumulating 2 to keep the global batch of 8): the
    optimizer states are re-sharded through DeepSpeed's universal format, steps 41-48 read exactly the
    sequences the 4 ranks read, and the losses follow the 4-rank run."""
    tmp, recipe = two_nodes
    resumed = tmp / "resumed"
    shutil.copytree(tmp / "run" / "checkpoints", resumed / "checkpoints")
    proc = launch(recipe, "--resume", "step40", "--train.output_dir", str(resumed))
    assert proc.returncode == 0
    assert "resumed from" in proc.stdout and "step40_universal at step 40 (written by 4 ranks)" in proc.stdout
    s = summary(resumed)
    assert s["job"]["world_size"] == 2 and s["job"]["grad_accum"] == 2 and same_weights_everywhere(s)
    assert ledger(resumed) == {step: v for step, v in ledger(tmp / "run").items() if step > 40}
    four, two = csv_metric(tmp / "run", "train_loss"), csv_metric(resumed, "train_loss")
    assert sorted(two) == [44, 48]
    for step in two:
        assert two[step] == pytest.approx(four[step], rel=1e-5), step
    # The conversion was written beside the original, whole, under its own tag.
    assert (resumed / "checkpoints" / "step40_universal" / "biodistill.json").is_file()
    assert not list((resumed / "checkpoints").glob(".*tmp*"))


# ------------------------------------------------------------------------------------------ MPI


def test_openmpi_launcher_and_plain_mpirun(tmp_path, still_teacher, small_corpus):
    """DeepSpeed's openmpi launcher (variables from .deepspeed_env) and plain mpirun of the training
    script (ranks from mpi4py) run the same job to the same weights."""
    raw = recipe_dict(still_teacher, small_corpus, tmp_path, TERMS, data={"max_length": 32})
    raw["train"].update(max_steps=4, micro_batch_size=2, export=False)
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    (tmp_path / ".deepspeed_env").write_text(
        f"MASTER_ADDR=127.0.0.1\nMASTER_PORT={free_port()}\nOMP_NUM_THREADS=1\n"
        + "".join(f"{k}={v}\n" for k, v in MPI_ENV.items())
    )
    loopback = "--mca btl_tcp_if_include lo"
    run(
        [str(REPO / "launch" / "multinode.sh"), "--force_multi", "--no_ssh_check", "--launcher_args", loopback,
         "--", "--config", str(recipe), "--train.output_dir", str(tmp_path / "ds")],
        tmp_path, {"LAUNCHER": "openmpi", "HOSTFILE": "hostfile", **MPI_ENV},
    )  # fmt: skip
    run(
        [
            str(REPO / "launch" / "mpirun.sh"),
            *loopback.split(),
            "--",
            "--config",
            str(recipe),
            "--train.output_dir",
            str(tmp_path / "mpi"),
        ],  # fmt: skip
        tmp_path,
        {"NP": "2", "HOSTFILE": "hostfile", **MPI_ENV},
    )
    by_launcher, by_mpirun = summary(tmp_path / "ds"), summary(tmp_path / "mpi")
    for s in (by_launcher, by_mpirun):
        assert s["job"]["world_size"] == 2 and same_weights_everywhere(s)
        assert [r["threads"] for r in s["ranks"]] == [1, 1]  # OMP_NUM_THREADS from .deepspeed_env reached every rank
    assert by_launcher["ranks"][0]["student_sha256"] == by_mpirun["ranks"][0]["student_sha256"]


# ------------------------------------------------------------------------ the wrappers' own checks


@pytest.mark.parametrize(
    "script, env, message",
    [
        ("node.sh", {"HOSTFILE": "missing", "NODE_RANK": "0"}, "HOSTFILE: cannot read 'missing'"),
        ("node.sh", {"HOSTFILE": "empty"}, "HOSTFILE: 'empty' lists no host"),
        ("node.sh", {"HOSTFILE": "hostfile"}, "NODE_RANK: set NODE_RANK to the index of this node"),
        ("multinode.sh", {"HOSTFILE": "hostfile", "LAUNCHER": "ssh"}, "LAUNCHER: 'ssh' is not one of pdsh, openmpi, mpich"),
        ("mpirun.sh", {"HOSTFILE": "hostfile"}, "NP: set NP to the total number of ranks"),
    ],
)  # fmt: skip
def test_wrappers_refuse_bad_settings(tmp_path, script, env, message):
    (tmp_path / "empty").write_text("# nothing\n\n")
    (tmp_path / "hostfile").write_text("node-a slots=2\n")
    proc = subprocess.run(
        [str(REPO / "launch" / script), "--config", "r.yaml"], cwd=tmp_path, env={**os.environ, **env},
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode != 0 and message in proc.stderr


# ----------------------------------------------------------------------------------------- Slurm


def test_slurm_template_starts_one_launcher_per_node(tmp_path, still_teacher, small_corpus):
    """launch/slurm.sbatch inside a 2-node "allocation": it writes the hostfile from the node list and
    starts launch/node.sh per node (Slurm's srun and scontrol stand-ins start processes locally)."""
    bin_dir = fake_slurm(tmp_path)
    raw = recipe_dict(still_teacher, small_corpus, tmp_path, TERMS, data={"max_length": 32})
    raw["train"].update(max_steps=3, micro_batch_size=2, export=False)
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-node-[7-8]", "SLURM_NNODES": "2",
        "SLURM_GPUS_ON_NODE": "h200:2", "SLURM_SUBMIT_DIR": str(REPO),
        "HOSTFILE": str(tmp_path / "hostfile"), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
    }  # fmt: skip
    run(["bash", str(REPO / "launch" / "slurm.sbatch"), "--config", str(recipe)], tmp_path, env)
    assert (tmp_path / "hostfile").read_text() == "gpu-node-7 slots=2\ngpu-node-8 slots=2\n"
    s = summary(tmp_path / "run")
    assert s["job"]["world_size"] == 4 and [r["local_rank"] for r in s["ranks"]] == [0, 1, 0, 1]
    assert same_weights_everywhere(s)


def test_a_failed_conversion_stops_every_rank_with_the_reason(two_nodes):
    """A damaged shard cannot be re-sharded: rank 0's conversion fails, every rank exits (none waits
    forever at a barrier), the message names the checkpoint, and no partial conversion is left."""
    tmp, recipe = two_nodes
    broken = tmp / "broken"
    shutil.copytree(tmp / "run" / "checkpoints", broken / "checkpoints")
    shard = broken / "checkpoints" / "step20" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:1000])
    # A checkpoint written before checkpoints recorded their files' digests: the damage is not seen at start (one
    # that has them is refused there, naming the file: tests/test_multirank.py), so the conversion meets it.
    meta = broken / "checkpoints" / "step20" / "biodistill.json"
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "files"}))
    proc = launch(recipe, "--resume", "step20", "--train.output_dir", str(broken), timeout=240)
    assert proc.returncode != 0
    assert (
        f"converting checkpoint {broken / 'checkpoints' / 'step20'} to DeepSpeed's universal format failed"
        in proc.stderr
    )
    assert sorted(p.name for p in (broken / "checkpoints").iterdir() if p.is_dir()) == ["step20", "step40", "step48"]
