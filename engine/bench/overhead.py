"""Engine overhead: one training step of the Trainer against a minimal hand-written DeepSpeed loop
doing the same work (same teacher, same initial student, same batches, same loss terms).

    python -m biodistill.engine.bench.overhead --config configs/demo.yaml --steps 20

Both run in this process under one DeepSpeed world, timed in alternating blocks so that machine
drift hits both alike; the ratio of medians is printed. Target: the engine within 5% (ratio <= 1.05).
The baseline supports the terms of the hidden/attention recipes (the demo's).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import deepspeed
import torch
import torch.nn.functional as F

from ..config import load_recipe
from ..runtime.distributed import deepspeed_config
from ..trainer import Trainer, param_groups


def hand_written_step(engine, teacher, batch, pairs, weights) -> None:
    """What a user would write by hand: full HF forwards, the losses inline, backward, step."""
    mask = batch["attention_mask"]
    with torch.no_grad():
        t = teacher(
            input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=True, output_attentions=True
        )
    s = engine(input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=True, output_attentions=True)
    tokens = mask.bool()
    cosine = sum(
        (1 - F.cosine_similarity(s.hidden_states[i][tokens], t.hidden_states[j][tokens], dim=-1)).mean()
        for i, j in pairs
    )
    mse = sum(F.mse_loss(s.hidden_states[i][tokens], t.hidden_states[j][tokens]) for i, j in pairs)
    valid = tokens[:, None, :, None].float()
    attn = 0
    for i, j in pairs:
        sa, ta = s.attentions[i - 1], t.attentions[j - 1]
        elem = ta * (torch.log(ta + 1e-12) - torch.log(sa + 1e-12))
        attn = attn + (elem * valid).sum() / (valid.sum() * elem.shape[1] * elem.shape[-1])
    loss = weights["hidden_cosine"] * cosine + weights["hidden_mse"] * mse + weights["attention_kl"] * attn
    engine.backward(loss)
    engine.step()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side (after 2 warm-up steps each)")
    parser.add_argument("--block", type=int, default=5, help="steps per alternating block")
    args, overrides = parser.parse_known_args(argv)
    # Its own scratch output: a benchmark never writes into (or is refused by) a real run's checkpoints.
    scratch = tempfile.mkdtemp(prefix="biodistill-bench-")
    recipe = load_recipe(
        args.config,
        ["--train.export", "false", "--deepspeed.tensorboard", "false", "--deepspeed.csv", "false",
         "--train.output_dir", scratch, *overrides],
    )  # fmt: skip
    kinds = {t.kind for t in recipe.losses.terms}
    if not kinds <= {"hidden_cosine", "hidden_mse", "attention_kl"} or any(
        t.layer_map != "uniform" for t in recipe.losses.terms
    ):
        raise SystemExit(
            "the hand-written baseline covers hidden_cosine, hidden_mse and attention_kl with uniform maps"
        )

    trainer = Trainer.from_recipe(recipe)
    student0 = copy.deepcopy(trainer.student)  # same initial weights for the baseline
    ns, nt = student0.config.num_hidden_layers, trainer.teacher.config.num_hidden_layers
    pairs = [(i, i * nt // ns) for i in range(1, ns + 1)]
    weights = {k: 0.0 for k in ("hidden_cosine", "hidden_mse", "attention_kl")}
    weights.update({t.kind: t.weight for t in recipe.losses.terms})
    optimizer = torch.optim.AdamW(param_groups(student0, recipe.optim.weight_decay), lr=recipe.optim.lr)
    baseline, *_ = deepspeed.initialize(
        model=student0, optimizer=optimizer, config=deepspeed_config(trainer.recipe, trainer.dist.world)
    )

    batches = trainer._batches()
    fixed = [next(batches) for _ in range(args.block)]
    engine_times, baseline_times = [], []

    def time_engine():
        start = time.perf_counter()
        trainer.train_step(iter([fixed[len(engine_times) % len(fixed)]] * trainer.grad_accum))
        return time.perf_counter() - start

    def time_baseline():
        start = time.perf_counter()
        for _ in range(trainer.grad_accum):
            hand_written_step(baseline, trainer.teacher, fixed[len(baseline_times) % len(fixed)], pairs, weights)
        return time.perf_counter() - start

    for _ in range(2):  # warm-up: allocator, first-call paths
        time_engine(), time_baseline()
    while len(engine_times) < args.steps:
        for _ in range(args.block):
            engine_times.append(time_engine())
        for _ in range(args.block):
            baseline_times.append(time_baseline())
    e, b = statistics.median(engine_times), statistics.median(baseline_times)
    if trainer.dist.is_main:
        print(
            f"recipe {args.config}: micro-batch {trainer.micro_batch} x {recipe.data.max_length} tokens, "
            f"world {trainer.dist.world}, ZeRO-{trainer.engine.zero_optimization_stage()}, {args.steps} steps each"
        )
        print(f"hand-written DeepSpeed loop  median step {b * 1e3:8.1f} ms")
        print(f"biodistill engine            median step {e * 1e3:8.1f} ms")
        print(f"engine / hand-written = {e / b:.3f}  (target <= 1.05)")
    trainer.close()


if __name__ == "__main__":
    main()
