"""Per-token PPO rewards: the reward-model score at the end of the response, a KL penalty on every token."""
from __future__ import annotations

import torch

from fastrlhf.kernels import kl_estimate


def last_valid_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column of each row's last valid token and whether the row has one.

    ``mask [B, T]`` bool or 0/1. Returns ``(index [B] int64, has_any [B] bool)``; ``index`` is 0 for
    rows without a valid token. Works with left padding and with holes inside a row.
    """
    valid = mask.bool()
    cols = torch.arange(valid.shape[-1], device=valid.device).expand_as(valid)
    last = torch.where(valid, cols, torch.full_like(cols, -1)).amax(dim=-1)
    has_any = last >= 0
    return last.clamp(min=0), has_any


def token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                  mask: torch.Tensor, *, kl_coef: float, kl_kind: str = "k1"):
    """Dense PPO rewards from sequence scores and a per-token KL penalty.

    ``scores [B]`` reward-model scores; ``logprobs, ref_logprobs [B, T]`` log-probs of the sampled
    response tokens under the policy and the frozen reference; ``mask [B, T]`` valid response tokens.

    ``kl_t = kl_estimate(logprobs_t, ref_logprobs_t, kl_kind)`` on valid tokens, 0 elsewhere;
    ``r_t = -kl_coef * kl_t + [t == last valid token of the row] * score`` (Ziegler et al. 2019, eq. 2;
    Ouyang et al. 2022, eq. 2). The score goes to each row's last *valid* column, not column -1, so left
    or right padding and holes do not move it; a row with no valid token gets all zeros. Padding may
    hold NaN/inf: it is replaced before any arithmetic, so neither values nor gradients see it.
    Returns ``(rewards, kl)``, both float32 ``[B, T]``.
    """
    if logprobs.dim() != 2 or logprobs.shape != ref_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(f"logprobs, ref_logprobs and mask must all be [B, T]; got {tuple(logprobs.shape)}, "
                         f"{tuple(ref_logprobs.shape)}, {tuple(mask.shape)}")
    if scores.shape != logprobs.shape[:1]:
        raise ValueError(f"scores must be [B] = [{logprobs.shape[0]}], got {tuple(scores.shape)}")
    valid = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=logprobs.device)
    lp = torch.where(valid, logprobs.float(), zero)
    ref = torch.where(valid, ref_logprobs.float(), zero)
    kl = torch.where(valid, kl_estimate(lp, ref, kind=kl_kind).float(), zero)
    rewards = -float(kl_coef) * kl

    last, has_any = last_valid_index(valid)
    end_score = torch.where(has_any, scores.float(), zero)
    rewards = rewards.scatter_add(1, last.unsqueeze(1), end_score.unsqueeze(1))
    return rewards, kl
