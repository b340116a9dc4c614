"""Reward-score normalization: batch whitening, running moments, length normalization, clipping."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

NORMALIZE_MODES = ("none", "batch", "running", "length")


class RunningMoments:
    """Running mean and variance of every value ever passed to :meth:`update`.

    Merges each batch's (count, mean, M2) into the running ones with the parallel update of Chan,
    Golub & LeVeque (1979): ``delta = mean_b - mean``, ``n = n_a + n_b``,
    ``mean += delta * n_b / n``, ``M2 += M2_b + delta^2 * n_a * n_b / n`` — stable in float64 where the
    naive sum-of-squares is not. ``var`` is the unbiased ``M2 / (count - 1)`` (0 until two values are
    seen), ``std = sqrt(var)``. With ``distributed=True`` (default) and ``torch.distributed``
    initialized, each update first combines the batch over all ranks (two all-reduces), so every rank
    holds the same moments. State is plain Python floats: ``state_dict()`` / ``load_state_dict()``.
    """

    def __init__(self, *, distributed: bool = True, group=None):
        self.distributed = distributed
        self.group = group
        self.count = 0.0
        self.mean = 0.0
        self.m2 = 0.0

    @property
    def var(self) -> float:
        return self.m2 / (self.count - 1) if self.count > 1 else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def _batch_moments(self, x: torch.Tensor) -> tuple[float, float, float]:
        """(count, mean, M2) of ``x``, combined over ranks when distributed."""
        x = x.detach().reshape(-1).double()
        reduce = self.distributed and dist.is_available() and dist.is_initialized()
        head = torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device), x.sum()])
        if reduce:
            dist.all_reduce(head, group=self.group)
        count, total = head.tolist()
        if count == 0:
            return 0.0, 0.0, 0.0
        mean = total / count
        m2 = ((x - mean) ** 2).sum()
        if reduce:
            dist.all_reduce(m2, group=self.group)
        return count, mean, float(m2)

    def update(self, x: torch.Tensor) -> tuple[float, float]:
        """Add every element of ``x`` (any shape); returns this batch's (mean, unbiased std)."""
        if not torch.isfinite(x).all():
            raise ValueError("RunningMoments.update got NaN or inf; refusing to corrupt the running moments")
        n_b, mean_b, m2_b = self._batch_moments(x)
        if n_b == 0:
            return 0.0, 0.0
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.count * n_b / n
        self.count = n
        return mean_b, math.sqrt(m2_b / (n_b - 1)) if n_b > 1 else 0.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = float(state["count"]), float(state["mean"]), float(state["m2"])

    def __repr__(self) -> str:
        return f"RunningMoments(count={self.count:g}, mean={self.mean:.6g}, std={self.std:.6g})"


def _whiten(x: torch.Tensor, mean, var, eps: float) -> torch.Tensor:
    return (x - mean) / torch.sqrt(torch.as_tensor(var, dtype=x.dtype, device=x.device) + eps)


def normalize_rewards(scores: torch.Tensor, *, mode: str = "batch", lengths: torch.Tensor | None = None,
                      clip: float | None = None, stats: RunningMoments | None = None,
                      eps: float = 1e-8) -> torch.Tensor:
    """Normalize reward-model ``scores [B]`` before they become PPO rewards; returns float32 ``[B]``.

    - ``"none"``: unchanged.
    - ``"batch"``: ``(s - mean) / sqrt(var + eps)`` over this batch (unbiased var; a batch of one
      has var 0 and maps to 0).
    - ``"running"``: first ``stats.update(scores)`` (a :class:`RunningMoments`), then whiten with the
      running mean and var — the score scaling of Ziegler et al. 2019 (sec. 2.2) done online.
    - ``"length"``: ``s / lengths`` (``lengths [B]`` > 0, e.g. response token counts).

    Then, when ``clip`` is given, clamp to ``[-clip, clip]``.
    """
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"mode must be one of {NORMALIZE_MODES}, got {mode!r}")
    if scores.dim() != 1:
        raise ValueError(f"scores must be [B], got shape {tuple(scores.shape)}")
    s = scores.float()
    if mode == "batch":
        var = s.var(unbiased=True) if s.numel() > 1 else s.new_zeros(())
        s = _whiten(s, s.mean(), var, eps)
    elif mode == "running":
        if not isinstance(stats, RunningMoments):
            raise ValueError("mode='running' needs stats=RunningMoments() "
                             "(kept across steps and checkpointed)")
        stats.update(s)
        s = _whiten(s, stats.mean, stats.var, eps)
    elif mode == "length":
        if lengths is None:
            raise ValueError("mode='length' needs lengths=[B] (e.g. response token counts)")
        lengths = torch.as_tensor(lengths, device=s.device)
        if lengths.shape != s.shape:
            raise ValueError(f"lengths must be [B] = {tuple(s.shape)}, got {tuple(lengths.shape)}")
        if not (lengths > 0).all():
            raise ValueError("lengths must all be > 0 for mode='length'")
        s = s / lengths.float()
    if clip is not None:
        if not clip > 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        s = s.clamp(-clip, clip)
    return s
