"""Scale path on 2 gloo ranks (``scale_worker.py``): loading from rank 0 onto meta-built shards, frozen
models in bf16 with fp32 heads, DCP checkpoints that restore exactly, the streamed HF export."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def result(tmp_path_factory, run_torchrun):
    out = tmp_path_factory.mktemp("scale")
    run_torchrun(HERE / "scale_worker.py", str(out))
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
def test_rank0_load_reaches_every_shard(result):
    assert result["fsdp"] and result["same_keys"]
    assert result["load_diff"] == 0.0  # bit-exact: broadcast, not recomputed
    assert result["inv_freq_ok"]  # non-persistent buffers (garbage after to_empty) come from rank 0


@pytest.mark.slow
def test_frozen_model_in_bf16_with_fp32_head(result):
    assert result["rm_body_bf16"] and result["rm_head_fp32"]
    assert result["rm_stats"] == [0.5, 2.0]
    assert result["rm_score_diff"] < 1e-2  # bf16 compute on both sides; reduction order differs


@pytest.mark.slow
def test_dcp_checkpoint_one_shard_per_rank_and_exact_restore(result):
    files = result["files"]
    assert [f for f in files if f.endswith(".distcp")] == ["__0_0.distcp", "__1_0.distcp"]
    assert ".metadata" in files and "trainer_state.json" in files
    assert "rng-rank0.json" in files and "rng-rank1.json" in files
    assert not [f for f in files if f.endswith((".pt", ".pkl", ".bin"))]
    assert result["resume_equal"]
    assert result["state"] == {"world_size": 2, "step": 2, "note": "x"}


@pytest.mark.slow
def test_streamed_hf_export_loads_with_from_pretrained(result):
    assert result["wrote"]
    assert result["export_files"] > 1  # several buckets: never the whole model at once
    assert result["export_diff"] == 0.0


@pytest.mark.slow
def test_adamw_foreach_on_shards_and_whitening_over_the_group(result):
    assert result["foreach_on_shards"]  # DTensor shards: the multi-tensor AdamW
    assert result["whiten_diff"] < 1e-6
