"""Real 2-rank DeepSpeed jobs on CPU (gloo): each loss family trains, resume is exact, export reloads.

Launches cost ~40 s each on 2 cores, so each job is checked for several things at once.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import csv_metric, files_under, launch, make_bert, recipe_dict, summary, write_recipe
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForMaskedLM

pytestmark = pytest.mark.multirank

LOGIT_TERMS = [{"kind": "mlm", "weight": 2.0}, {"kind": "logit_kl", "weight": 5.0}]


def falls(losses: dict[int, float]) -> bool:
    values = [losses[k] for k in sorted(losses)]
    return sum(values[-3:]) / 3 < sum(values[:3]) / 3


@pytest.fixture(scope="module")
def logit_run(tmp_path_factory, tiny_teacher, tiny_corpus):
    """MLM + logit KL, student from teacher layers, ZeRO-2, checkpoints at steps 4 and 8."""
    tmp = tmp_path_factory.mktemp("logit")
    recipe = write_recipe(
        tmp / "r.yaml", recipe_dict(tiny_teacher, tiny_corpus, tmp, LOGIT_TERMS, train={"save_every": 4})
    )
    proc = launch(recipe)
    assert proc.returncode == 0
    return tmp, recipe, proc


def test_logit_family_trains_and_exports(logit_run):
    tmp, _, proc = logit_run
    run = tmp / "run"
    losses = csv_metric(run, "train_loss")
    assert sorted(losses) == list(range(1, 9)) and falls(losses)
    for name in ("train_mlm", "train_logit_kl"):  # every term logged on its own
        assert len(csv_metric(run, name)) == 8
    s = summary(run)
    assert s["job"] == {
        "world_size": 2,
        "micro_batch_size": 4,
        "grad_accum": 1,
        "zero_stage": 2,
        "dtype": "float32",
        "teacher_placement": "replicated",
    }
    # The student starts as a copy of the (random) teacher, so KL starts near 0 and the MLM term leads.
    assert s["after"]["student/mlm_loss"] < s["before"]["student/mlm_loss"]
    assert 0 <= s["after"]["agreement/top1"] <= 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["step4", "step8"]
    assert list((run / "monitor" / "tensorboard").rglob("events.out.tfevents.*"))
    assert "student exported" in proc.stdout + proc.stderr
    assert proc.leaked_shm == []  # DeepSpeed's CPU all-reduce buffers released from /dev/shm
    # Its model card: Hugging Face's metadata and the distillation as it ran, read back by huggingface_hub.
    from huggingface_hub import ModelCard

    card = ModelCard.load(run / "student" / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "fill-mask"
    assert "biodistill" in card.data.tags and "knowledge-distillation" in card.data.tags
    assert (
        "| `logit_kl` | 5 | last | 2.0 |" in card.text and "8 optimiser steps of 8 sequences of 64 tokens" in card.text
    )
    assert "| agreement/top1 |" in card.text and "## How to use" in card.text
    # The export reloads with plain transformers and computes exactly what DeepSpeed's checkpoint holds.
    exported = AutoModelForMaskedLM.from_pretrained(run / "student").eval()
    ckpt = torch.load(run / "checkpoints" / "step8" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    for key, value in exported.state_dict().items():
        assert torch.equal(value, ckpt[f"student.{key}"]), key


def test_resume_continues_exactly(logit_run):
    """Stop after step 4 (the step4 checkpoint), resume: steps 5..8 match the uninterrupted run."""
    tmp, recipe, _ = logit_run
    resumed = tmp / "resumed"
    shutil.copytree(tmp / "run" / "checkpoints", resumed / "checkpoints")
    proc = launch(recipe, "--resume", "step4", "--train.output_dir", str(resumed), "--train.export", "false")
    assert proc.returncode == 0 and "resumed from" in proc.stdout + proc.stderr
    full, after = csv_metric(tmp / "run", "train_loss"), csv_metric(resumed, "train_loss")
    assert sorted(after) == [5, 6, 7, 8]
    for step in after:
        assert after[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), step


def test_damaged_or_foreign_checkpoints_are_refused_at_start(logit_run, tiny_teacher, capsys):
    """A checkpoint records what it was made from and what its files were: a resume under another student, over
    other data, or from a file cut short is refused before any process group, naming the key or the file (and the
    newest whole checkpoint), and leaves every file as it was."""
    from biodistill.engine import cli

    tmp, recipe, _ = logit_run
    run = tmp / "refused"
    shutil.copytree(tmp / "run" / "checkpoints", run / "checkpoints")

    def refused(*argv: str) -> str:
        before = files_under(run)
        assert cli.main(["--config", str(recipe), "--train.output_dir", str(run), "--resume", *argv]) == 2
        assert files_under(run) == before
        return capsys.readouterr().err.strip().splitlines()[-1].removeprefix("biodistill: error: --resume: ")

    step8 = run / "checkpoints" / "step8"
    assert refused("--student.teacher_layers", "[0, 3]") == (
        f"student.teacher_layers: {step8} was made under another recipe: student.teacher_layers ([0, 2] -> [0, 3]). "
        "These change the model the checkpoint holds, so the checkpoint cannot continue under them: resume with the "
        "recipe it was made with, or train afresh in another train.output_dir (its student can start one: "
        "student.init checkpoint)"
    )
    other = make_bert(tmp / "other-teacher", seed=5)  # another teacher of the same shape
    assert refused("--data.max_length", "32", "--teacher.path", str(other)) == (
        f"data.max_length: {step8} was made under another recipe: data.max_length (64 -> 32), teacher.path "
        f"({str(tiny_teacher)!r} -> {str(other)!r}). These change the model the checkpoint holds and which "
        "sequences its read position counts, so the checkpoint cannot continue under them: resume with the recipe it "
        "was made with, or train afresh in another train.output_dir (its student can start one: student.init "
        "checkpoint)"
    )
    states = step8 / "mp_rank_00_model_states.pt"
    size = states.stat().st_size
    os.truncate(states, size // 2)
    assert refused() == (
        f"checkpoint {step8} is damaged: {states} is {size // 2:,} bytes, {size:,} when it was saved (cut short or "
        f"overwritten); the newest whole checkpoint before it is step4: --resume step4"
    )


def test_longer_schedule_resumes_at_its_rate_and_nonfinite_weights_are_never_saved(logit_run):
    """Resumed with a longer train.max_steps, the first new step runs at the new schedule's rate (the checkpoint
    holds the old one's last, 0), and the change is said. Weights made NaN at step 10 (the train.weights failpoint:
    what a diverged update leaves) are neither checkpointed nor exported: `latest` stays at step 9, the student
    export from before is untouched, and the error says why."""
    tmp, recipe, _ = logit_run
    run = tmp / "longer"
    shutil.copytree(tmp / "run", run)  # checkpoints step4 and step8, and the good student export
    exported = files_under(run / "student")
    flags = ["--resume", "--train.output_dir", str(run), "--train.max_steps", "10", "--train.save_every", "1"]
    proc = launch(recipe, *flags, env={"BIODISTILL_FAILPOINTS": "train.weights@10=nan"})
    said = proc.stdout + proc.stderr
    assert (
        proc.returncode not in (0, 2)
        and f"--resume: train.max_steps was 8 in {run / 'checkpoints' / 'step8'}, is 10 now" in said
    )
    assert (
        "step 10: the student's weights are not finite (student.bert.embeddings.word_embeddings.weight): the "
        f"checkpoint {run / 'checkpoints' / 'step10'} was not written; the latest complete checkpoint is still "
        f"{run / 'checkpoints' / 'step9'}. A learning rate too large for this model (optim.lr) is the usual cause"
    ) in said
    assert (run / "checkpoints" / "latest").read_text() == "step9" and not (run / "checkpoints" / "step10").exists()
    assert files_under(run / "student") == exported
    weights = {
        tag: torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        for tag in ("step8", "step9")
    }
    moved = [k for k, v in weights["step8"].items() if not torch.equal(v, weights["step9"][k])]
    assert "student.bert.encoder.layer.0.attention.self.query.weight" in moved  # step 9 ran at a rate above 0


def test_hidden_family_zero3_projection_and_module_form(tmp_path, tiny_teacher, tiny_corpus):
    """A narrower random-init student, hidden MSE through a learned projection, ZeRO-3, --module launch."""
    terms = [{"kind": "hidden_mse", "layer_map": [[0, 0], [1, 2], [2, 4]], "projection": True}, {"kind": "mlm"}]
    student = {"init": "config", "overrides": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}}
    raw = recipe_dict(
        tiny_teacher,
        tiny_corpus,
        tmp_path,
        terms,
        student=student,
        deepspeed={"zero_stage": 3},
        train={"max_steps": 10},
    )
    proc = launch(write_recipe(tmp_path / "r.yaml", raw), module=True)
    assert proc.returncode == 0
    run = tmp_path / "run"
    assert falls(csv_metric(run, "train_hidden_mse")) and summary(run)["job"]["zero_stage"] == 3
    weights = load_file(run / "student" / "model.safetensors")
    assert not any("projection" in k for k in weights)  # the projection trained, then dropped at export
    # Against DeepSpeed's own consolidation of the ZeRO-3 partitions:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"))
    assert any(k.startswith("terms.0.projection") for k in consolidated)
    exported = AutoModelForMaskedLM.from_pretrained(run / "student").eval()
    assert exported.config.hidden_size == 32
    reference = AutoModelForMaskedLM.from_config(exported.config).eval()
    reference.load_state_dict(
        {k.removeprefix("student."): v for k, v in consolidated.items() if k.startswith("student.")}, strict=False
    )
    reference.tie_weights()
    ids = torch.randint(1000, 5000, (2, 16))
    torch.testing.assert_close(exported(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_attention_family_with_user_deepspeed_json(tmp_path, tiny_corpus):
    """Attention KL/MSE + hidden cosine under the user's JSON: ZeRO-1, bf16, accumulation 2, "auto" batch."""
    teacher = make_bert(tmp_path / "teacher", mlm_head=False, seed=3)  # a headless teacher, like MiniLM
    ds = tmp_path / "ds.json"
    ds.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": 2,
                "zero_optimization": {"stage": 1},
                "bf16": {"enabled": True},
                "gradient_clipping": 1.0,
                "csv_monitor": {"enabled": True, "output_path": str(tmp_path / "run" / "monitor"), "job_name": "csv"},
            }
        )
    )
    terms = [
        {"kind": "attention_kl", "layer_map": "uniform"},
        {"kind": "attention_mse", "layer_map": [[2, 4]]},
        {"kind": "hidden_cosine", "layer_map": "uniform"},
    ]
    raw = recipe_dict(teacher, tiny_corpus, tmp_path, terms, student={"mlm_head": False}, train={"max_steps": 8})
    proc = launch(write_recipe(tmp_path / "r.yaml", raw), "--deepspeed_config", str(ds))
    assert proc.returncode == 0
    run = tmp_path / "run"
    s = summary(run)
    assert s["job"] == {
        "world_size": 2, "micro_batch_size": 4, "grad_accum": 2, "zero_stage": 1, "dtype": "bfloat16",
        "teacher_placement": "replicated",
    }  # fmt: skip
    assert falls(csv_metric(run, "train_loss")) and falls(csv_metric(run, "train_hidden_cosine"))
    assert len(csv_metric(run, "train_attention_kl")) == len(csv_metric(run, "train_attention_mse")) == 8
    assert not (run / "monitor" / "tensorboard").exists()  # the user's JSON enabled only CSV
    assert AutoModel.from_pretrained(run / "student").config.num_hidden_layers == 2
