"""biodistill-export: ONNX Runtime models of fine-tuned task models, each family and head kind the project
ships, checked against PyTorch on inputs the export never saw (other batch sizes and lengths, padding)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import minilm_dir
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    BertConfig,
    DebertaV2Config,
    DistilBertConfig,
    MobileBertConfig,
    ModernBertConfig,
)

from biodistill.engine.config import ConfigError
from biodistill.engine.deploy import cli
from biodistill.engine.deploy.export import export, session
from biodistill.engine.models.minialbert import MiniAlbertConfig, MiniAlbertForTokenClassification

pytestmark = pytest.mark.slow  # every test exports an ONNX model (seconds each): not in make test-fast

VOCAB = 30522  # the MiniLM tokenizer every model here is saved with
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=128)  # fmt: skip
FAMILIES = {
    "bert": lambda: BertConfig(**SMALL),
    "distilbert": lambda: DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=128
    ),  # fmt: skip
    "mobilebert": lambda: MobileBertConfig(
        **{**SMALL, "intermediate_size": 32},
        embedding_size=16,
        intra_bottleneck_size=16,
        true_hidden_size=16,
        num_feedforward_networks=2,
    ),  # fmt: skip
    "modernbert": lambda: ModernBertConfig(
        **{**SMALL, "num_hidden_layers": 3},
        local_attention=8,
        pad_token_id=0,
        cls_token_id=101,
        sep_token_id=102,
        bos_token_id=101,
        eos_token_id=102,
    ),  # fmt: skip
    "deberta-v2": lambda: DebertaV2Config(
        **SMALL,
        relative_attention=True,
        position_buckets=8,
        pos_att_type=["p2c", "c2p"],
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        position_biased_input=False,
        type_vocab_size=0,
    ),  # fmt: skip
}
HEADS = {"token": AutoModelForTokenClassification, "sequence": AutoModelForSequenceClassification,
         "qa": AutoModelForQuestionAnswering}  # fmt: skip
UNSEEN = ["Sepsis.", "Acute kidney injury after cisplatin was treated with fluids and the creatinine fell within a week.",
          "No fever."]  # fmt: skip


def save(directory, model):
    torch.manual_seed(0)
    for p in model.parameters():  # weights far from init scale: logits that differ where the graphs differ
        p.data.normal_(0, 0.2)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(directory)
    return directory


def agrees(exported, model_dir, head: str, model_cls, atol: float = 1e-4):
    """ORT fp32 equals PyTorch on unseen inputs (3 sentences, padded), at real tokens; int8 mostly agrees."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = model_cls.from_pretrained(model_dir).eval()
    names = exported.report["inputs"]
    enc = tokenizer(UNSEEN, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**{n: enc[n] for n in names})
    reference = [out[name].numpy() for name in exported.report["outputs"]]
    mask = enc["attention_mask"].numpy().astype(bool)
    for path, tolerance in ((exported.fp32, atol), (exported.int8, None)):
        got = session(path).run(None, {n: enc[n].numpy() for n in names})
        for ours, theirs in zip(got, reference):
            if head == "token":
                ours, theirs = ours[mask], theirs[mask]
            elif head == "qa":
                ours, theirs = np.where(mask, ours, 0), np.where(mask, theirs, 0)
            if tolerance is not None:
                assert np.abs(ours - theirs).max() <= tolerance, (path.name, np.abs(ours - theirs).max())
            else:  # int8: the same decisions almost everywhere
                assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.75


@pytest.mark.parametrize("family", list(FAMILIES) + ["minialbert"])
def test_every_family_exports_and_matches_pytorch(family, tmp_path):
    if family == "minialbert":  # through its PyTorch reference adapter (the Triton kernel is CUDA-only)
        config = MiniAlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, reduction_factor=4, num_labels=5)  # fmt: skip
        model, cls = MiniAlbertForTokenClassification(config), MiniAlbertForTokenClassification
    else:
        config = FAMILIES[family]()
        config.num_labels = 5
        model, cls = AutoModelForTokenClassification.from_config(config), AutoModelForTokenClassification
    model_dir = save(tmp_path / family, model)
    exported = export(str(model_dir), tmp_path / "onnx")
    assert exported.report["fp32_max_abs_diff"] <= 1e-4 and exported.report["head"] == "ForTokenClassification"
    agrees(exported, model_dir, "token", cls)
    written = sorted(p.name for p in exported.path.iterdir())
    assert {"model.onnx", "model.int8.onnx", "config.json", "export.json", "tokenizer.json"} <= set(written)
    assert json.loads((exported.path / "config.json").read_text())["id2label"]["4"] == "LABEL_4"
    assert not list(tmp_path.glob(".onnx.*"))  # no temporary directory left beside it


@pytest.mark.parametrize("head", ["sequence", "qa"])
def test_sequence_and_qa_heads_export(head, tmp_path, capsys):
    config = BertConfig(**SMALL, num_labels=3 if head == "sequence" else 2)  # QA: start and end
    model_dir = save(tmp_path / "m", HEADS[head].from_config(config))
    assert cli.main(["--model", str(model_dir), "--out", str(tmp_path / "onnx")]) == 0
    printed = capsys.readouterr().out
    assert "fp32 within" in printed and "int8 (QInt8 per channel weights" in printed
    report = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert report["outputs"] == (["logits"] if head == "sequence" else ["start_logits", "end_logits"])
    assert report["fused"].get("attention") == 2  # ORT's packed attention, one per layer
    assert report["bytes"]["onnx_int8"] < 0.5 * report["bytes"]["onnx_fp32"]
    from biodistill.engine.deploy.export import Exported

    agrees(Exported(tmp_path / "onnx", report), model_dir, head, HEADS[head])


def test_bad_exports_are_named(tmp_path, capsys):
    from transformers import BertModel

    bare = save(tmp_path / "encoder", BertModel(BertConfig(**SMALL)))  # no head
    with pytest.raises(ConfigError) as e:
        export(str(bare), tmp_path / "out")
    assert (e.value.source, e.value.key) == (str(bare), "model")
    assert e.value.message.startswith("no task head to export (its config's architectures are ['BertModel'])")
    # the fp32 check against PyTorch, at a tolerance no graph can meet (a tiny graph may match PyTorch exactly, so
    # not 0): the export fails naming the worst logit, after the graph was written, and leaves nothing behind
    # (the command line refuses such a tolerance before any work: tests/test_bad_inputs.py; the function takes it)
    model_dir = save(tmp_path / "m", AutoModelForTokenClassification.from_config(BertConfig(**SMALL, num_labels=2)))
    with pytest.raises(ConfigError) as e:
        export(str(model_dir), tmp_path / "out", int8=False, atol=-1.0, key="--model")
    assert str(e.value).startswith(f"{model_dir}: --model: ONNX Runtime's fp32 logits differ from PyTorch's by")
    assert "(> -1) at logits[" in str(e.value) and "PyTorch" in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))  # whole or not at all


def test_deploy_benchmark_harness_measures_every_runtime(tmp_path, capsys):
    """make bench-deploy's plumbing at a tiny size: every runtime timed, ratios and sizes printed."""
    from biodistill.engine.bench import deploy as bench

    model_dir = save(tmp_path / "encoder", AutoModelForTokenClassification.from_config(BertConfig(**SMALL)))
    assert bench.main(["--model", str(model_dir), "--length", "16", "--batch", "2", "--seconds", "0",
                       "--json", str(tmp_path / "b.json")]) == 0  # fmt: skip
    (row,) = json.loads((tmp_path / "b.json").read_text())
    assert set(row["bs2"]) == {"PyTorch fp32", "onnx fp32 (plain)", "onnx int8 (plain)", "ORT fp32 (ours, fused)", "ORT int8 (ours)"}  # fmt: skip
    assert all(v > 0 for v in row["bs2"].values()) and row["sizes"]["ORT int8 (ours)"] < row["sizes"]["pytorch"]
    assert "ORT int8 (ours)" in capsys.readouterr().out


def test_export_replaces_only_a_previous_export(tmp_path, capsys):
    """--out may name a new directory or a previous export (it holds export.json), which is replaced whole. The
    model's own folder, a folder above it, or a file is refused at once, and every file the user had stays, byte
    for byte (issue 39: the fine-tuned model.safetensors was deleted)."""
    from conftest import files_under

    project = tmp_path / "project"
    model_dir = save(project / "models" / "tokcls", AutoModelForTokenClassification.from_config(BertConfig(**SMALL)))
    (project / "results.csv").write_text("model,f1\ntokcls,0.81\n")
    (tmp_path / "notes.txt").write_text("do not lose me")
    mine = files_under(tmp_path)
    for out, said in (
        (model_dir, f"{model_dir} is what this command reads: refusing to replace it; write the biodistill-export output elsewhere"),
        (project, f"{project} holds {model_dir}, what this command reads: refusing to replace it; write the biodistill-export output elsewhere"),
        (tmp_path / "notes.txt", f"{tmp_path / 'notes.txt'} is a file, not a previous biodistill-export output: refusing to replace it; choose another path"),
    ):  # fmt: skip
        assert cli.main(["--model", str(model_dir), "--out", str(out), "--no-int8"]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"biodistill-export: error: --out: {said}"
        assert files_under(tmp_path) == mine
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    assert cli.main(["--model", str(model_dir), "--out", str(tmp_path / "other"), "--no-int8"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            f"{tmp_path / 'other'} exists and is not a previous biodistill-export output (it has no export.json): "
            "refusing to replace it; choose a new path, or move it away yourself"
        )
    )
    # A previous export is what may be replaced: the second export takes its place whole.
    out = tmp_path / "onnx"
    assert cli.main(["--model", str(model_dir), "--out", str(out), "--no-int8"]) == 0
    (out / "stale.txt").write_text("from the first export")
    assert cli.main(["--model", str(model_dir), "--out", str(out), "--no-int8"]) == 0
    assert (out / "export.json").is_file() and not (out / "stale.txt").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary or old folder left
    assert files_under(project) == {k.removeprefix("project/"): v for k, v in mine.items() if k.startswith("project/")}


def test_export_refuses_a_head_its_weights_do_not_fit_and_a_bad_tolerance(tmp_path, capsys):
    """A directory whose config says token classification but whose weights are a sequence classifier (pooler and
    classifier): exporting it as a per-token model would pass the check against the same wrong model; refused,
    naming the weights. A tolerance that is not a finite positive number is refused before any work."""
    model_dir = save(tmp_path / "m", AutoModelForSequenceClassification.from_config(BertConfig(**SMALL, num_labels=4)))
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "architectures": ["BertForTokenClassification"]}))
    assert cli.main(["--model", str(model_dir), "--out", str(tmp_path / "onnx")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"biodistill-export: error: {model_dir}: --model: its weights do not fit its config's BertForTokenClassification "
        "(unexpected keys: bert.pooler.dense.bias, bert.pooler.dense.weight): the saved head is not the one the config "
        "names; fix config.json's architectures or re-save the model"
    )
    for atol in ("-1", "nan", "0"):
        with pytest.raises(SystemExit) as e:
            cli.main(["--model", str(model_dir), "--out", str(tmp_path / "onnx"), "--atol", atol])
        assert e.value.code == 2
        assert f"error: argument --atol: must be a finite number > 0, got '{atol}'" in capsys.readouterr().err
    assert not (tmp_path / "onnx").exists()
