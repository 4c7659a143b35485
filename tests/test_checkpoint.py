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
