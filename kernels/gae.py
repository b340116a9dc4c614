"""gae: Generalized Advantage Estimation over each row's valid tokens (Schulman et al., 2016)."""
from __future__ import annotations

import torch

from . import reference
from ._backend import resolve_backend


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95, backend: str = "auto"):
    """``[B, T]`` each -> ``(advantages, returns)`` ``[B, T]`` fp32, skipping masked positions (holes too)."""
    if resolve_backend(backend, rewards) == "torch":
        return reference.gae(rewards, values, mask, gamma=gamma, lam=lam)
    raise NotImplementedError("gae: the Triton backend is not built yet; use backend='torch'")
