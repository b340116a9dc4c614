"""fused_ppo_loss: clipped PPO surrogate + KL to the reference + entropy bonus, straight from hidden states."""
from __future__ import annotations

import torch

from . import reference
from ._backend import check_loss_agg, resolve_backend


def fused_ppo_loss(hidden, weight, labels, old_logprobs, advantages, mask, *, ref_logprobs=None, kl_coef=0.0,
                   kl_kind="k3", entropy_coef=0.0, clip_low=0.2, clip_high=None, dual_clip=None, temperature=1.0,
                   loss_agg="token-mean", chunk_size=None, return_logprobs=False, backend="auto"):
    """See ../shared/API.md. ``hidden [B, T, H]``, ``weight [V, H]`` -> ``(loss, stats[, logprobs])``."""
    check_loss_agg(loss_agg)
    kwargs = dict(ref_logprobs=ref_logprobs, kl_coef=kl_coef, kl_kind=kl_kind, entropy_coef=entropy_coef,
                  clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, temperature=temperature,
                  loss_agg=loss_agg, chunk_size=chunk_size, return_logprobs=return_logprobs)
    if resolve_backend(backend, hidden) == "torch":
        return reference.fused_ppo_loss(hidden, weight, labels, old_logprobs, advantages, mask, **kwargs)
    raise NotImplementedError("fused_ppo_loss: the Triton backend is not built yet; use backend='torch'")


def fused_ppo_loss_from_logits(logits, labels, old_logprobs, advantages, mask, *, ref_logprobs=None, kl_coef=0.0,
                               kl_kind="k3", entropy_coef=0.0, clip_low=0.2, clip_high=None, dual_clip=None,
                               temperature=1.0, loss_agg="token-mean", return_logprobs=False, backend="auto"):
    """Same as ``fused_ppo_loss`` with ``logits [B, T, V]`` given."""
    check_loss_agg(loss_agg)
    kwargs = dict(ref_logprobs=ref_logprobs, kl_coef=kl_coef, kl_kind=kl_kind, entropy_coef=entropy_coef,
                  clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, temperature=temperature,
                  loss_agg=loss_agg, return_logprobs=return_logprobs)
    if resolve_backend(backend, logits) == "torch":
        return reference.fused_ppo_loss_from_logits(logits, labels, old_logprobs, advantages, mask, **kwargs)
    raise NotImplementedError("fused_ppo_loss_from_logits: the Triton backend is not built yet; use backend='torch'")
