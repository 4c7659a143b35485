"""Which checkpoint a resume picks, and what it refuses, before any engine is built."""

from __future__ import annotations

import json

import pytest

from biodistill.engine.runtime.checkpoint import META, find, needs_universal, write_atomic


def tag(root, name, world=4, optim=True, meta=True):
    (root / name).mkdir(parents=True)
    if optim:
        (root / name / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    if meta:
        (root / name / META).write_text(json.dumps({"step": int(name[4:]), "world_size": world}))


def test_find_follows_latest_and_refuses_incomplete_or_missing_tags(tmp_path):
    assert find(str(tmp_path)) is None  # nothing saved yet: a fresh start
    tag(tmp_path, "step4")
    tag(tmp_path, "step8", meta=False)  # killed mid-save: `latest` was never moved to it
    write_atomic(tmp_path / "latest", "step4")
    assert find(str(tmp_path)) == ("step4", {"step": 4, "world_size": 4})
    assert not list(tmp_path.glob(".latest.tmp*"))
    with pytest.raises(
        FileNotFoundError, match=r"step8 is incomplete \(no biodistill.json\): its save was interrupted"
    ):
        find(str(tmp_path), "step8")
    with pytest.raises(FileNotFoundError, match="checkpoint 'step12' not found in"):
        find(str(tmp_path), "step12")


def test_only_partitioned_optimizer_states_on_another_world_size_need_conversion(tmp_path):
    tag(tmp_path, "step4")
    tag(tmp_path, "step8", optim=False)  # ZeRO-0 fp32: the whole optimizer state sits in the model file
    job = {"world_size": 4}
    assert needs_universal(str(tmp_path), "step4", job, 2)
    assert not needs_universal(str(tmp_path), "step4", job, 4)
    assert not needs_universal(str(tmp_path), "step8", job, 2)


def test_zero3_partition_padding_is_not_read_as_weights(monkeypatch):
    """ZeRO-3 pads the last rank's partition to the others' size and never writes the padding: its memory can hold
    NaN. The non-finite check reads only the elements a rank owns (a CI run refused a save over such padding)."""
    import torch

    from biodistill.engine.runtime import checkpoint

    module = torch.nn.Linear(1, 1, bias=False)
    weight = module.weight
    weight.ds_numel = 5  # a 5-element parameter over 2 ranks: partitions of 3, rank 1 owns elements 3 and 4
    weight.ds_tensor = torch.tensor([1.0, 2.0, float("nan")])
    weight.ds_tensor.ds_numel = 3
    monkeypatch.setattr(checkpoint.dist, "get_rank", lambda group=None: 1)
    assert checkpoint._owned(weight).tolist() == [1.0, 2.0]
    assert checkpoint.nonfinite_parameters(module) == []
    weight.ds_tensor[1] = float("inf")
    assert checkpoint.nonfinite_parameters(module) == ["weight"]
