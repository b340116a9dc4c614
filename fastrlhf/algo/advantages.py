"""Advantage estimators, registered by name (``advantage_estimator`` in ``PPOConfig``).

Each estimator is a small pure function over tensors; the registry maps a name to an adapter with one
keyword signature, so the trainer loop is the same for all of them (a new estimator is a new function
plus ``@register_adv_est``, never a flag inside an existing one; veRL's ``register_adv_est`` does the same).

Conventions: ``scores [B]`` one score per response; rows of one prompt are ``group_size`` adjacent rows
(``rollout.n``); ``mask [B, T]`` marks valid response tokens in any layout (left or right padding, holes,
rows with none); results are float32 ``[B, T]``, 0 at masked positions, never reading padding values.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from fastrlhf.kernels import gae, masked_whiten

from .registry import Registry
from .rewards import last_valid_index

# name -> (adapter, needs_critic)
_ADV_ESTIMATORS: Registry[tuple[Callable, bool]] = Registry("advantage estimator", "advantage_estimator")


def register_adv_est(name: str, *, needs_critic: bool = False):
    """Decorator: register an adapter ``fn(*, scores, rewards, values, mask, group_size, gamma, lam,
    norm_std, whiten, backend) -> (advantages [B, T], returns [B, T])`` under ``name``."""
    def wrap(fn):
        _ADV_ESTIMATORS.register(name, (fn, needs_critic))
        return fn
    return wrap


def adv_estimator_names() -> tuple[str, ...]:
    return _ADV_ESTIMATORS.names()


def get_adv_estimator(name: str) -> Callable:
    return _ADV_ESTIMATORS.get(name)[0]


def needs_critic(name: str) -> bool:
    """Whether estimator ``name`` uses values (a critic); critic-free ones build no critic, no value loss."""
    return _ADV_ESTIMATORS.get(name)[1]


# ------------------------------------------------------------------------------------------ the math
def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``scores [B]`` -> ``[B / group_size, group_size]`` float32, with clear errors for bad shapes."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be [B], got shape {tuple(scores.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for a group baseline, got {group_size}")
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} rows are not whole groups of {group_size}")
    return scores.float().view(-1, group_size)


def _broadcast(per_row: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if mask.dim() != 2 or mask.shape[0] != per_row.shape[0]:
        raise ValueError(f"mask must be [B, T] with B = {per_row.shape[0]}, got {tuple(mask.shape)}")
    valid = mask.bool()
    return torch.where(valid, per_row[:, None].expand(valid.shape), torch.zeros((), device=valid.device))


def grpo_advantages(scores: torch.Tensor, mask: torch.Tensor, group_size: int, *, norm_std: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath eq. 3, outcome supervision): ``A_i = (s_i - mean_g) / (std_g + eps)``
    over the ``group_size`` adjacent rows ``g`` of one prompt, ``std`` unbiased (``torch.std``);
    ``norm_std=False`` gives ``A_i = s_i - mean_g`` (Dr. GRPO, Liu et al. 2025). A group whose scores are
    all equal gets 0. Broadcast to the valid tokens of each row: ``[B, T]`` float32."""
    g = _groups(scores, group_size)
    adv = g - g.mean(-1, keepdim=True)
    if norm_std:
        adv = adv / (g.std(-1, keepdim=True) + eps)
    return _broadcast(adv.reshape(-1), mask)


def rloo_advantages(scores: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): ``A_i = s_i - (sum_g - s_i) / (k - 1)``, the mean of the
    other ``k - 1`` rows of the group as the baseline (equal to ``k / (k - 1) * (s_i - mean_g)``).
    Broadcast to valid tokens, ``[B, T]`` float32."""
    g = _groups(scores, group_size)
    baseline = (g.sum(-1, keepdim=True) - g) / (group_size - 1)
    return _broadcast((g - baseline).reshape(-1), mask)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
                       backend: str = "auto") -> torch.Tensor:
    """``G_t = sum_{k >= t, valid} gamma^(steps from t to k) r_k`` over each row's valid tokens in order
    (holes skipped), 0 elsewhere: GAE with zero values and lambda = 1, so it runs on the gae kernel."""
    zeros = torch.zeros_like(rewards, dtype=torch.float32)
    returns, _ = gae(rewards.float(), zeros, mask, gamma=gamma, lam=1.0, backend=backend)
    return returns


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
                            whiten: Callable | None = None, backend: str = "auto") -> torch.Tensor:
    """REINFORCE++ (Hu 2025): token returns ``G_t`` of the KL-penalized token rewards ``rewards [B, T]``
    (``token_rewards``: ``-beta KL_t`` on every token, the score at the last), whitened over the valid
    tokens of the whole batch (``masked_whiten``: mean 0, unbiased std 1; ``whiten`` replaces it, e.g. a
    whitening over all ranks). ``[B, T]`` float32, 0 at masked positions."""
    returns = discounted_returns(rewards, mask, gamma=gamma, backend=backend)
    return (whiten or masked_whiten)(returns, mask.bool())


def reinforce_pp_baseline_advantages(rewards: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                                     group_size: int, *, gamma: float = 1.0, whiten: Callable | None = None,
                                     backend: str = "auto") -> torch.Tensor:
    """REINFORCE++-baseline (Hu 2025; OpenRLHF ``reinforce_baseline``): the group mean of ``scores [B]`` is
    subtracted from each row's score (at its last valid token of ``rewards [B, T]``, which already holds
    the score there), then :func:`reinforce_pp_advantages` (returns, global whitening)."""
    g = _groups(scores, group_size)
    baseline = g.mean(-1, keepdim=True).expand_as(g).reshape(-1)
    last, has_any = last_valid_index(mask)
    shift = torch.where(has_any, -baseline, torch.zeros_like(baseline))
    shifted = torch.where(mask.bool(), rewards.float(), torch.zeros((), device=rewards.device))
    shifted = shifted.scatter_add(1, last.unsqueeze(1), shift.unsqueeze(1))
    return reinforce_pp_advantages(shifted, mask, gamma=gamma, whiten=whiten, backend=backend)


# ------------------------------------------------------------------------------ registered adapters
# Every adapter takes the same keywords (unused ones ignored) and returns (advantages, returns). For the
# critic-free estimators "returns" are the advantages (there is no value target to fit).
@register_adv_est("gae", needs_critic=True)
def _gae_est(*, rewards, values, mask, gamma=1.0, lam=0.95, backend="auto", **_):
    """Today's PPO path: ``gae`` of the KL-penalized token rewards against the critic's values."""
    return gae(rewards, values, mask, gamma=gamma, lam=lam, backend=backend)


@register_adv_est("grpo")
def _grpo_est(*, scores, mask, group_size, norm_std=True, **_):
    adv = grpo_advantages(scores, mask, group_size, norm_std=norm_std)
    return adv, adv


@register_adv_est("rloo")
def _rloo_est(*, rewards, mask, group_size, **_):
    # As in TRL's RLOO: the sequence reward includes the KL penalty (sum of the token rewards)
    adv = rloo_advantages(torch.where(mask.bool(), rewards.float(), 0.0).sum(-1), mask, group_size)
    return adv, adv


@register_adv_est("reinforce_pp")
def _reinforce_pp_est(*, rewards, mask, gamma=1.0, whiten=None, backend="auto", **_):
    adv = reinforce_pp_advantages(rewards, mask, gamma=gamma, whiten=whiten, backend=backend)
    return adv, adv


@register_adv_est("reinforce_pp_baseline")
def _reinforce_pp_baseline_est(*, rewards, scores, mask, group_size, gamma=1.0, whiten=None, backend="auto",
                               **_):
    adv = reinforce_pp_baseline_advantages(rewards, scores, mask, group_size, gamma=gamma, whiten=whiten,
                                           backend=backend)
    return adv, adv


def compute_advantages(name: str, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the estimator registered as ``name`` with the keyword inputs of its adapter."""
    return get_adv_estimator(name)(**inputs)
