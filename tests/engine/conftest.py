"""Fixtures for engine tests: launching torchrun subprocesses on a free port; tiny saved PPO inputs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastrlhf.engine.distributed import free_port


def _run_torchrun(target: str | Path, *args: str, nproc: int = 2, timeout: int = 300, module: bool = False,
                  cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc [-m] target args...``; fails the test with the output tails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", *(["-m"] if module else []), str(target), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="session")
def run_torchrun():
    return _run_torchrun


def write_tiny_ppo_inputs(root: Path, prompts: list[str]) -> None:
    """What ``fastrlhf ppo`` reads, tiny: ``root/sft`` (a Llama policy + the test tokenizer), ``root/rm`` (a
    reward model) and ``root/data.jsonl`` (one row per prompt)."""
    import json

    from fastrlhf.data import build_test_tokenizer
    from fastrlhf.models import RewardModel, tiny_llama
    tok = build_test_tokenizer()
    lm = tiny_llama(len(tok), seed=0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    lm.save_pretrained(root / "sft")
    tok.save_pretrained(root / "sft")
    RewardModel(tiny_llama(len(tok), seed=1)).save_pretrained(root / "rm")
    (root / "data.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
