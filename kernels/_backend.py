"""Backend choice and input checks shared by every op. No module-level state: each call decides."""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on CPU tensors (``TRITON_INTERPRET=1``), read at call time."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Map ``backend`` to "triton" or "torch".

    "auto" picks Triton for CUDA tensors, and for CPU tensors when ``TRITON_INTERPRET=1``;
    otherwise the PyTorch path.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if any(t.is_cuda for t in tensors):
        return "triton"
    return "triton" if interpreter_enabled() else "torch"


def check_loss_agg(loss_agg: str) -> None:
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
