"""Recipe loading: overrides are typed; bad input is refused naming file and key (the shipped recipes
are checked in test_recipes.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import recipe_dict, write_recipe

from biodistill.engine.config import ConfigError, load_recipe, parse_overrides
from biodistill.engine.losses import validate_terms
from biodistill.engine.runtime.distributed import deepspeed_config


@pytest.fixture
def recipe_file(tmp_path, tiny_teacher, tiny_corpus):
    return write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_teacher, tiny_corpus, tmp_path, [{"kind": "mlm"}]))


def test_overrides_are_typed_and_applied(recipe_file):
    r = load_recipe(
        recipe_file,
        ["--train.max_steps", "50", "--optim.lr=5e-4", "--data.packing", "false", "--student.teacher_layers", "[1, 3]"],
    )
    assert (r.train.max_steps, r.optim.lr, r.data.packing, r.student.teacher_layers) == (50, 5e-4, False, [1, 3])


def test_negative_number_override_is_a_value():
    assert parse_overrides(["--optim.weight_decay", "-1"]) == [("optim.weight_decay", -1)]


@pytest.mark.parametrize(
    "overrides, key, fragment",
    [
        (["--train.max_step", "3"], "train.max_step", "did you mean 'max_steps'"),
        (["--train.max_steps", "ten"], "train.max_steps", "expected an integer"),
        (["--train.max_steps", "0"], "train.max_steps", "must be >= 1"),
        (["--train.precision", "fp8"], "train.precision", "must be one of"),
        (["--data.mlm_probability", "1.5"], "data.mlm_probability", "must be in (0, 1)"),
        (["--deepspeed.zero_stage", "4"], "deepspeed.zero_stage", "must be 0, 1, 2 or 3"),
        (["--optim.betas", "[0.9]"], "optim.betas", "two values"),
        (["--losses.temperature", "0"], "losses.temperature", "must be > 0"),
        (["--student.teacher_layers", "[]"], "student.teacher_layers", "list the teacher layers"),
        (["--data.train_files", "[/nonexistent/x.jsonl]"], "data.train_files[0]", "file not found"),
        (["--data.train_files", "[/nonexistent/*.jsonl]"], "data.train_files[0]", "no file matches"),
        (["--train.global_batch_size", "16", "--train.grad_accum", "2"], "train.global_batch_size", "not both"),
        (["--train.max_steps"], "train.max_steps", "missing value"),
        (["--teacher.placement", "sharded"], "teacher.placement", "must be one of 'replicated', 'partitioned'"),
        (["--teacher.placement", "offload"], "teacher.placement", "'offload' places a teacher that no loss term uses"),
    ],
)
def test_bad_overrides_name_the_flag_and_key(recipe_file, overrides, key, fragment):
    with pytest.raises(ConfigError) as e:
        load_checked(recipe_file, overrides)
    assert e.value.key == key and fragment in str(e.value)
    assert "command line" in e.value.source


def load_checked(path, overrides=()):
    """The recipe as biodistill-train's start-up sees it: loaded (types and values by section), then its loss terms
    checked by their own classes."""
    recipe = load_recipe(path, list(overrides))
    validate_terms(recipe)
    return recipe


@pytest.mark.parametrize(
    "edit, key, fragment",
    [
        (lambda r: r["train"].update(micro_batch_size="8"), "train.micro_batch_size", "expected an integer"),
        (lambda r: r.update(trian={}), "trian", "did you mean 'train'"),
        (lambda r: r["losses"]["terms"].append({"kind": "cosine"}), "losses.terms[1].kind", "unknown loss 'cosine'"),
        (
            lambda r: r["losses"]["terms"].append({"kind": "hidden_cosine", "layer_map": "every"}),
            "losses.terms[1].layer_map",
            "must be 'last', 'uniform'",
        ),
        (
            lambda r: r["losses"]["terms"].append({"kind": "hidden_cosine", "layer_map": [[1, 2, 3]]}),
            "losses.terms[1].layer_map[0]",
            "pair",
        ),
        (lambda r: r["losses"]["terms"][0].update(colour="red"), "losses.terms[0].colour", "unknown key"),
        (lambda r: r["student"].update(mlm_head=False), "student.mlm_head", "need the MLM head"),
        (lambda r: r["optim"].update(warmup_steps=8), "optim.warmup_steps", "must be in [0, train.max_steps)"),
        (lambda r: r["data"].update(dataset="pubmed"), "data.train_files", "either data.train_files or data.dataset"),
        (lambda r: r["student"].update(init="checkpoint"), "student.path", "needs the checkpoint"),
    ],
)
def test_bad_recipes_name_the_file_and_key(tmp_path, tiny_teacher, tiny_corpus, edit, key, fragment):
    recipe = recipe_dict(tiny_teacher, tiny_corpus, tmp_path, [{"kind": "mlm"}])
    edit(recipe)
    path = write_recipe(tmp_path / "bad.yaml", recipe)
    with pytest.raises(ConfigError) as e:
        load_checked(path)
    assert e.value.key == key and fragment in str(e.value), str(e.value)
    assert str(e.value).startswith(str(path))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_recipe(tmp_path / "list.yaml")


def test_user_deepspeed_json_is_honoured_and_checked(recipe_file, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": 4,
                "zero_optimization": {"stage": 3},
                "bf16": {"enabled": True},
                "gradient_clipping": "auto",
            }
        )
    )
    recipe = load_recipe(recipe_file, deepspeed_config=str(ds))
    cfg = deepspeed_config(recipe, world=2)
    assert cfg["train_micro_batch_size_per_gpu"] == recipe.train.micro_batch_size  # "auto" filled from the recipe
    assert cfg["gradient_accumulation_steps"] == 4 and cfg["zero_optimization"] == {"stage": 3}
    assert cfg["bf16"] == {"enabled": True} and "tensorboard" not in cfg  # nothing of ours is added

    ds.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON") as e:
        load_recipe(recipe_file, deepspeed_config=str(ds))
    assert str(ds) in str(e.value)
    with pytest.raises(ConfigError, match="DeepSpeed config not found") as e:
        load_recipe(recipe_file, deepspeed_config=str(tmp_path / "missing.json"))
    assert "--deepspeed_config" in str(e.value)
    ds.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": "auto", "foo": "auto"}}}))
    with pytest.raises(ConfigError, match="'auto' is only understood"):
        deepspeed_config(load_recipe(recipe_file, deepspeed_config=str(ds)), world=1)


def test_generated_deepspeed_config(recipe_file):
    recipe = load_recipe(
        recipe_file, ["--train.precision", "bf16", "--deepspeed.zero_stage", "3", "--train.grad_accum", "2"]
    )
    cfg = deepspeed_config(recipe, world=4)
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["gradient_clipping"] == recipe.train.grad_clip
    assert Path(cfg["csv_monitor"]["output_path"]).parent == Path(recipe.train.output_dir)


def test_global_batch_size_fixes_accumulation_for_any_world_size(recipe_file, tmp_path, tiny_corpus):
    recipe = load_recipe(recipe_file, ["--train.global_batch_size", "48", "--train.micro_batch_size", "4"])
    for world, accum in [(1, 12), (2, 6), (4, 3), (12, 1)]:
        cfg = deepspeed_config(recipe, world)
        assert cfg["gradient_accumulation_steps"] == accum
        assert cfg["train_micro_batch_size_per_gpu"] * accum * world == 48
    with pytest.raises(ConfigError, match="48 is not a multiple of train.micro_batch_size x world size = 4 x 5") as e:
        deepspeed_config(recipe, 5)
    assert e.value.key == "train.global_batch_size"


def test_train_files_globs_expand_in_sorted_order(recipe_file, tmp_path, tiny_corpus):
    from biodistill.engine.config import data_files

    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("b.jsonl", "a.jsonl", "c.txt"):
        (shards / name).write_text(tiny_corpus.read_text())
    recipe = load_recipe(recipe_file, ["--data.train_files", f"[{shards}/*.jsonl, {tiny_corpus}]"])
    found = data_files(recipe.data, recipe.source)
    assert [p.name for _, p in found] == ["a.jsonl", "b.jsonl", tiny_corpus.name]
    assert found[0][0] == "data.train_files[0] (a.jsonl)" and found[2][0] == "data.train_files[1]"


def test_auto_precision_fits_the_device(recipe_file):
    """train.precision and teacher.dtype "auto": bf16 where the GPU has it, fp16 where it does not, fp32 on CPU;
    the teacher follows a half-precision student; explicit choices are kept."""
    from biodistill.engine.config import resolve_precision

    def resolved(overrides, device, bf16):
        r = resolve_precision(load_recipe(recipe_file, overrides), device, bf16)
        return r.train.precision, r.teacher.dtype

    assert load_recipe(recipe_file).train.precision == "auto"  # the default
    assert resolved([], "cpu", False) == ("fp32", "fp32")
    assert resolved([], "cuda", True) == ("bf16", "bf16")  # A100, H100, H200
    assert resolved([], "cuda", False) == ("fp16", "fp16")  # V100, T4
    assert resolved(["--train.precision", "fp32"], "cuda", True) == ("fp32", "bf16")  # a frozen teacher still halves
    assert resolved(["--train.precision", "fp32"], "cuda", False) == ("fp32", "fp16")
    assert resolved(["--train.precision", "bf16"], "cpu", False) == ("bf16", "fp32")  # CPUs: no fast half matmul
    assert resolved(["--teacher.dtype", "fp16"], "cuda", True) == ("bf16", "fp16")  # explicit: kept
    assert resolved(["--train.precision", "fp16", "--teacher.dtype", "fp32"], "cuda", True) == ("fp16", "fp32")
    # The resolved precision is what DeepSpeed is configured with.
    r = resolve_precision(load_recipe(recipe_file), "cuda", True)
    cfg = deepspeed_config(r, world=1)
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]


def test_smoke_models_go_under_the_output_dir_a_flag_gives(tmp_path, tiny_teacher, tiny_corpus):
    """--smoke with --train.output_dir: the random smoke models are written under the flag's directory, not the
    recipe file's (which nothing creates); the flag has the last word over what --smoke changes."""
    from biodistill.engine.models.smoke import smoke

    raw = recipe_dict(tiny_teacher, tiny_corpus, tmp_path, [{"kind": "mlm"}], train={"output_dir": str(tmp_path / "file-out")})  # fmt: skip
    path = write_recipe(tmp_path / "r.yaml", raw)
    recipe = load_recipe(path, ["--train.output_dir", str(tmp_path / "flag-out")], transform=smoke)
    assert recipe.train.output_dir == str(tmp_path / "flag-out")
    assert Path(recipe.teacher.path).parent == tmp_path / "flag-out-smoke" / "models"
    assert not (tmp_path / "file-out").exists() and not (tmp_path / "file-out-smoke").exists()
