"""The report: what each model scores, and what it costs. Compact models exist to be cheap at inference,
so beside each task's score (mean +- std over seeds) the table shows parameters (total and trainable),
size on disk and inference throughput at a fixed length on this machine's CPU (and GPU, where there is one).

Writes ``results.json``, ``results.md`` (the table) and ``score_vs_parameters.png`` into the suite's
output directory, each atomically.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel

from ..config import model_location
from ..models import minialbert
from ..runtime import hub
from ..runtime.files import write_atomic
from .suite import Suite


def weights_on_disk(path: str) -> int | None:
    """Bytes of the model's weight files (safetensors / bin), or None for a model not on this disk."""
    root = Path(model_location(path))
    if not root.is_dir():
        return None
    return sum(f.stat().st_size for f in root.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file())


def parameters(model: torch.nn.Module, adapters_only: bool) -> tuple[int, int]:
    """The encoder's parameters (no task head): all of them, and those fine-tuning trains."""
    if adapters_only:
        model.train_adapters_only()
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters() if p.requires_grad)


def _encoder(path: str) -> torch.nn.Module:
    location = hub.location(path)
    config = minialbert.resolve_config(AutoConfig.from_pretrained(location))
    return AutoModel.from_pretrained(location, config=config)


MIN_FORWARDS = 20  # timed forwards per figure, whatever ``seconds`` allows: fewer left the spread above the differences
# Half the interquartile range of the forwards' times, over the median, above which a figure says more about the
# host (other processes, CPU steal) than about the model: measured again, and marked "(noisy)" if it stays above.
NOISY = 0.25
TRIES = 3


def throughput(model: torch.nn.Module, device: str, length: int, batch: int, seconds: float) -> tuple[float, float]:
    """Sequences per second of the encoder's forward at ``length`` tokens, ``batch`` at a time, in eval mode
    without autograd (fp32 on CPU; bf16 on a GPU that has it, else fp16): warm up, then time forwards for
    ``seconds`` and at least MIN_FORWARDS of them, and take the median forward (a shared machine's stalls skew
    a mean). Returns it with its spread: half the interquartile range of the forwards' times, relative to the
    median, so that the table says when two figures are within each other's noise."""
    model = model.eval().to(device)
    if device == "cuda":
        model = model.to(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    ids = torch.randint(1000, 2000, (batch, length), device=device)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        return timed(lambda: model(input_ids=ids, attention_mask=mask), batch, seconds, lambda: _sync(device))


def timed(forward, batch: int, seconds: float, sync=lambda: None) -> tuple[float, float]:
    """(sequences/s of the median forward, half the interquartile range relative to it): two warm-up forwards,
    then at least MIN_FORWARDS and ``seconds`` of timed ones. A spread above NOISY is measured again, up to TRIES
    times in all, and the steadiest measurement kept (the report marks one that stays above)."""
    for _ in range(2):
        forward()
    sync()
    best = None
    for _ in range(TRIES):
        times, start = [], time.perf_counter()
        while len(times) < MIN_FORWARDS or time.perf_counter() - start < seconds:
            began = time.perf_counter()
            forward()
            sync()
            times.append(time.perf_counter() - began)
        q1, median, q3 = statistics.quantiles(times, n=4)
        measured = (batch / median, (q3 - q1) / 2 / median)
        best = measured if best is None or measured[1] < best[1] else best
        if best[1] <= NOISY:
            break
    return best


def deployment(path: str, t, work: Path) -> dict:
    """What the model costs deployed on this CPU: its task model (encoder + a token-classification head, the
    NER case; a head's cost is negligible) in PyTorch fp32, ONNX Runtime fp32 (fused) and ORT int8, sequences/s
    at ``t.length`` tokens for each batch size, on as many threads as PyTorch uses, and each one's size."""
    from ..deploy.export import export, session, token_task_model

    model = token_task_model(path, work / "task-model")
    exported = export(str(work / "task-model"), work / "onnx")
    names, threads = exported.report["inputs"], torch.get_num_threads()
    entry = {"bytes_pytorch": exported.report["bytes"]["pytorch"], "bytes_onnx": exported.report["bytes"]["onnx_fp32"],
             "bytes_int8": exported.report["bytes"]["onnx_int8"], "int8_scheme": exported.report["int8"]}  # fmt: skip
    for bs in t.batch_sizes:
        ids = torch.randint(1000, 2000, (bs, t.length))
        feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
        feeds = {n: feeds[n] for n in names}
        with torch.inference_mode():
            entry[f"pt_seq_per_s_bs{bs}"], entry[f"pt_spread_bs{bs}"] = timed(lambda f=feeds: model(**f), bs, t.seconds)
        numpy_feeds = {n: v.numpy() for n, v in feeds.items()}
        for label, onnx_path in (("ort", exported.fp32), ("int8", exported.int8)):
            runner = session(onnx_path, threads)
            rate, spread = timed(lambda r=runner, f=numpy_feeds: r.run(None, f), bs, t.seconds)
            entry[f"{label}_seq_per_s_bs{bs}"], entry[f"{label}_spread_bs{bs}"] = rate, spread
    return entry


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def costs(suite: Suite, paths: dict[str, str], prints: dict[str, str | None]) -> dict[str, dict]:
    """Each model's parameters, size and throughput, measured once per model fingerprint and kept
    (``<out>/costs/<model>.json``)."""
    out = {}
    t = suite.throughput
    for m in suite.models:
        cache = Path(suite.output_dir) / "costs" / f"{m.name}.json"
        kept = json.loads(cache.read_text()) if cache.is_file() else {}
        if kept.get("fingerprint") == prints[m.name] and ("deploy" in kept or not suite.deploy.enabled()):
            out[m.name] = kept
            continue
        encoder = _encoder(paths[m.name])
        total, trainable = parameters(encoder, m.adapters_only)
        entry = {"parameters": total, "trainable": trainable, "bytes_on_disk": weights_on_disk(paths[m.name]),
                 "fingerprint": prints[m.name]}  # fmt: skip
        for bs in t.batch_sizes:
            entry[f"cpu_seq_per_s_bs{bs}"], entry[f"cpu_spread_bs{bs}"] = throughput(
                encoder, "cpu", t.length, bs, t.seconds
            )
        entry["cpu_threads"] = torch.get_num_threads()
        if suite.deploy.enabled():
            with tempfile.TemporaryDirectory(dir=suite.output_dir) as work:
                entry["deploy"] = deployment(paths[m.name], t, Path(work))
        if torch.cuda.is_available():  # after the CPU figures: it moves the encoder to the GPU in half precision
            for bs in t.batch_sizes:
                entry[f"gpu_seq_per_s_bs{bs}"], entry[f"gpu_spread_bs{bs}"] = throughput(
                    encoder, "cuda", t.length, bs, t.seconds
                )
            entry["gpu"] = torch.cuda.get_device_name()
        _atomic(cache, json.dumps(entry, indent=1))
        out[m.name] = entry
    return out


def write_report(suite: Suite, results: dict, cost: dict, expected_cells: int, done_cells: int) -> str:
    """results.json, results.md and the PNG; returns the Markdown table."""
    root = Path(suite.output_dir)
    doc = {"suite": suite.name, "cells": {"finished": done_cells, "planned": expected_cells},
           "protocol": vars(suite.protocol), "models": {}}  # fmt: skip
    for m in suite.models:
        path = m.path or (f"(initial student of {m.recipe})" if m.recipe else
                          f"({m.task_recipe}: task-distilled from {m.teacher} in each cell)")  # fmt: skip
        doc["models"][m.name] = {"path": path, "adapters_only": m.adapters_only,
                                 **cost[m.name], "tasks": results.get(m.name, {})}  # fmt: skip
    _atomic(root / "results.json", json.dumps(doc, indent=1, default=str))
    table = markdown(suite, doc, expected_cells, done_cells)
    _atomic(root / "results.md", table)
    plot(suite, doc, root / "score_vs_parameters.png")
    return table


def markdown(suite: Suite, doc: dict, expected: int, done: int) -> str:
    bs = suite.throughput.batch_sizes
    gpu = any("gpu" in m for m in doc["models"].values())
    head = ["model", "params (total / trainable)", "size on disk"]
    head += [f"{t.name} ({suite.metric(t)})" for t in suite.tasks]
    head += [f"CPU seq/s bs{b}" for b in bs] + ([f"GPU seq/s bs{b}" for b in bs] if gpu else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in doc["models"].items():
        row = [name, f"{m['parameters'] / 1e6:.2f}M / {m['trainable'] / 1e6:.2f}M", _size(m["bytes_on_disk"])]
        for t in suite.tasks:
            r = m["tasks"].get(t.name)
            score = f"{100 * r['test_mean']:.1f} ± {100 * r['test_std']:.1f}" if r else "-"
            if r and "int8_mean" in r:
                score += f" (int8 {100 * r['int8_mean']:.1f} ± {100 * r['int8_std']:.1f})"
            if r and "subword_mean" in r:
                score += f" (sub-word {100 * r['subword_mean']:.1f} ± {100 * r['subword_std']:.1f})"
            row.append(score)
        row += [_rate(m, "cpu", b, ".1f") for b in bs]
        row += [_rate(m, "gpu", b, ".0f") for b in bs] if gpu else []
        lines.append("| " + " | ".join(row) + " |")
    p = suite.protocol
    lines += [
        "",
        f"Test scores x100, mean ± std over {len(p.seeds)} seeds at the lr (of {', '.join(f'{x:g}' for x in p.lrs)}) "
        f"with the best mean dev score; {p.epochs:g} epochs, {p.schedule} schedule, weight decay {p.weight_decay:g}. "
        f"Throughput: the encoder's forward at {suite.throughput.length} tokens, sequences/s (median of at least "
        f"{MIN_FORWARDS} forwards, ± half their interquartile range), on {torch.get_num_threads()} CPU threads"
        + (" and the GPU named in results.json." if gpu else "."),
        f"Cells finished: {done} of {expected}." + ("" if done == expected else " Rerun the same command to finish."),
    ]
    own = [f"{m.name} ({m.epochs:g} epochs)" for m in suite.models if m.task_recipe and m.epochs]
    if own:
        lines.append(f"Task-distilled for their own epochs (not the protocol's): {', '.join(own)}.")
    if p.subword_f1:
        lines.append("NER scores are word-level entity F1; \"sub-word\" is seqeval over the sub-word sequences, as the "
                     "compact models' ner.py computes the figure their paper reports (with subword_labels: all, a "
                     "word of k pieces counts k times): not comparable with word-level F1.")  # fmt: skip
    cut = {
        t.name: {s: n for s, n in r["truncated"].items() if n}
        for m in doc["models"].values()
        for t in suite.tasks
        if (r := m["tasks"].get(t.name))
    }
    notes = [f"{task}: {', '.join(f'{n} {s}' for s, n in c.items())}" for task, c in cut.items() if c]
    if notes:
        lines.append(
            f"Inputs longer than max_length {p.max_length} (cut, or QA contexts read in windows): {'; '.join(notes)}."
        )
    if any("deploy" in m for m in doc["models"].values()):
        lines += ["", *deployment_table(suite, doc)]
    if any("(noisy)" in line for line in lines):  # a figure anywhere in the report, the deployment table's included
        lines += ["", f"(noisy): the forwards' times spread by more than {100 * NOISY:.0f}% of their median (half the "
                  f"interquartile range) in each of {TRIES} measurements: the host was busy, and the figure cannot be "
                  "compared with the others; measure again on an idle machine."]  # fmt: skip
    return "\n".join(lines) + "\n"


def deployment_table(suite: Suite, doc: dict) -> list[str]:
    """Each model deployed on this CPU: PyTorch fp32 against ONNX Runtime fp32 and int8, and the sizes."""
    bs = suite.throughput.batch_sizes
    head = ["model"] + [f"{runtime} seq/s bs{b}" for b in bs for runtime in ("PyTorch fp32", "ORT fp32", "ORT int8")]
    head += ["int8 / PyTorch", "size: PyTorch / ONNX / int8"]
    lines = ["Deployed (the fine-tuned task model on this CPU):", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for name, m in doc["models"].items():
        d = m.get("deploy")
        if not d:
            continue
        row = [name] + [_rate(d, runtime, b, ".1f") for b in bs for runtime in ("pt", "ort", "int8")]
        row.append(" / ".join(f"{d[f'int8_seq_per_s_bs{b}'] / d[f'pt_seq_per_s_bs{b}']:.2f}x" for b in bs))
        row.append(f"{_size(d['bytes_pytorch'])} / {_size(d['bytes_onnx'])} / {_size(d['bytes_int8'])}")
        lines.append("| " + " | ".join(row) + " |")
    scheme = next(m["deploy"]["int8_scheme"] for m in doc["models"].values() if "deploy" in m)
    lines += ["", f"{suite.throughput.length} tokens, {torch.get_num_threads()} threads for every runtime. ORT fp32: the "
              "dynamo ONNX export with ONNX Runtime's fused attention, skip-LayerNorm and GELU; int8: dynamic "
              f"quantisation, {scheme['weights']} weights and {scheme['activations']} activations "
              f"(reduce_range {scheme['reduce_range']}). The int8 score beside each PyTorch score above is the same "
              "seeds' fine-tuned models, exported and scored through ONNX Runtime int8 (biodistill-export)."]  # fmt: skip
    return lines


def _rate(m: dict, device: str, batch: int, fmt: str) -> str:
    rate, spread = m.get(f"{device}_seq_per_s_bs{batch}"), m.get(f"{device}_spread_bs{batch}")
    if rate is None:
        return "-"
    return f"{rate:{fmt}}" + (f" ± {100 * spread:.0f}%" if spread is not None else "") + _noisy(spread)


def _noisy(spread) -> str:
    return " (noisy)" if spread is not None and spread > NOISY else ""


def _size(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def plot(suite: Suite, doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    deployed = any("deploy" in m for m in doc["models"].values())
    fig, axes = plt.subplots(1, 2 if deployed else 1, figsize=(11.5 if deployed else 6.5, 4.2), squeeze=False)
    ax = axes[0][0]
    offsets = _offsets({name: m["parameters"] / 1e6 for name, m in doc["models"].items()})
    for t in suite.tasks:
        xs, ys, es, names = [], [], [], []
        for name, m in doc["models"].items():
            r = m["tasks"].get(t.name)
            if r:
                xs.append(m["parameters"] / 1e6 + offsets[name])
                ys.append(100 * r["test_mean"])
                es.append(100 * r["test_std"])
                names.append(name)
        if xs:
            ax.errorbar(xs, ys, yerr=es, fmt="o", capsize=3, label=f"{t.name} ({suite.metric(t)})")
            for x, y, n in zip(xs, ys, names):  # the left one of a same-size pair is labelled on its left
                side = -1 if offsets[n] < 0 else 1
                ax.annotate(n, (x, y), textcoords="offset points", xytext=(5 * side, 4 * side), fontsize=8,
                            ha="left" if side > 0 else "right", va="bottom" if side > 0 else "top")  # fmt: skip
    ax.margins(x=0.3)  # room for the outer labels
    ax.set_xlabel("parameters (millions; models of one size side by side)")
    ax.set_ylabel("test score x100 (mean ± std over seeds)")
    ax.set_title(f"{suite.name}: score against size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if deployed:
        _int8_panel(suite, doc, axes[0][1])
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _int8_panel(suite: Suite, doc: dict, ax) -> None:
    """Score (int8, through ONNX Runtime) against int8 sequences/s at the first batch size: what a deployment buys."""
    bs = suite.throughput.batch_sizes[0]
    for t in suite.tasks:
        points = [(m["deploy"][f"int8_seq_per_s_bs{bs}"], 100 * r["int8_mean"], 100 * r["int8_std"],
                   name + _noisy(m["deploy"].get(f"int8_spread_bs{bs}")))
                  for name, m in doc["models"].items() if "deploy" in m and (r := m["tasks"].get(t.name)) and "int8_mean" in r]  # fmt: skip
        if points:
            xs, ys, es, names = zip(*points)
            ax.errorbar(xs, ys, yerr=es, fmt="s", capsize=3, label=f"{t.name} ({suite.metric(t)})")
            for x, y, n in zip(xs, ys, names):  # a noisy speed is named so: its x means little
                ax.annotate(n, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(f"ONNX Runtime int8 sequences/s (batch {bs}, {suite.throughput.length} tokens)")
    ax.set_ylabel("int8 test score x100")
    ax.set_title("deployed: score against speed")
    ax.grid(alpha=0.3)
    ax.margins(x=0.18)


def _offsets(sizes: dict[str, float]) -> dict[str, float]:
    """x offsets (millions of parameters) that spread models of the same size (a student before and after
    distillation, say) side by side around their true size, instead of one on top of the other."""
    span = (max(sizes.values()) - min(sizes.values())) or max(sizes.values()) or 1.0
    groups: dict[float, list[str]] = {}
    for name, size in sizes.items():
        groups.setdefault(round(size, 1), []).append(name)
    step = 0.03 * span
    return {n: (j - (len(g) - 1) / 2) * step for g in groups.values() for j, n in enumerate(g)}


def _atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)
