"""Helpers shared by the kernel tests (PyTorch path and Triton path): masks of every awkward kind,
garbage in padding, and a guard that no op materialises a float32 copy of the full logits.

They are fixtures returning functions so that test files import nothing from here
(pytest runs with ``--import-mode=importlib``).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


MASK_KINDS = ("full", "ragged", "left", "holes")


def build_mask(batch: int, length: int, kind: str, *, empty_rows: bool = True, seed: int = 0) -> torch.Tensor:
    """Bool ``[batch, length]`` valid-token mask.

    - "full": every token valid.
    - "ragged": right padding, each row its own length (>= 1).
    - "left": left padding, each row its own length (>= 1).
    - "holes": random interior gaps, at least one valid token per row.
    With ``empty_rows`` (and batch >= 2) the last row has no valid token at all.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"kind must be one of {MASK_KINDS}, got {kind!r}")
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(length)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    if kind == "full":
        mask = torch.ones(batch, length, dtype=torch.bool)
    elif kind == "ragged":
        mask = pos[None, :] < lengths[:, None]
    elif kind == "left":
        mask = pos[None, :] >= (length - lengths)[:, None]
    else:
        mask = torch.rand(batch, length, generator=g) < 0.6
        mask[torch.arange(batch), torch.randint(0, length, (batch,), generator=g)] = True
    if empty_rows and batch >= 2:
        mask[-1] = False
    return mask


def fill_garbage(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Copy of ``x`` with NaN, +inf, -inf and huge values at masked-out positions.

    ``mask`` covers the leading dims of ``x`` (``[B, T]`` for ``[B, T]`` or ``[B, T, V]`` tensors).
    Integer tensors get out-of-range junk instead.
    """
    y = x.detach().clone()
    bad = ~mask.bool()
    if not y.is_floating_point():
        y[bad] = 10**6 + 7
        return y
    junk = torch.tensor([float("nan"), float("inf"), -float("inf"), 3e4], dtype=y.dtype)
    n = int(bad.sum())
    vals = junk.repeat(n // 4 + 1)[:n]
    if y.dim() > mask.dim():
        vals = vals.view(-1, *([1] * (y.dim() - mask.dim())))
    y[bad] = vals.expand_as(y[bad]) if y.dim() > mask.dim() else vals
    return y.requires_grad_(x.requires_grad)


class LargeFloatGuard(TorchDispatchMode):
    """Records the largest float32/float64 tensor any op creates while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.float64):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.fixture(autouse=True)
def _seed_every_kernel_test():
    """Tests that draw from the global RNG see the same numbers whatever ran before them."""
    torch.manual_seed(0)


@pytest.fixture
def make_mask():
    return build_mask


@pytest.fixture
def garbage():
    return fill_garbage


@pytest.fixture
def float_guard():
    """``with float_guard() as g: ...``; then ``g.largest`` is the numel of the biggest fp32/fp64 tensor made."""
    return LargeFloatGuard


