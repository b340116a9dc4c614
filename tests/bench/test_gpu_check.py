"""bench/gpu_check.sh: the one-call GPU check starts on a CPU machine in its dry mode (collects every case,
imports every module), and its stage runner enforces the time budget."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dry_run_collects_every_stage(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check-dry-run" / "summary.json").read_text())
    assert summary["dry_run"] and list(summary["stages"]) == ["kernels", "headline", "phases", "probe", "rest"]
    assert all(s["rc"] == 0 for s in summary["stages"].values()), summary
    ids = gpu_check.headline_ids()
    assert summary["stages"]["headline"]["summary"].startswith(f"{len(ids)} tests collected")
    kernels = summary["stages"]["kernels"]["summary"]
    assert int(kernels.split("/")[0]) >= 15, kernels  # the GPU kernel tests, incl. the round-2 ones
    probe_log = (tmp_path / "gpu_check-dry-run" / "probe.log").read_text()
    assert probe_log.count("probe case:") == len(__import__("bench.probe_rows").probe_rows.cases())


def test_headline_lists_ours_old_and_new_with_eager_and_liger():
    ids = gpu_check.headline_ids()
    assert len(ids) == len(set(ids)) >= 20
    for op in ("token_logprobs", "linear_token_logprobs", "fused_ppo_loss[", "fused_ppo_loss_from_logits", "gae"):
        assert any(op in i and "-fastrlhf-" in i for i in ids), op
    for op in ("token_logprobs", "linear_token_logprobs", "fused_ppo_loss[", "fused_ppo_loss_from_logits"):
        assert any(op in i and "-fastrlhf_r1-" in i for i in ids), op
    assert not any("-compile-" in i or "ppo_step" in i for i in ids)


def test_stage_runner_kills_a_stage_over_its_budget(tmp_path):
    cmd = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    rc, last, secs = gpu_check.run_stage(cmd, tmp_path / "x.log", dict(os.environ), timeout_s=2)
    assert rc == 124 and secs < 20 and "stage budget" in last
    assert "started" in (tmp_path / "x.log").read_text()


def test_refuses_to_run_without_cuda_unless_dry(tmp_path, monkeypatch):
    import torch
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.main(["--stages", "probe"]) == 2
