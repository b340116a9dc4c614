"""Corrections for what the rollout engine did differently from the trainer's policy.

Truncated importance sampling (TIS; Yao et al. 2025, "Your efficient RL framework secretly brings you
off-policy RL training"; veRL ``rollout_corr``, OpenRLHF ``is_correction``): responses are sampled by the
engine's policy ``mu`` (other kernels, bf16, top-k/top-p truncation), the PPO ratio is taken against the
trainer's ``pi_old``. The per-token policy loss is reweighted by

    w_t = min(exp(old_logprobs_t - sampler_logprobs_t), cap)          (a constant: no gradient)

**How it reaches the loss without touching the kernel.** ``fused_ppo_loss`` computes, per valid token,
``l_t = max(-A_t r_t, -A_t clip(r_t))`` (and with dual clip, for ``A_t < 0``, ``min(l_t, -A_t c)``).
Because ``w_t > 0``, multiplying the advantage is exactly multiplying the loss:
``max(-(w A) r, -(w A) clip(r)) = w max(-A r, -A clip(r))`` and ``min(w l, -(w A) c) = w min(l, -A c)``
(``w A < 0`` iff ``A < 0``), and the clip indicator (``clipfrac``) is unchanged. So
``advantages * w`` handed to ``fused_ppo_loss`` gives ``loss_t * w_t`` for the policy term, while the
KL-in-loss and entropy terms, which do not involve the advantage, stay unweighted. ``w_t`` may underflow
to 0 for a token the sampler found far likelier than the trainer; the product is then exactly 0 = 0 x l_t.

Missing-EOS penalty: a response cut at ``max_new_tokens`` before EOS was never seen by a reward model
trained on finished responses; its score is lowered by a fixed penalty.
"""
from __future__ import annotations

import torch


def tis_weights(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor, *,
                cap: float) -> tuple[torch.Tensor, dict]:
    """``w [B, T] = min(exp(old - sampler), cap)`` on valid tokens, 1 elsewhere (fp32, detached).

    stats: ``tis_capped_fraction`` (share of valid tokens where the cap is active, i.e. the ratio is
    above it), ``tis_weight_mean`` (masked mean of ``w``), ``tis_ratio_max`` (largest uncapped ratio)."""
    if cap <= 0:
        raise ValueError(f"tis cap must be > 0, got {cap}")
    mask = mask.bool()
    log_ratio = torch.where(mask, old_logprobs.float() - sampler_logprobs.float(), 0.0).detach()
    ratio = log_ratio.exp()
    w = torch.where(mask, ratio.clamp(max=cap), 1.0)
    n = mask.sum().clamp(min=1)
    zero = torch.zeros((), device=w.device)
    stats = {
        "tis_capped_fraction": ((ratio > cap) & mask).sum().float() / n,
        "tis_weight_mean": torch.where(mask, w, zero).sum() / n,
        "tis_ratio_max": torch.where(mask, ratio, zero).max() if mask.any() else zero,
    }
    return w, stats


def apply_tis(advantages: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``advantages * weights``: with ``weights > 0`` the PPO policy loss of every token is multiplied by
    its weight exactly (see the module docstring)."""
    return advantages * weights


def missing_eos_penalty(scores: torch.Tensor, truncated: torch.Tensor, penalty: float) -> torch.Tensor:
    """``scores [B]`` minus ``penalty`` on the rows whose response ended without EOS (``truncated [B]``)."""
    return scores - penalty * truncated.to(scores.dtype)
