"""Fixtures for engine tests: launching torchrun subprocesses on a free port."""
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
