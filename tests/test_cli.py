"""The entry point as users run it: bad configs and missing paths fail fast with a clear message."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, recipe_dict, write_recipe


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


def test_bad_config_fails_fast_naming_file_and_key(tmp_path, tiny_teacher, tiny_corpus):
    raw = recipe_dict(tiny_teacher, tiny_corpus, tmp_path, [{"kind": "mlm"}])
    raw["train"]["max_steps"] = "lots"
    recipe = write_recipe(tmp_path / "bad.yaml", raw)
    proc = run_cli("--config", str(recipe))
    assert proc.returncode == 2
    assert f"biodistill: error: {recipe}: train.max_steps: expected an integer, got 'lots'" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was started


def test_missing_teacher_fails_before_training(tmp_path, tiny_corpus):
    raw = recipe_dict(tmp_path / "no-such-teacher", tiny_corpus, tmp_path, [{"kind": "logit_kl"}])
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    proc = run_cli("--config", str(recipe))
    assert proc.returncode == 2
    assert f"teacher.path: {tmp_path}/no-such-teacher: not found (a Hugging Face model directory" in proc.stderr


def test_help_lists_the_flags():
    proc = run_cli("--help")
    assert proc.returncode == 0 and "--resume" in proc.stdout and "--deepspeed_config" in proc.stdout
