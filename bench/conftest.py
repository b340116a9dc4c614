"""Fixtures of the bench suite: one ``BenchSession`` per pytest session (rows, floors, the JSON file)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# `python -m pytest` puts the repo root on sys.path; a bare `pytest bench` with --import-mode=importlib
# does not, and the bench modules import each other as the package `bench`.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench.harness import BenchSession, bench_device, bench_profile, json_path_from_env  # noqa: E402


@pytest.fixture(scope="session")
def bench_session() -> BenchSession:
    device = bench_device()
    session = BenchSession(device, bench_profile(), json_path_from_env(device))
    # On a shared 2-core CPU, OpenMP threads spinning against other processes made one small op 15x
    # slower (68 ms vs 4.7 ms, measured); the quick mode therefore runs single-threaded.
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    session.meta["cpu_threads"] = torch.get_num_threads()
    yield session
    torch.set_num_threads(threads)
    session.write()
