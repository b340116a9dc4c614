"""The eager-PyTorch composition: what an RLHF trainer does today, written plainly, for the bench baseline.

Logits are materialized (``hidden @ weight.T`` as an ``nn.Linear`` lm_head does), upcast to float32,
``log_softmax`` + ``gather`` give the log-probs, entropy is a second pass over the same float32
log-softmax, and the PPO terms (ratio, clip, KL, entropy bonus) are separate elementwise passes. The
PPO terms come from the library's own PyTorch path (``fastrlhf.kernels`` ``ppo_policy_loss``,
``kl_estimate``, ``aggregate``: STYLE rule 8, one reference kept in the library); what differs from
``backend="torch"`` is only how the log-probs are produced (full ``[N, V]`` float32 copies here, chunks
with a recompute backward there). GAE's eager baseline *is* the library's reference (a Python loop over
T, vectorised over B), so it is imported, not rewritten.

Every function here computes the same numbers as the corresponding public op (API.md), so the harness
checks providers against it.
"""
from __future__ import annotations

import torch

from fastrlhf.kernels import aggregate, kl_estimate, ppo_policy_loss
from fastrlhf.kernels.reference import gae as gae_loop  # noqa: F401  (the Python loop over T)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 (float64 stays float64, so the tests can compare with the library in float64)."""
    return x if x.dtype == torch.float64 else x.float()


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                   ignore_index: int = -100, return_entropy: bool = False):
    """``logits [..., V]``, ``labels [...]`` -> log p(label) ``[...]`` fp32 (and entropy), 0 where ignored.

    Materializes ``log_softmax(logits.float() / T)``: a float32 ``[..., V]`` copy (plus its grad in backward).
    """
    logp = torch.log_softmax(_upcast(logits) / temperature, dim=-1)
    ignored = labels == ignore_index
    lp = logp.gather(-1, labels.masked_fill(ignored, 0).unsqueeze(-1)).squeeze(-1)
    lp = lp.masked_fill(ignored, 0.0)
    if not return_entropy:
        return lp
    entropy = -(logp.exp() * logp).sum(-1)  # second pass over the [..., V] float32 log-probs
    return lp, entropy.masked_fill(ignored, 0.0)


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0,
                          ignore_index: int = -100, return_entropy: bool = False):
    """``hidden [..., H]``, ``weight [V, H]``: logits in the input dtype (as the lm_head gives them), then
    ``token_logprobs``."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index,
                          return_entropy=return_entropy)


def ppo_loss_from_logits(logits, labels, old_logprobs, advantages, mask, *, ref_logprobs=None, kl_coef=0.0,
                         kl_kind="k3", entropy_coef=0.0, clip_low=0.2, clip_high=None, dual_clip=None,
                         temperature=1.0, loss_agg="token-mean"):
    """API.md's ``fused_ppo_loss_from_logits`` objective as separate passes. Returns the loss.

    loss = ppo_policy_loss(lp) + kl_coef * agg(kl_estimate(lp, ref)) - entropy_coef * agg(entropy).
    """
    mask = mask.bool()
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))  # padding labels may be garbage
    lp, ent = token_logprobs(logits, safe_labels, temperature=temperature, return_entropy=True)
    loss, _ = ppo_policy_loss(lp, old_logprobs, advantages, mask, clip_low=clip_low, clip_high=clip_high,
                              dual_clip=dual_clip, loss_agg=loss_agg)
    if ref_logprobs is not None and kl_coef != 0:
        zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
        ref = torch.where(mask, _upcast(ref_logprobs), zero)
        kl = kl_estimate(torch.where(mask, lp, zero), ref, kl_kind)
        loss = loss + kl_coef * aggregate(kl, mask, loss_agg)
    if entropy_coef != 0:
        loss = loss - entropy_coef * aggregate(ent, mask, loss_agg)
    return loss


def ppo_loss(hidden, weight, labels, old_logprobs, advantages, mask, **kwargs):
    """``fused_ppo_loss`` as people write it: materialized logits ``hidden @ weight.T``, then the passes
    above."""
    logits = torch.nn.functional.linear(hidden, weight)
    return ppo_loss_from_logits(logits, labels, old_logprobs, advantages, mask, **kwargs)
