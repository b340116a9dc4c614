"""Multi-objective reward models: several named heads on one body, and ensembles of reward models.

Both score like :class:`~fastrlhf.models.RewardModel`: ``forward(input_ids, attention_mask) -> [B]`` fp32.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .heads import RewardModel, ScalarHeadModel

REDUCTIONS = ("mean", "min", "mean_minus_std")


def _weights_vector(heads: Sequence[str],
                    weights: Mapping[str, float] | Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0 / len(heads)] * len(heads)
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(heads))
        if unknown:
            raise ValueError(f"weights name unknown head(s) {unknown}; heads are {list(heads)}")
        return [float(weights.get(h, 0.0)) for h in heads]
    if len(weights) != len(heads):
        raise ValueError(f"{len(weights)} weights for {len(heads)} heads {list(heads)}")
    return [float(w) for w in weights]


class MultiHeadRewardModel(ScalarHeadModel):
    """One body, ``K`` named reward heads (e.g. helpful / harmless); the score is ``sum_k w_k * s_k``.

    ``forward(input_ids, attention_mask, head=None) -> [B]``: the weighted combination, or one head's
    score when ``head`` names it. ``head_scores`` gives ``[B, K]``. Weights can be changed after
    training (:meth:`set_weights`) to trade objectives off without retraining (Rame et al. 2023).
    """

    kind = "multihead_reward"

    def __init__(self, backbone: nn.Module, heads: Sequence[str],
                 weights: Mapping[str, float] | Sequence[float] | None = None, *,
                 head_init_std: float | None = None, reward_mean: float | None = None,
                 reward_std: float | None = None):
        heads = list(heads)
        if not heads or len(set(heads)) != len(heads):
            raise ValueError(f"heads must be distinct, non-empty names, got {heads}")
        super().__init__(backbone, num_heads=len(heads), head_init_std=head_init_std)
        self.heads = heads
        self.register_buffer("head_weights", torch.tensor(_weights_vector(heads, weights)), persistent=False)
        self.reward_mean = reward_mean
        self.reward_std = reward_std

    def set_weights(self, weights: Mapping[str, float] | Sequence[float]) -> None:
        self.head_weights.copy_(torch.tensor(_weights_vector(self.heads, weights)))

    def head_index(self, head: str) -> int:
        if head not in self.heads:
            raise KeyError(f"unknown head {head!r}; heads are {self.heads}")
        return self.heads.index(head)

    def head_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` fp32 scores of every head at each row's last valid token."""
        return self.last_token_outputs(input_ids, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                head: str | None = None) -> torch.Tensor:
        scores = self.head_scores(input_ids, attention_mask)
        if head is not None:
            return scores[:, self.head_index(head)]
        return scores @ self.head_weights.to(scores)

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        if self.reward_mean is None or self.reward_std is None:
            return scores
        return (scores - self.reward_mean) / max(self.reward_std, 1e-8)

    def _head_meta(self) -> dict[str, Any]:
        return {"heads": self.heads, "weights": self.head_weights.tolist(),
                "reward_mean": self.reward_mean, "reward_std": self.reward_std}

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, dtype=None, device=None) -> MultiHeadRewardModel:
        body, meta, state = cls._read(directory, dtype)
        if meta.get("class") != cls.__name__:
            raise ValueError(f"{directory} holds a {meta.get('class')}, not a {cls.__name__}")
        model = cls(body, meta["heads"], meta["weights"], reward_mean=meta.get("reward_mean"),
                    reward_std=meta.get("reward_std"))
        model._load_weights(state, directory)
        return model.to(device) if device is not None else model


class RewardEnsemble(nn.Module):
    """``M`` reward models (same tokenizer) scored together and reduced per row:

    - ``"mean"``: mean over members;
    - ``"min"``: worst case over members (conservative);
    - ``"mean_minus_std"``: ``mean - k * std`` with the population std over members (uncertainty
      penalty against reward over-optimisation, Coste et al. 2023, "Reward Model Ensembles Help
      Mitigate Overoptimization").
    """

    def __init__(self, models: Sequence[nn.Module], reduce: str = "mean", k: float = 1.0):
        super().__init__()
        if not models:
            raise ValueError("RewardEnsemble needs at least one model")
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
        self.members = nn.ModuleList(models)
        self.reduce = reduce
        self.k = float(k)

    def member_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[M, B]`` fp32 scores of every member."""
        return torch.stack([m(input_ids, attention_mask).float() for m in self.members])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        scores = self.member_scores(input_ids, attention_mask)
        if self.reduce == "mean":
            return scores.mean(0)
        if self.reduce == "min":
            return scores.amin(0)
        return scores.mean(0) - self.k * scores.std(0, correction=0)

    @classmethod
    def from_pretrained(cls, directories: Sequence[str | Path], reduce: str = "mean", k: float = 1.0, *,
                        dtype=None, device=None) -> RewardEnsemble:
        """Load every member with :meth:`RewardModel.from_pretrained`."""
        return cls([RewardModel.from_pretrained(d, dtype=dtype, device=device) for d in directories],
                   reduce=reduce, k=k)
