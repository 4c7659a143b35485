"""The frozen teacher: loaded once per rank, in eval mode (no dropout), without autograd, in half
precision on GPU, and asked only for the outputs the loss terms use."""

from __future__ import annotations

import logging

import torch
from transformers import AutoModel, AutoModelForMaskedLM

from biodistill.engine.config import ConfigError, Recipe, resolve_path
from biodistill.engine.models import Needs, attn_implementation, mlm_head

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def teacher_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "auto":
        # fp16 halves the teacher's memory and time on GPU; CPUs have no fast fp16 matmul.
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[choice]


def model_location(path: str) -> str:
    """A local directory (pkg:// resolved) or the hub name as given."""
    local = resolve_path(path)
    return str(local) if local.exists() or path.startswith("pkg://") else path


def load_teacher(recipe: Recipe, needs: Needs, device: torch.device) -> torch.nn.Module:
    """Load ``teacher.path``; with a masked-LM head only when a loss term needs logits."""
    location = model_location(recipe.teacher.path)
    dtype = teacher_dtype(recipe.teacher.dtype, device)
    kwargs = {"dtype": dtype}
    if attn_implementation(needs):
        kwargs["attn_implementation"] = attn_implementation(needs)
    cls = AutoModelForMaskedLM if needs.logits else AutoModel
    try:
        model, info = cls.from_pretrained(location, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(
            recipe.source, "teacher.path", f"cannot load a model from {recipe.teacher.path!r}: {e}"
        ) from None
    if needs.logits:
        head_params = {n for n, _ in model.named_parameters() if not n.startswith(model.base_model_prefix + ".")}
        missing = [k for k in info.get("missing_keys", []) if k in head_params]
        if missing:
            raise ConfigError(
                recipe.source,
                "teacher.path",
                f"{recipe.teacher.path!r} has no trained masked-LM head (missing {', '.join(sorted(missing)[:3])}...), "
                "but a logit term (logit_kl, soft_ce) needs teacher logits; drop the term or use a teacher with an MLM head",
            )
        mlm_head(model)  # fails now, not mid-step, for a model type without a head adapter
    model.eval()
    model.requires_grad_(False)
    return model.to(device)
