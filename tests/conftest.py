"""Shared fixtures. Nothing here downloads: tokenizers and models are built locally."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests use tiny tensors: intra-op threads cost more than they give (measured up to 45x on a loaded
# 2-core machine), and subprocesses (torchrun, vLLM) inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)


@pytest.fixture
def interpret(monkeypatch):
    """TRITON_INTERPRET=1 for this test, or a skip with the reason where the interpreter cannot run."""
    from fastrlhf.kernels._triton_utils import interpreter_unavailable_reason
    reason = interpreter_unavailable_reason()
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
