"""Process-group setup and the DeepSpeed config: built from the recipe's few knobs, or the user's JSON."""

from __future__ import annotations

import difflib
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from ..config import ConfigError, Recipe, json_precision, load_deepspeed_json, resolve_path


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout: float = 1800.0) -> Dist:
    """Join the job's process group: the deepspeed launcher, mpirun (ranks found through mpi4py), or a
    plain ``python`` run, which becomes a world of one. A collective that waits more than ``timeout``
    seconds for a peer raises instead of hanging."""
    under_mpi = "RANK" not in os.environ and any(k in os.environ for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK"))
    if under_mpi and "MASTER_ADDR" in os.environ:
        _mpi_environment()  # DeepSpeed's own discovery would replace the address the user exported
    launched = under_mpi or "RANK" in os.environ
    if not launched:
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
            MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())),
        )
    accelerator = get_accelerator()
    # NCCL on GPUs; on CPU DeepSpeed's accelerator names ccl when oneCCL is installed, gloo otherwise.
    backend = accelerator.communication_backend_name()
    if backend == "ccl":
        try:
            import oneccl_bindings_for_pytorch  # noqa: F401
        except ImportError:
            backend = "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=True, timeout=timedelta(seconds=timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", world)))
    if accelerator.device_name() == "cuda":
        accelerator.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # Ranks of one node share its cores; oversubscribed intra-op threads make every rank slower.
        # An explicit OMP_NUM_THREADS (the launcher's core binding, .deepspeed_env) is the user's choice.
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world, 1)))
    return Dist(rank, world, local_rank, local_world, device)


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` trains in bf16 at full speed (Ampere and later GPUs); never on CPU here."""
    return device.type != "cpu" and get_accelerator().is_bf16_supported()


def _mpi_environment() -> None:
    """Ranks from mpi4py, keeping the user's MASTER_ADDR (and MASTER_PORT, else one rank 0 picks)."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks sharing this host's memory
    port = os.environ.get("MASTER_PORT") or world.bcast(str(_free_port()) if world.Get_rank() == 0 else None)
    os.environ.update(
        RANK=str(world.Get_rank()),
        WORLD_SIZE=str(world.Get_size()),
        LOCAL_RANK=str(node.Get_rank()),
        LOCAL_WORLD_SIZE=str(node.Get_size()),
        MASTER_PORT=port,
    )
    node.Free()


def release_shared_memory() -> None:
    """Unlink the shared-memory all-reduce buffers DeepSpeed's CPU backend creates (one per local rank,
    ~66 MB each, named after the user, master address and port) and never unlinks: without this every
    CPU job leaves them in /dev/shm until the machine runs out of memory. Call once every rank is done
    with collectives; the name goes, the mappings of processes still exiting stay valid."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port and os.environ.get("LOCAL_RANK", "0") == "0":
        for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_*"):
            path.unlink(missing_ok=True)


# Filled only from the student's width, as transformers' DeepSpeed integration does.
_WIDTH_KEYS = (
    "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
)


def deepspeed_config(recipe: Recipe, world: int, hidden_size: Optional[int] = None) -> dict:
    """The DeepSpeed config for this job.

    With ``deepspeed.config`` set, the user's JSON is used as DeepSpeed would use it; only the values
    written ``"auto"`` (as in the ds_config_zero2/zero3 files transformers documents) are filled, by
    transformers' rules (``integrations/deepspeed.py``): batch sizes, clipping, optimizer and scheduler
    values from the recipe, fp16/bf16 from ``train.precision``, and the ZeRO bucket sizes from the
    student's ``hidden_size`` H (reduce_bucket_size H*H, stage3_prefetch_bucket_size 0.9*H*H,
    stage3_param_persistence_threshold 10*H). Any other "auto" is refused by key.
    """
    t, ds, o = recipe.train, recipe.deepspeed, recipe.optim
    accum = grad_accum(recipe, world)
    auto = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.micro_batch_size * accum * world,
        "gradient_clipping": t.grad_clip,
        "optimizer.params.lr": o.lr,
        "optimizer.params.betas": list(o.betas),
        "optimizer.params.eps": o.eps,
        "optimizer.params.weight_decay": o.weight_decay,
        "scheduler.params.warmup_min_lr": 0,
        "scheduler.params.warmup_max_lr": o.lr,
        # DeepSpeed >= 0.19.6 refuses warmup_num_steps 0, as transformers notes: at least one step.
        "scheduler.params.warmup_num_steps": max(1, o.warmup_steps),
        "scheduler.params.total_num_steps": t.max_steps,
        "fp16.enabled": t.precision == "fp16",
        "bf16.enabled": t.precision == "bf16",
    }
    if hidden_size is not None:
        auto[_WIDTH_KEYS[0]] = hidden_size * hidden_size
        auto[_WIDTH_KEYS[1]] = int(0.9 * hidden_size * hidden_size)
        auto[_WIDTH_KEYS[2]] = 10 * hidden_size
    if ds.config:
        cfg = load_deepspeed_json(ds.config)
        _fill_auto(cfg, auto, ds.config, "")
        return cfg
    monitor_dir = os.path.join(t.output_dir, "monitor")
    cfg = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,  # our progress bar and monitor report; DeepSpeed's own prints are noise
        "tensorboard": {"enabled": ds.tensorboard, "output_path": monitor_dir, "job_name": "tensorboard"},
        "csv_monitor": {"enabled": ds.csv, "output_path": monitor_dir, "job_name": "csv"},
    }
    return cfg


# A user's JSON key, the recipe key whose value it replaces, and that value in the recipe.
_JSON_SETS = (
    ("train_micro_batch_size_per_gpu", "train.micro_batch_size", lambda r, world: r.train.micro_batch_size),
    ("gradient_accumulation_steps", "train.grad_accum", lambda r, world: grad_accum(r, world)),
    ("train_batch_size", "train.global_batch_size", lambda r, world: r.train.global_batch_size),
    ("zero_optimization.stage", "deepspeed.zero_stage", lambda r, world: r.deepspeed.zero_stage),
    ("gradient_clipping", "train.grad_clip", lambda r, world: r.train.grad_clip),
    ("optimizer.params.lr", "optim.lr", lambda r, world: r.optim.lr),
)
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def launch_world() -> int:
    """The job's world size before any process group: what the launcher (deepspeed, torchrun, mpirun,
    srun) put in the environment, or 1 for a plain process."""
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def check_deepspeed_json(recipe: Recipe, world: int, hidden: int) -> list[str]:
    """A user's ``--deepspeed_config`` against DeepSpeed's batch arithmetic and against the recipe, before the
    process group: DeepSpeed would otherwise fail its batch assertion on rank 0 after every rank had started.
    A command-line flag that the JSON contradicts is an error naming both (DeepSpeed trains with the JSON's
    value, so the flag would be silently ignored); a recipe-file value it replaces comes back as a note."""
    if not recipe.deepspeed.config:
        return []
    path = str(resolve_path(recipe.deepspeed.config))
    filled = deepspeed_config(recipe, world, hidden)  # the JSON with every "auto" resolved from the recipe
    deepspeed_reads(filled, path, world)
    batch = dict(zip(_BATCH_KEYS, _deepspeed_batch(path, *(filled.get(k) for k in _BATCH_KEYS), world)))
    notes = []
    for json_key, recipe_key, ours in _JSON_SETS:
        theirs = batch[json_key] if json_key in batch else _dotted_get(filled, json_key)
        if theirs is None or theirs == ours(recipe, world) or (recipe_key == "train.global_batch_size" and not recipe.train.global_batch_size):  # fmt: skip
            continue  # absent, agreeing, or a global batch that follows from the other two
        flag = next((k for k in (recipe_key, "train.global_batch_size") if k in recipe.flags), None)
        if flag and (flag == recipe_key or json_key == "gradient_accumulation_steps"):
            raise ConfigError(
                recipe.flags[flag], flag,
                f"{_dotted_attr(recipe, flag)!r}, but {path} makes DeepSpeed train with {json_key} {theirs!r}: drop "
                f"the flag, or change {json_key} in the JSON (\"auto\" takes the recipe's value)",
            )  # fmt: skip
        notes.append(f"{path} sets {json_key} {theirs!r}, over the recipe's {recipe_key} {ours(recipe, world)!r}")
    trained, written = json_precision(recipe), recipe.train.precision
    if trained is not None and written not in ("auto", trained):
        if "train.precision" in recipe.flags:
            raise ConfigError(
                recipe.flags["train.precision"], "train.precision",
                f"{written!r}, but {path} makes DeepSpeed train in {trained}: drop the flag, or change fp16/bf16 "
                "\"enabled\" in the JSON (\"auto\" takes the recipe's value)",
            )  # fmt: skip
        notes.append(f"{path} trains in {trained}, over the recipe's train.precision {written!r}: the teacher, the "
                     "memory plan, the summary and the export follow the JSON")  # fmt: skip
    return notes


def check_precision(recipe: Recipe) -> None:
    """The job's precision is one this device trains in: DeepSpeed refuses fp16 without a GPU, after every model
    was built. Refused here instead, naming the flag, the recipe key or the JSON that asked for it."""
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return
    trained = json_precision(recipe)
    if (trained or recipe.train.precision) != "fp16":
        return
    where, key = (str(resolve_path(recipe.deepspeed.config)), "fp16.enabled") if trained else (
        recipe.where("train.precision"), "train.precision")  # fmt: skip
    raise ConfigError(where, key, "fp16 does not train on a CPU (DeepSpeed's loss-scaled fp16 is for GPUs): use "
                      "bf16 or fp32 here, or \"auto\" (fp32 on a CPU, bf16 or fp16 on a GPU)")  # fmt: skip


def deepspeed_reads(config: dict, path: str, world: int) -> None:
    """Refuse a key of a user's DeepSpeed JSON that DeepSpeed does not read (``zero_optimisation``,
    ``gradient_cliping``: DeepSpeed ignores them in silence and trains ZeRO-0 without clipping), with the closest
    key it does read; and a value its own config models reject, before any model is built.

    The keys DeepSpeed reads are not written down here: its own config parser (``DeepSpeedConfig``) is run over
    the JSON with every key lookup recorded, so the list is the installed DeepSpeed's. Its sections are pydantic
    models that refuse unknown fields themselves; their errors are raised here, naming the key."""
    import copy

    import pydantic
    from deepspeed.runtime import config as ds

    # deepspeed.initialize reads these two before it builds its config (its __init__.py), so no lookup records them
    read: set[str] = {"sequence_parallel_size", "data_parallel_size"}

    class Keys(list):
        def __contains__(self, key):
            read.add(key)
            return list.__contains__(self, key)

    class Recording(dict):
        def get(self, key, *default):
            read.add(key)
            return dict.get(self, key, *default)

        def __getitem__(self, key):
            read.add(key)
            return dict.__getitem__(self, key)

        def __contains__(self, key):
            read.add(key)
            return dict.__contains__(self, key)

        def keys(self):
            return Keys(dict.keys(self))

    try:
        ds._reject_removed_config_keys(config)
    except ds.DeepSpeedConfigError as e:
        raise ConfigError(path, "", str(e)) from None
    probe = ds.DeepSpeedConfig.__new__(ds.DeepSpeedConfig)
    probe.world_size, probe.global_rank, probe._param_dict = world, 0, Recording(config)
    try:
        probe._initialize_params(copy.copy(probe._param_dict))
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        section = next(
            (k for k in config if isinstance(config[k], dict) and first["loc"] and first["loc"][0] in config[k]), ""
        )
        key = ".".join(str(p) for p in (section, *first["loc"]) if p != "")
        said = "DeepSpeed does not read this key" if first["type"] == "extra_forbidden" else first["msg"]
        raise ConfigError(path, key, f"{said} ({e.title})") from None
    except Exception:  # a value DeepSpeed judges later, as it would anyway; the parse stopped, so the keys it would
        return  # have read after this one are not known: no key is called unread on half a parse
    for key in config:
        if key not in read:
            close = difflib.get_close_matches(key, sorted(read), n=1, cutoff=0.75)
            hint = f"did you mean '{close[0]}'?" if close else "see DeepSpeed's configuration documentation"
            raise ConfigError(path, key, f"DeepSpeed does not read this key, and would ignore it ({hint})")


def _deepspeed_batch(path: str, tb, mb, ga, world: int) -> tuple[int, int, int]:
    """(train_batch_size, micro-batch, accumulation) as DeepSpeed derives them (runtime/config.py): any two
    give the third, one alone means accumulation 1; the three must agree with the world size."""
    for key, value in zip(_BATCH_KEYS, (tb, mb, ga)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(path, key, f"must be a positive integer, got {value!r}")
    if tb is None and mb is None:
        raise ConfigError(path, "train_batch_size", "give train_batch_size or train_micro_batch_size_per_gpu")
    if tb is None:
        ga = ga or 1
        return mb * ga * world, mb, ga
    if mb is not None and ga is not None:
        if tb != mb * ga * world:
            raise ConfigError(path, "train_batch_size", f"{tb} is not train_micro_batch_size_per_gpu x gradient_accumulation_steps x world size = {mb} x {ga} x {world} = {mb * ga * world}")  # fmt: skip
        return tb, mb, ga
    given, size = (
        ("train_micro_batch_size_per_gpu", mb) if mb else ("gradient_accumulation_steps", ga) if ga else ("1", 1)
    )
    if tb % (size * world):
        raise ConfigError(
            path, "train_batch_size", f"{tb} is not a multiple of {given} x world size = {size} x {world}"
        )
    other = tb // (size * world)
    return (tb, mb, other) if mb else (tb, other, ga) if ga else (tb, other, 1)


def _dotted_attr(recipe: Recipe, key: str):
    section, _, name = key.partition(".")
    return getattr(getattr(recipe, section), name)


def _dotted_get(node: dict, key: str):
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def grad_accum(recipe: Recipe, world: int) -> int:
    """Micro-steps per optimiser step: ``train.grad_accum``, or what ``train.global_batch_size`` implies for
    this world size (the published recipes fix the global batch, 192, not the per-GPU one)."""
    t = recipe.train
    if not t.global_batch_size:
        return t.grad_accum
    per_micro_step = t.micro_batch_size * world
    if t.global_batch_size % per_micro_step:
        raise recipe.error(
            "train.global_batch_size",
            f"{t.global_batch_size} is not a multiple of train.micro_batch_size x world size "
            f"= {t.micro_batch_size} x {world}; change one of them",
        )
    return t.global_batch_size // per_micro_step


def _fill_auto(node: dict, auto: dict, path: str, prefix: str) -> None:
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            _fill_auto(value, auto, path, dotted + ".")
        elif value == "auto":
            if dotted in _WIDTH_KEYS and dotted not in auto:
                raise ConfigError(
                    path, dotted, "'auto' is filled from the student's hidden_size, which is not known here"
                )
            if dotted not in auto:
                known = [k for k in auto if k not in _WIDTH_KEYS] + list(_WIDTH_KEYS)
                raise ConfigError(path, dotted, f"'auto' is only understood for {', '.join(known)}")
            node[key] = auto[dotted]
