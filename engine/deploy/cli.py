"""``biodistill-export --model DIR --out DIR [--no-int8] [--no-fuse] [--atol 1e-4]``

A fine-tuned model directory (token or sequence classification, QA) -> ONNX Runtime fp32 and int8 models
beside its tokenizer and label names, each checked against PyTorch (export.py says how).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys

from ..config import ConfigError


def _tolerance(text: str) -> float:
    """A finite positive tolerance, refused by argparse (exit 2, naming --atol) before any export work."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="biodistill-export", description=__doc__.splitlines()[2])
    parser.add_argument(
        "--model", required=True, help="a fine-tuned Hugging Face model directory (or pkg://, or a hub name)"
    )
    parser.add_argument(
        "--out",
        required=True,
        help="a new directory, or a previous export to replace (whole, atomically); nothing else is replaced",
    )
    parser.add_argument("--no-int8", action="store_true", help="the fp32 model only")
    parser.add_argument(
        "--no-fuse", action="store_true", help="keep the exporter's graph, without ORT's fused operators"
    )
    parser.add_argument(
        "--atol", type=_tolerance, default=1e-4, help="largest |ORT - PyTorch| fp32 logit accepted (> 0)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.ERROR, format="[%(name)s] %(message)s")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    from .export import export

    try:  # export() refuses an --out it may not replace before the model loads
        done = export(args.model, args.out, int8=not args.no_int8, fuse=not args.no_fuse, atol=args.atol, key="--model")
    except ConfigError as e:
        print(f"biodistill-export: error: {e}", file=sys.stderr, flush=True)
        return 2
    r = done.report
    sizes = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in r["bytes"].items() if v)
    print(
        f"[export] {done.path}: {r['head']} ({', '.join(r['inputs'])} -> {', '.join(r['outputs'])}); fp32 within "
        f"{r['fp32_max_abs_diff']:.2g} of PyTorch; fused {json.dumps(r['fused'])}; {sizes}"
    )
    if "int8" in r:
        q = r["int8"]
        print(
            f"[export] int8 ({q['weights']} weights, reduce_range {q['reduce_range']}): argmax agrees with fp32 on "
            f"{100 * q['argmax_agreement']:.0f}% of the sample, max |diff| {q['max_abs_diff']:.3g}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
