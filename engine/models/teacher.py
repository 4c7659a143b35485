"""The frozen teacher: loaded once per rank, in eval mode (no dropout), without autograd, in half
precision on GPU, and asked only for the outputs the loss terms use.

Placement (``teacher.placement``): ``replicated`` keeps a full copy on every rank's device, right for
BERT-size teachers; ``partitioned`` hands it to ZeRO-3 as an inference-only DeepSpeed engine (no
optimiser), so each rank holds 1/world of it and layers are all-gathered as the forward reaches them;
``offload`` keeps those shards in CPU memory and fetches them to the device layer by layer. Under ZeRO-3
every teacher forward is a sequence of collectives: every rank must run the same forwards in the same
order (the trainer's step and its evaluation keep batch counts equal across ranks for this reason).
"""

from __future__ import annotations

import copy
import logging

import deepspeed
import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from ..config import Recipe, resolve_precision
from ..runtime import hub
from ..runtime.distributed import bf16_supported
from .outputs import Needs, attn_implementation, mlm_head
from .students import task_class

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def seen_by_terms(recipe: Recipe, teacher_config, student_config):
    """The teacher's config as the loss terms see it: through a vocab map its logits have the student's width."""
    if not recipe.teacher.vocab_map or teacher_config is None:
        return teacher_config
    mapped = copy.deepcopy(teacher_config)
    mapped.vocab_size = student_config.vocab_size
    return mapped


def teacher_dtype(recipe: Recipe, device: torch.device) -> torch.dtype:
    """``teacher.dtype``, with "auto" resolved for ``device`` (config.resolve_precision says how)."""
    return _DTYPES[resolve_precision(recipe, device.type, bf16_supported(device)).teacher.dtype]


def load_teacher(recipe: Recipe, needs: Needs, device: torch.device, path: str = "") -> torch.nn.Module:
    """Load ``teacher.path`` (or ``path``: a task recipe's fine-tuned teacher); with a masked-LM head only when a
    loss term needs logits, with the task's head when one needs task logits."""
    location = hub.location(path or recipe.teacher.path)
    kwargs = {"dtype": teacher_dtype(recipe, device)}
    cls = task_class(recipe.task.kind) if needs.task_logits else AutoModelForMaskedLM if needs.logits else AutoModel
    try:
        if implementation := attn_implementation(needs, AutoConfig.from_pretrained(location)):
            kwargs["attn_implementation"] = implementation
        model, info = cls.from_pretrained(location, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as e:
        raise recipe.error("teacher.path", hub.load_error(recipe.teacher.path, e)) from None
    if needs.logits:
        head_params = {n for n, _ in model.named_parameters() if not n.startswith(model.base_model_prefix + ".")}
        missing = [k for k in info.get("missing_keys", []) if k in head_params]
        if missing:
            raise recipe.error(
                "teacher.path",
                f"{recipe.teacher.path!r} has no trained masked-LM head (missing {', '.join(sorted(missing)[:3])}...), "
                "but a logit term (logit_kl, soft_ce) needs teacher logits; drop the term or use a teacher with an MLM head",
            )
        mlm_head(model)  # fails now, not mid-step, for a model type without a head adapter
    model.eval()
    model.requires_grad_(False)
    # A partitioned teacher is loaded whole into host memory and only sharded onto devices by ZeRO-3.
    return model.to(device) if recipe.teacher.placement == "replicated" else model


def place_teacher(model: torch.nn.Module, placement: str, micro_batch: int):
    """Return ``(module, engine)``: the module to call (hooked by ZeRO-3 unless replicated) and the
    DeepSpeed engine that owns it (None when replicated). Every rank must call this at the same point."""
    if placement == "replicated":
        return model, None
    dtype = next(model.parameters()).dtype
    # Release each layer's gathered weights right after its forward. DeepSpeed's default reuse distance
    # (1e9 parameters) keeps whatever is used again "soon", and the teacher's next forward reuses
    # everything: the gathered copies would stay and the partitioned teacher would cost as much memory as
    # a replicated one (measured: it did).
    zero = {"stage": 3, "stage3_max_reuse_distance": 0}
    if placement == "offload":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,  # required by the config schema; no training happens
        "zero_optimization": zero,
        "fp16": {"enabled": dtype == torch.float16},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, config=config)  # no optimizer: ZeRO-3 inference
    engine.eval()
    return engine.module, engine


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of teacher parameters this rank holds now: the full tensors, or its ZeRO-3 shards plus
    whatever is still gathered (a released ZeRO-3 parameter's ``data`` is empty)."""
    return sum(
        (p.data.numel() + (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0)) * p.element_size()
        for p in model.parameters()
    )
