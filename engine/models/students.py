"""Student builders, one per ``student.init``: a random init from a config, a copy of the teacher's
embeddings and chosen layers, or an existing checkpoint (continual MLM pretraining).

Everything here runs before ``deepspeed.initialize``, so weights are copied from whole tensors, before
ZeRO partitions them. :func:`student_config` gives the student's config without building it, so the
recipe's layer maps can be checked before any weights are loaded.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Optional

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PretrainedConfig,
)

from ..config import Recipe
from ..runtime import hub
from . import minialbert
from .outputs import Needs, attn_implementation, has_mlm_head, num_layers, position_limit
from .published import published_config

# "encoder.layer.7.attention..." (BERT, RoBERTa), "transformer.layer.7..." (DistilBERT)
_LAYER_KEY = re.compile(r"^(.*?\blayers?)\.(\d+)\.(.*)$")


def load_config(path: str, recipe: Recipe, key: str) -> PretrainedConfig:
    """The config of ``path``: the checkpoint's own, or, when it cannot be fetched (offline), the
    published shape from :mod:`~biodistill.engine.models.published`. Planning needs no weights."""
    try:
        return minialbert.resolve_config(AutoConfig.from_pretrained(hub.location(path)))
    except (OSError, ValueError) as e:
        published = published_config(path)
        if published is None:
            raise recipe.error(key, hub.load_error(path, e, "model config")) from None
        return published


def teacher_config(recipe: Recipe) -> Optional[PretrainedConfig]:
    """The teacher's config (no weights), or None for a recipe without a teacher."""
    return load_config(recipe.teacher.path, recipe, "teacher.path") if recipe.teacher.path else None


def student_config(
    recipe: Recipe, teacher_config: Optional[PretrainedConfig], load: Callable[..., PretrainedConfig] = load_config
) -> PretrainedConfig:
    """The student's config from the recipe and the teacher's config, without building the student."""
    s = recipe.student
    if s.init == "checkpoint" or (s.init == "config" and s.path):
        base = load(s.path, recipe, "student.path")
    elif teacher_config is not None:
        base = copy.deepcopy(teacher_config)
    else:
        raise recipe.error("student.path", "a random init needs a config: student.path or a teacher")
    if s.init == "teacher_layers":
        depth = num_layers(base)
        bad = [i for i in s.teacher_layers if i >= depth]
        if bad:
            raise recipe.error(
                "student.teacher_layers",
                f"teacher {recipe.teacher.path!r} has {depth} layers (0..{depth - 1}); cannot copy {bad}",
            )
        if base.model_type in _FIRST_LAYER_DIFFERS and (s.teacher_layers[0] != 0 or 0 in s.teacher_layers[1:]):
            raise recipe.error(
                "student.teacher_layers",
                f"{s.teacher_layers}: {_FIRST_LAYER_DIFFERS[base.model_type]}, so a student's first layer must be "
                "the teacher's layer 0 and no later one can be; start the list with 0",
            )  # fmt: skip
        select_layers(base, s.teacher_layers)
    for key, value in s.overrides.items():
        if not hasattr(base, key):
            raise recipe.error(f"student.overrides.{key}", f"{type(base).__name__} has no field '{key}'")
        setattr(base, key, value)
    if "num_hidden_layers" in s.overrides and "layer_types" not in s.overrides:
        select_layers(base, range(base.num_hidden_layers))  # the base's pattern of layer kinds, continued
    return base


# model_type -> why its layer 0 is built unlike the others (copying layers must keep it first).
_FIRST_LAYER_DIFFERS = {
    "modernbert": "ModernBERT's layer 0 has no attention LayerNorm (the embedding norm precedes it) and every "
    "other layer has one",
}


def select_layers(config: PretrainedConfig, layers) -> None:
    """Make ``config`` the config of ``layers`` (0-based indices into its layers, in the student's order),
    in place. Families that give each layer a kind (ModernBERT's ``layer_types``: global attention or a
    local window, each with its own RoPE base) keep each copied layer's kind; indices past the end continue
    the pattern, as the family's own config would lay it out."""
    layers = list(layers)
    kinds = getattr(config, "layer_types", None)
    if kinds:
        # the pattern's period: 3 for ModernBERT's "global every third layer"
        period = next(p for p in range(1, len(kinds) + 1) if all(k == kinds[i % p] for i, k in enumerate(kinds)))
        config.layer_types = [kinds[i % period] for i in layers]
    config.num_hidden_layers = len(layers)


def check_positions(recipe: Recipe, teacher: Optional[PretrainedConfig], student: PretrainedConfig) -> None:
    """``data.max_length`` fits both models' position embeddings: else the first long batch fails mid-job."""
    where = recipe.student.path or "its config from the teacher's and student.overrides"
    for role, name, config in (("the teacher", recipe.teacher.path, teacher), ("the student", where, student)):
        limit = position_limit(config) if config is not None else None
        if limit is not None and recipe.data.max_length > limit:
            raise recipe.error(
                "data.max_length",
                f"{recipe.data.max_length} tokens is longer than {role} has positions for: {limit} "
                f"({config.model_type}, {name}); set data.max_length {limit} or less",
            )  # fmt: skip


def task_class(kind: str):
    """The Auto class of a task's head: per token (ner) or per example (classification, relation)."""
    return AutoModelForTokenClassification if kind == "ner" else AutoModelForSequenceClassification


def student_class(recipe: Recipe):
    """The student's Auto class: the task's head in a task recipe, else the MLM head if the recipe keeps one."""
    if recipe.is_task:
        return task_class(recipe.task.kind)
    return AutoModelForMaskedLM if recipe.student.mlm_head else AutoModel


def with_labels(config: PretrainedConfig, labels: list[str]) -> PretrainedConfig:
    """``config`` set up for a task head over ``labels`` (in place; returned for chaining)."""
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    return config


def new_student(recipe: Recipe, config: PretrainedConfig, needs: Needs) -> torch.nn.Module:
    """A randomly initialised student of ``config``, with its task head, or an MLM head if the recipe keeps one."""
    cls = student_class(recipe)
    implementation = attn_implementation(needs, config)
    kwargs = {"attn_implementation": implementation} if implementation else {}
    return cls.from_config(config, dtype=torch.float32, **kwargs)


def parameter_count(recipe: Recipe, config: PretrainedConfig) -> int:
    """The student's parameters, counted on the meta device: shapes only, no memory. A config its family cannot
    build (a width that is not a multiple of the heads, say) is refused here, at start, naming the recipe key that
    made it, instead of as transformers' traceback after the teacher has loaded."""
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in new_student(recipe, config, Needs()).parameters())
    except (ValueError, TypeError, AssertionError, RuntimeError, IndexError) as e:
        s = recipe.student
        key = (
            f"student.overrides.{next(iter(s.overrides))}" if len(s.overrides) == 1 else "student.overrides"
        ) if s.overrides else "student.path" if s.path else "teacher.path"  # fmt: skip
        said = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise recipe.error(key, f"the student's config cannot be built ({config.model_type}): {said}") from None


def from_config(recipe: Recipe, config: PretrainedConfig, needs: Needs, teacher) -> torch.nn.Module:
    return new_student(recipe, config, needs)


def from_teacher_layers(recipe: Recipe, config: PretrainedConfig, needs: Needs, teacher) -> torch.nn.Module:
    """Embeddings plus ``student.teacher_layers`` (0-indexed) of the teacher, in that order; the MLM head
    too when both models have one."""
    layers = recipe.student.teacher_layers
    student = new_student(recipe, config, needs)
    source = {}
    for key, value in teacher.base_model.state_dict().items():
        match = _LAYER_KEY.match(key)
        if match is None:
            source[key] = value
        elif int(match.group(2)) in layers:
            source[f"{match.group(1)}.{layers.index(int(match.group(2)))}.{match.group(3)}"] = value
    target = student.base_model.state_dict()
    missing = [k for k in target if k not in source and not k.endswith("position_ids")]
    if missing:
        raise recipe.error(
            "student.init",
            f"the teacher has no weights for student parameters {missing[:3]}: "
            "'teacher_layers' needs a student of the teacher's architecture",
        )
    if recipe.student.mlm_head and has_mlm_head(teacher) and not recipe.is_task:
        # A trained head is a far better start than a random one. (A task student's head starts fresh.)
        prefix = student.base_model_prefix + "."
        teacher_sd = teacher.state_dict()
        target = {
            **{prefix + k: v for k, v in target.items()},
            **{k: v for k, v in student.state_dict().items() if not k.startswith(prefix) and k in teacher_sd},
        }
        head = {k: v for k, v in teacher_sd.items() if not k.startswith(teacher.base_model_prefix + ".")}
        source = {**{prefix + k: v for k, v in source.items()}, **head}
    with torch.no_grad():
        for key, tensor in target.items():
            if key not in source:
                continue
            if source[key].shape != tensor.shape:
                raise recipe.error(
                    "student.overrides",
                    f"{key}: student shape {tuple(tensor.shape)} != teacher {tuple(source[key].shape)}",
                )
            tensor.copy_(source[key].float())
    return student


def from_checkpoint(recipe: Recipe, config: PretrainedConfig, needs: Needs, teacher) -> torch.nn.Module:
    cls = student_class(recipe)
    # The checkpoint's config with the overrides applied before the modules are built (a dropout
    # override set afterwards would change the config but not the model).
    kwargs = {"dtype": torch.float32, "config": config}
    if implementation := attn_implementation(needs, kwargs["config"]):
        kwargs["attn_implementation"] = implementation
    try:
        model = cls.from_pretrained(hub.location(recipe.student.path), **kwargs)
    except (OSError, ValueError) as e:
        raise recipe.error("student.path", hub.load_error(recipe.student.path, e)) from None
    return model


# init -> builder(recipe, the student's config, what the terms need of it, the teacher or None)
STUDENT_BUILDERS: dict[str, Callable[..., torch.nn.Module]] = {
    "config": from_config,
    "teacher_layers": from_teacher_layers,
    "checkpoint": from_checkpoint,
}


def build_student(recipe: Recipe, needs: Needs, teacher: Optional[torch.nn.Module],
                  config: Optional[PretrainedConfig] = None) -> torch.nn.Module:  # fmt: skip
    """The student ``student.init`` builds, of ``config`` (the plan's; derived from the recipe when None)."""
    if config is None:
        config = student_config(recipe, teacher.config if teacher is not None else None)
    return STUDENT_BUILDERS[recipe.student.init](recipe, config, needs, teacher)
