"""rollout.backend=hf under FSDP2 (2 gloo ranks): the actor is gathered once per generate call, not once
per layer per decode step, and generates exactly what the unsharded model generates."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.slow
def test_hf_generate_gathers_each_fsdp_unit_once(tmp_path):
    from tests.engine.conftest import _run_torchrun

    out = tmp_path / "result.json"
    _run_torchrun(HERE / "hf_gather_worker.py", str(out))
    results = json.loads(out.read_text())
    assert len(results) == 2
    for r in results:
        assert r["units"] == 3  # two decoder blocks and the root
        assert r["gathers_generate"] == r["units"]  # once each for 6 steps (per step: >= 6 x 2 blocks)
        assert r["rows"] == 6 and r["tokens_equal"] and r["logprob_diff"] < 1e-5
        assert r["resharded"]
        # after generate everything is resharded; then training forwards behave as before: the root is
        # gathered once and stays so (FSDP2's root default), each block is gathered again per forward
        assert r["gathers_two_forwards"] == 1 + 2 * 2
