"""A fine-tuned model directory -> ONNX Runtime models: fp32 with ONNX Runtime's transformer fusions, and int8.

The steps, each by the library made for it:

1. ``torch.onnx.export(..., dynamo=True)`` traces the task model (token or sequence classification, QA) with
   dynamic batch and sequence axes. (The TorchScript exporter, ``dynamo=False``, mis-traces transformers 5's
   attention masks: logits off by 0.3 on MiniLM, measured.) MiniALBERT exports through its PyTorch reference
   adapter: its Triton kernel is CUDA-only.
2. onnxscript's ``ort_fusions`` rewrite the exported graph into ONNX Runtime's fused operators:
   SkipLayerNormalization, BiasGelu and attention. (onnxruntime.transformers.optimizer was written for the
   TorchScript exporter's graph: on a dynamo graph it finds no attention to fuse.) The fp32 model takes the
   packed ``Attention`` operator (Q, K and V in one matmul); the int8 model stops at ``MultiHeadAttention``,
   so that Q, K and V stay three MatMuls that quantisation can reach (ORT's quantizer leaves an Attention
   whose QKV weight is assembled in the graph in fp32: a quarter of the encoder's weights).
3. Verification: ONNX Runtime's fp32 logits must equal PyTorch's to ``atol`` (1e-4) on a padded sample batch
   of two sentences of different lengths, or the export fails naming the largest difference and where.
4. ``onnxruntime.quantization.quantize_dynamic``: the weights of every MatMul / Attention become int8 ahead of
   time, per output channel (a per-tensor scale is set by the largest weight of the whole matrix, and costs
   the small channels their precision; per channel costs nothing at run time); activations are quantized to
   uint8 at run time, row by row, from their observed range. That is ORT's U8S8 scheme, the one its x86
   kernels are fastest at. On CPUs with VNNI (AVX512-VNNI, AVX-VNNI) the u8 x s8 dot products accumulate in
   int32 exactly, so all 8 bits of the weights are used (``reduce_range=False``); without VNNI the same
   instructions go through a saturating 16-bit intermediate (vpmaddubsw), and ORT's guidance is 7-bit
   weights (``reduce_range=True``), which this module chooses by reading the CPU's flags.

The output directory holds ``model.onnx`` (fp32, fused), ``model.int8.onnx``, the tokenizer, ``config.json``
(the label names as ``id2label``) and ``export.json`` (the checks' figures, sizes, versions). It is written
under a temporary name and renamed whole: an export is either complete or absent.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import platform
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import ConfigError
from ..models import minialbert

# config.architectures suffix -> (Auto class name, ONNX output names)
HEADS = {
    "ForTokenClassification": ("AutoModelForTokenClassification", ("logits",)),
    "ForSequenceClassification": ("AutoModelForSequenceClassification", ("logits",)),
    "ForQuestionAnswering": ("AutoModelForQuestionAnswering", ("start_logits", "end_logits")),
}
SAMPLE = ["Aspirin inhibits platelet aggregation.", "Hereditary breast cancer is rare in men, and BRCA2 carriers"
          " are screened earlier than the general population."]  # fmt: skip
FP32, INT8 = "model.onnx", "model.int8.onnx"
MARKER = "export.json"  # written into every export, last: what tells a previous export from anything else
OPSET = 18
_PROTOBUF_LIMIT = 1.8 * 2**30  # bytes of fp32 weights above which the graph keeps them in a side file


@dataclass
class Exported:
    """What ``export`` wrote: the directory, its two models and the figures of its checks."""

    path: Path
    report: dict

    @property
    def fp32(self) -> Path:
        return self.path / FP32

    @property
    def int8(self) -> Optional[Path]:
        return self.path / INT8 if (self.path / INT8).is_file() else None


def vnni() -> bool:
    """Whether this CPU has VNNI (u8 x s8 dot products into int32 without saturation)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: assume the saturating path, whose 7-bit weights are safe everywhere
        return False
    return any(flag in flags.split() for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def task_model(path: str, key: str = "model"):
    """The task model saved in ``path``, its head kind and its tokenizer; a directory without a head, or
    without a tokenizer, is refused by name."""
    import transformers

    from ..runtime import hub

    location = hub.location(path)
    try:
        saved = transformers.AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as e:
        raise ConfigError(path, key, f"cannot read its config: {str(e)[:200]}") from None
    config, architectures = minialbert.resolve_config(saved), saved.architectures or []
    heads = [(suffix, spec) for suffix, spec in HEADS.items() for a in architectures if a.endswith(suffix)]
    if not heads:
        raise ConfigError(path, key, f"no task head to export (its config's architectures are {saved.architectures}): "
                          "export a fine-tuned token classification, sequence classification or QA model")  # fmt: skip
    suffix, (auto, outputs) = heads[0]
    model, loading = getattr(transformers, auto).from_pretrained(
        location, config=config, dtype=torch.float32, output_loading_info=True
    )
    # A head whose weights are not the ones saved (a sequence classifier's pooler and classifier under a config that
    # says token classification) would be exported with random weights, and checked against the same wrong model.
    unused = {k: loading.get(k) or [] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(unused.values()):
        said = "; ".join(f"{k.replace('_', ' ')}: {_names(v)}" for k, v in unused.items() if v)
        raise ConfigError(path, key, f"its weights do not fit its config's {architectures[0]} ({said}): the saved "
                          "head is not the one the config names; fix config.json's architectures or re-save the "
                          "model")  # fmt: skip
    model = model.eval()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as e:
        raise ConfigError(path, key, f"no tokenizer beside the weights ({type(e).__name__}): save it with the model") from None  # fmt: skip
    return model, suffix, outputs, tokenizer


def _names(keys: list) -> str:
    keys = sorted(k[0] if isinstance(k, tuple) else k for k in keys)  # mismatched keys come with their two shapes
    return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def check_out(out: str | Path, model: str, key: str = "--out") -> None:
    """``out`` may be written: it does not exist, or it is a previous export (it holds export.json) that does
    not hold the model being exported. Anything else is refused here, before any compute."""
    from ..config import model_location
    from ..runtime.files import not_replaceable

    refusal = not_replaceable(Path(out), MARKER, "biodistill-export output", keep=(Path(model_location(model)),))
    if refusal is not None:
        raise ConfigError(key, "", refusal)


def token_task_model(path: str, target: Path) -> torch.nn.Module:
    """``path``'s encoder with a token-classification head (its own, or a new one), saved with its tokenizer
    into ``target``: the task model the cost measurements export and time (a head's cost is negligible)."""
    import transformers

    from ..runtime import hub

    location = hub.location(path)
    config = minialbert.resolve_config(transformers.AutoConfig.from_pretrained(location))
    model = transformers.AutoModelForTokenClassification.from_pretrained(location, config=config).eval()
    model.save_pretrained(target)
    transformers.AutoTokenizer.from_pretrained(location).save_pretrained(target)
    return model


class _Logits(torch.nn.Module):
    """The task model as the ONNX graph sees it: named tensors in, the head's logits out (a tuple, not a
    ModelOutput)."""

    def __init__(self, model: torch.nn.Module, inputs: tuple[str, ...], outputs: tuple[str, ...]):
        super().__init__()
        self.model, self.inputs, self.outputs = model, inputs, outputs

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        out = self.model(**{name: given[name] for name in self.inputs})
        return tuple(out[name] for name in self.outputs)


def input_names(model: torch.nn.Module, tokenizer) -> tuple[str, ...]:
    """What the tokenizer gives and the model's forward takes (DistilBERT and ModernBERT: no token_type_ids)."""
    accepted = inspect.signature(model.forward).parameters
    return tuple(n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted and n in tokenizer.model_input_names)  # fmt: skip


def session(path: Path, threads: int = 0):
    """An ONNX Runtime CPU session of ``path`` (``threads`` 0: ORT's default, one per physical core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # warnings about unused initialisers are noise
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export(path: str, out: str | Path, int8: bool = True, fuse: bool = True, atol: float = 1e-4,
           key: str = "model") -> Exported:  # fmt: skip
    """Export the fine-tuned model in ``path`` into ``out`` (replaced whole); see the module docstring."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ConfigError(path, key, f"exporting needs onnx and onnxruntime ({e.name} is missing): pip install "
                          "'biodistill[deploy]'") from None  # fmt: skip
    check_out(out, path)
    with _quiet():
        return _export(path, Path(out), int8, fuse, atol, key)


@contextlib.contextmanager
def _quiet():
    """The libraries' notes at every export, none of which a user can act on: torch.onnx's missing torchvision
    ops and axis renames, pytree deprecations, the quantizer's advice to pre-process image models."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "root", "")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _export(path: str, out: Path, int8: bool, fuse: bool, atol: float, key: str) -> Exported:
    from ...kernels.ops import kernel_mode
    from ..config import model_location
    from ..runtime.files import replace_dir

    model, head, outputs, tokenizer = task_model(path, key)
    names = input_names(model, tokenizer)
    sample = tokenizer(SAMPLE, padding=True, return_tensors="pt")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with kernel_mode("reference"), torch.no_grad():  # MiniALBERT's adapters: the PyTorch path, not Triton
            reference = [t.numpy() for t in _Logits(model, names, outputs)(**{n: sample[n] for n in names})]
            _onnx_export(model, names, outputs, sample, tmp / FP32, path, key)
        report = {"model": str(path), "head": head, "inputs": list(names), "outputs": list(outputs), "fused": {}}
        if int8:  # from the exporter's graph, before the fp32 fusions pack Q, K and V together
            raw = tmp / "unfused.onnx"
            shutil.copyfile(tmp / FP32, raw)
            report["int8_fused"] = _fuse(raw, attention="mha") if fuse else {}
            report |= _quantize(raw, tmp / INT8, names, sample, reference)
            raw.unlink()
        if fuse:
            report["fused"] = _fuse(tmp / FP32, attention="packed")
        report["fp32_max_abs_diff"] = _verify(tmp / FP32, names, outputs, sample, reference, atol, path, key)
        tokenizer.save_pretrained(tmp)
        model.config.save_pretrained(tmp)  # id2label: the label names beside the model
        report |= {
            "bytes": {"pytorch": _weights_bytes(path), "onnx_fp32": _bytes(tmp / FP32), "onnx_int8": _bytes(tmp / INT8)},
            "versions": _versions(), "cpu": platform.processor() or platform.machine(), "vnni": vnni(),
        }  # fmt: skip
        (tmp / MARKER).write_text(json.dumps(report, indent=1))
        keep = (Path(model_location(path)),)
        replace_dir(tmp, out, MARKER, "biodistill-export output", keep)
    except FileExistsError as e:  # something took the path while the export ran
        raise ConfigError("--out", "", str(e)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Exported(out, report)


def _onnx_export(model, names, outputs, sample, target: Path, path: str, key: str) -> None:
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=_positions(model.config))
    external = sum(p.numel() for p in model.parameters()) * 4 > _PROTOBUF_LIMIT
    try:
        torch.onnx.export(
            _Logits(model, names, outputs).eval(), (), str(target), kwargs={n: sample[n] for n in names},
            input_names=list(names), output_names=list(outputs), opset_version=OPSET, dynamo=True,
            dynamic_shapes={n: {0: batch, 1: sequence} for n in names}, external_data=external, verbose=False,
        )  # fmt: skip
    except Exception as e:  # torch.export's failures are long; the first line says what it could not trace
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ConfigError(path, key, f"torch.onnx.export could not trace {model.config.model_type}: {first}") from None


def _positions(config) -> int:
    return int(getattr(config, "max_position_embeddings", 0) or 8192)


def _fuse(model_path: Path, attention: str) -> dict:
    """onnxscript's ONNX Runtime fusions, in place; returns how many of each it made. ``attention``: "packed"
    (all of optimize_for_ort's, ending in Attention) or "mha" (the same fusions in the same order, less the
    two that pack Q, K and V into Attention: they stay separate MatMuls)."""
    import onnx_ir as ir
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter import ort_fusions
    from onnxscript.rewriter.ort_fusions import (
        bias_gelu,
        cos_sin_cache,
        erfgelu,
        gelu,
        mha,
        mha_scale,
        rotary_embedding,
        sdpa,
        sdpa_via_mha,
        skip_normalization,
    )  # fmt: skip

    graph = ir.load(str(model_path))
    if attention == "packed":
        graph, counts = ort_fusions.optimize_for_ort(graph)
    else:
        optimize(graph)
        steps = {
            "erf_gelu": erfgelu.fuse_erfgelu,
            "skip_layer_normalization": skip_normalization.fuse_skip_layer_normalization,
            "rotary_embedding": rotary_embedding.fuse_rotary_embedding,
            "cos_sin_cache": cos_sin_cache.fuse_cos_sin_cache,
            "sdpa": lambda g: sdpa.fuse_sdpa(g, apply_shape_inference=True),
            "mha1": mha.fuse_mha1,
            "mha2": mha.fuse_mha2,
            "mha_scale": mha_scale.fuse_mha_scale,
            "gelu": gelu.fuse_gelu,
            "bias_gelu": bias_gelu.fuse_bias_gelu,
            "sdpa_via_mha": sdpa_via_mha.replace_sdpa_by_mha,  # what no MHA pattern took
        }
        counts = {name: step(graph) for name, step in steps.items()}
        optimize(graph)  # inlines the intermediate fusion functions nothing consumed
    ir.save(graph, str(model_path))
    return {k: v for k, v in counts.items() if v}


def _run(model_path: Path, names, sample) -> list[np.ndarray]:
    return session(model_path).run(None, {n: sample[n].numpy() for n in names})


def _verify(model_path: Path, names, outputs, sample, reference, atol: float, path: str, key: str) -> float:
    """The largest |ORT - PyTorch| over the sample's real (non-pad) tokens' logits; an error past ``atol``."""
    try:
        got = _run(model_path, names, sample)
    except Exception as e:  # an operator ORT cannot run, a shape it refuses
        raise ConfigError(path, key, f"ONNX Runtime cannot run the exported model: {str(e).splitlines()[0][:300]}") from None  # fmt: skip
    worst, where = -1.0, ""
    for name, ours, theirs in zip(outputs, got, reference):
        diff = np.abs(ours - theirs)
        if diff.ndim >= 2 and diff.shape[:2] == tuple(sample["attention_mask"].shape):  # per-token outputs
            diff = np.where(sample["attention_mask"].numpy().astype(bool)[(...,) + (None,) * (diff.ndim - 2)], diff, 0)
        if diff.max() > worst:
            worst, index = float(diff.max()), np.unravel_index(diff.argmax(), diff.shape)
            where = f"{name}{list(map(int, index))}: ONNX Runtime {ours[index]:.6g}, PyTorch {theirs[index]:.6g}"
    if not worst <= atol:
        raise ConfigError(path, key, f"ONNX Runtime's fp32 logits differ from PyTorch's by {worst:.3g} (> {atol:g}) at {where}")  # fmt: skip
    return worst


def _quantize(fp32: Path, target: Path, names, sample, reference) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    reduce_range = not vnni()
    quantize_dynamic(str(fp32), str(target), per_channel=True, reduce_range=reduce_range, weight_type=QuantType.QInt8)
    got = _run(target, names, sample)
    mask = sample["attention_mask"].numpy().astype(bool)
    first = got[0] if got[0].shape[:2] != mask.shape else got[0][mask]
    ref = reference[0] if reference[0].shape[:2] != mask.shape else reference[0][mask]
    return {
        "int8": {"weights": "QInt8 per channel", "activations": "QUInt8 dynamic", "reduce_range": reduce_range,
                 "max_abs_diff": float(np.abs(first - ref).max()),
                 "argmax_agreement": float((first.argmax(-1) == ref.argmax(-1)).mean())},
    }  # fmt: skip


def _bytes(model_path: Path) -> Optional[int]:
    """A model's size on disk, its external-data file included."""
    if not model_path.is_file():
        return None
    side = model_path.with_name(model_path.name + ".data")
    return model_path.stat().st_size + (side.stat().st_size if side.is_file() else 0)


def _weights_bytes(path: str) -> Optional[int]:
    from ..config import model_location

    root = Path(model_location(path))
    return sum(f.stat().st_size for f in root.glob("*") if f.suffix in (".safetensors", ".bin")) if root.is_dir() else None  # fmt: skip


def _versions() -> dict:
    import onnx
    import onnxruntime
    import onnxscript
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__}  # fmt: skip
