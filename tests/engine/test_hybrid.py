"""The hybrid engine end to end under torchrun (2 gloo ranks): FSDP2 actor + one vLLM engine per rank.

Worker: ``vllm_worker.py``. One torchrun start for the module (~30-60 s on 2 shared cores).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("vllm")

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def result(tmp_path_factory, run_torchrun):
    out = tmp_path_factory.mktemp("hybrid") / "result.json"
    run_torchrun(HERE / "vllm_worker.py", str(out), timeout=600)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def result_tp(tmp_path_factory, run_torchrun):
    out = tmp_path_factory.mktemp("hybrid_tp") / "result.json"
    run_torchrun(HERE / "vllm_worker.py", str(out), "2", timeout=600)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_one_engine_per_rank_inside_the_torch_world(result):
    assert result["world"] == 2  # vLLM did not replace the trainer's process group
    assert result["backend"] == "external_launcher"


@pytest.mark.slow
def test_first_sync_fills_dummy_engine_from_sharded_actor(result):
    assert result["first_equal"]
    assert result["first_sync"]["calls"] > 1  # 50 KB buckets: several calls, whole layers each


@pytest.mark.slow
def test_second_sync_after_training_uses_new_weights_on_every_rank(result):
    assert result["all_ranks"] == [1.0, 1.0, 1.0]
    assert result["second_sync"]["calls"] == result["first_sync"]["calls"]


@pytest.mark.slow
def test_phase_hooks_sleep_and_wake_the_engine(result):
    # offload (nothing on CPU), empty PyTorch's cache (a no-op on CPU), then wake; sleep at the engine's level
    assert result["events"][-8:] == ["empty_cache", "wake", "sleep", "sleep", "empty_cache", "wake_weights",
                                     "empty_cache", "wake"]


@pytest.mark.slow
def test_tensor_parallel_engine_over_both_ranks(result_tp):
    """tensor_parallel_size=2: one engine sharded over the 2 ranks; each rank still submits its own
    (uneven) prompt shard and gets its own results, before and after a sync of new weights."""
    assert result_tp["all_ranks"] == [1.0, 1.0, 1.0]
