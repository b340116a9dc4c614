"""Rewards that are not a reward model: Python functions, weighted sums, and DAPO's group filter.

A reward function is any callable ``fn(prompts: list[str], responses: list[str], **row) -> list[float]``
(one score per response); ``row`` holds the other fields of the prompt rows as lists, one value per
response (e.g. ``answer=[...]``), as TRL's reward functions receive them. Entries are named
``"module:name"`` (``"fastrlhf.data.arithmetic_task:exact_answer_reward"``) and combined by weights.
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn


def load_reward_function(spec: str, *, where: str = "rewards") -> Callable:
    """``"package.module:function"`` -> the callable; a bad spec is a ``ValueError`` naming ``where``."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"{where}: function must be 'module:name', got {spec!r}")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{where}: cannot import module {module_name!r} ({err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{where}: module {module_name!r} has no callable {attr!r}")
    return fn


class RewardFunctions:
    """Weighted Python reward functions: ``__call__(prompts, responses, rows) -> scores [B] float32``.

    ``terms``: ``(name, fn, weight)``. ``score = sum_k weight_k * fn_k(...)``. A function that raises,
    returns the wrong number of values, or a non-finite value makes the whole batch's score NaN (the
    trainer then skips that rollout and counts it, as for any non-finite score); each distinct error text
    is printed once, and ``errors`` counts the failed calls.
    """

    def __init__(self, terms: Sequence[tuple[str, Callable, float]], *, log: Callable[[str], None] = print):
        self.terms = list(terms)
        self.errors = 0
        self._seen: set[str] = set()
        self._log = log

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], rows: Sequence[dict] | None = None
                 ) -> torch.Tensor:
        rows = list(rows) if rows is not None else [{} for _ in responses]
        fields = sorted({k for r in rows for k in r} - {"prompt"})
        columns = {k: [r.get(k) for r in rows] for k in fields}
        total = torch.zeros(len(responses), dtype=torch.float64)
        for name, fn, weight in self.terms:
            values = self._call(name, fn, prompts, responses, columns)
            if values is None:
                return torch.full((len(responses),), float("nan"))
            total += weight * values
        return total.float()

    def _call(self, name, fn, prompts, responses, columns) -> torch.Tensor | None:
        try:
            out = [float(v) for v in fn(list(prompts), list(responses), **columns)]
            if len(out) != len(responses):
                raise ValueError(f"returned {len(out)} values for {len(responses)} responses")
            bad = [v for v in out if not math.isfinite(v)]
            if bad:
                raise ValueError(f"returned a non-finite value ({bad[0]})")
        except Exception as err:  # noqa: BLE001 -- any failure of user code skips the rollout
            self.errors += 1
            text = f"reward function {name}: {type(err).__name__}: {err}"
            if text not in self._seen:
                self._seen.add(text)
                self._log(f"[fastrlhf] {text} (rollout skipped; further identical errors are only counted)")
            return None
        return torch.tensor(out, dtype=torch.float64)


class WeightedRewardModels(nn.Module):
    """``sum_k weight_k * model_k(input_ids, attention_mask)`` (each ``[B]``): several reward models or
    ``RewardEnsemble``s as one score; ``forward -> [B]`` float32."""

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float]):
        super().__init__()
        if len(models) != len(weights) or not models:
            raise ValueError(f"need one weight per reward model, got {len(models)} models, {len(weights)} weights")
        self.members = nn.ModuleList(models)
        self.weights = [float(w) for w in weights]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return sum(w * m(input_ids, attention_mask).float() for w, m in zip(self.weights, self.members, strict=True))


def filter_groups(scores: torch.Tensor, group_size: int, *, atol: float = 0.0) -> torch.Tensor:
    """DAPO dynamic sampling (Yu et al. 2025, eq. 11): keep only groups (``group_size`` adjacent rows of one
    prompt) whose scores are not all the same: with equal scores every group-relative advantage is 0 and
    the group only dilutes the batch. Returns ``keep [B]`` bool (whole groups kept or dropped)."""
    if scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"scores [B] must be whole groups of {group_size}, got shape {tuple(scores.shape)}")
    g = scores.float().view(-1, group_size)
    varied = (g.amax(-1) - g.amin(-1)) > atol
    return varied.repeat_interleave(group_size)
