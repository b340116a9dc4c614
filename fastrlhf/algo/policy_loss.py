"""Policy-loss variants, registered by name (``policy_loss`` in ``PPOConfig``).

A variant is a function with the signature of ``fastrlhf.kernels.fused_ppo_loss``:
``fn(hidden [B, T, H], weight [V, H], labels [B, T], old_logprobs, advantages, mask, **kwargs) -> (loss, stats)``
(kwargs: ``ref_logprobs``, ``kl_coef``, ``kl_kind``, ``entropy_coef``, ``clip_low``, ``clip_high``,
``dual_clip``, ``temperature``, ``loss_agg``, ``chunk_size``, ``backend``). ``PolicyWithLoss`` calls the
one named by ``policy_loss`` from inside its forward (where FSDP has unsharded the lm_head). Adding a
variant is adding a function with ``@register_policy_loss`` (verl's ``register_policy_loss``), never a flag.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from fastrlhf.kernels import fused_ppo_loss, linear_token_logprobs, masked_mean, ppo_policy_loss

from .registry import Registry

_POLICY_LOSSES: Registry[Callable] = Registry("policy loss", "policy_loss")


def register_policy_loss(name: str):
    def wrap(fn):
        _POLICY_LOSSES.register(name, fn)
        return fn
    return wrap


def policy_loss_names() -> tuple[str, ...]:
    return _POLICY_LOSSES.names()


def get_policy_loss(name: str) -> Callable:
    return _POLICY_LOSSES.get(name)


@register_policy_loss("ppo")
def ppo_loss(hidden, weight, labels, old_logprobs, advantages, mask, **kwargs):
    """The clipped per-token PPO surrogate (clip, clip-higher, dual clip) with KL and entropy terms:
    exactly ``fused_ppo_loss``."""
    return fused_ppo_loss(hidden, weight, labels, old_logprobs, advantages, mask, **kwargs)


def sequence_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log s_i = (1 / |y_i|) sum_t (lp_t - old_t)`` over each row's valid tokens, ``[B]`` (0 for empty rows);
    the log of GSPO's sequence importance ratio (Zheng et al. 2025, eq. 7). Padding is never read."""
    valid = mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    diff = torch.where(valid, logprobs - old_logprobs.to(logprobs.dtype), zero)
    return diff.sum(-1) / valid.sum(-1).clamp(min=1).to(diff.dtype)


def gspo_old_logprobs(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token "old log-probs" that turn the per-token PPO ratio into GSPO's sequence ratio:
    ``old'_t = sg[lp_t] - sg[log s_i]``, so ``exp(lp_t - old'_t)`` equals ``s_i`` in value and has gradient
    ``s_i * grad lp_t`` (GSPO-token's ``s_i,t = sg[s_i] * pi(y_t) / sg[pi(y_t)]``, Zheng et al. 2025, eq. 13)."""
    lp = logprobs.detach()
    out = lp - sequence_log_ratio(lp, old_logprobs, mask)[:, None]
    return torch.where(mask.bool(), out, torch.zeros((), dtype=out.dtype, device=out.device))


def gspo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                     mask: torch.Tensor, *, clip_low: float = 3e-4, clip_high: float | None = 4e-4,
                     dual_clip: float | None = None, loss_agg: str = "seq-mean-token-mean"):
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization") from per-token log-probs ``[B, T]``:

        s_i = exp((1/|y_i|) sum_t (lp_t - old_t)),   J = mean_i min(s_i A_i, clip(s_i, 1 - clip_low, 1 + clip_high) A_i)

    computed as ``ppo_policy_loss(lp, gspo_old_logprobs(lp, old, mask), A, mask, ...)``: every token of row i
    sees the ratio s_i, so with ``loss_agg="seq-mean-token-mean"`` and a per-row advantage the loss and its
    gradient are GSPO's exactly (``d s_i = s_i (1/|y_i|) sum_t d lp_t``, the same as the mean over the row
    of the per-token gradients ``s_i d lp_t``). Per-token advantages give GSPO-token (eq. 13). The paper's
    clip range is small (3e-4 / 4e-4): the ratio is a per-token geometric mean. Returns ``(loss, stats)``
    as ``ppo_policy_loss`` (``clipfrac``: share of tokens in clipped sequences; ``ratio_mean``: mean s_i)."""
    shifted = gspo_old_logprobs(logprobs, old_logprobs, mask)
    return ppo_policy_loss(logprobs, shifted, advantages, mask, clip_low=clip_low, clip_high=clip_high,
                           dual_clip=dual_clip, loss_agg=loss_agg)


@register_policy_loss("gspo")
def gspo_loss(hidden, weight, labels, old_logprobs, advantages, mask, *, temperature=1.0, chunk_size=None,
              backend="auto", **kwargs):
    """GSPO through the fused kernel. The kernel's ratio is per token, ``exp(lp_t - old_t)``; GSPO's is per
    sequence. The fused kernel gets the sequence ratio by being handed shifted old log-probs
    (:func:`gspo_old_logprobs`): ``old'_t = sg[lp_t] - sg[log s_i]``. That needs the current log-probs
    before the loss, so one extra forward over the vocabulary chunks runs first, without gradient
    (``linear_token_logprobs`` under ``no_grad``: one more ``2 N H V`` matmul, no backward, still no
    ``[B, T, V]`` logits); then ``fused_ppo_loss`` computes loss, KL and entropy terms and the gradients for
    ``hidden`` and ``weight`` in its one fused pass. Value and gradient equal :func:`gspo_policy_loss` (up
    to the float32 rounding of ``lp_t - sg[lp_t]``, about 1e-7 in the ratio). ``loss_agg`` should be
    ``"seq-mean-token-mean"`` for the paper's sequence mean; ``"token-mean"`` weights sequences by length."""
    with torch.no_grad():
        lp = linear_token_logprobs(hidden.detach(), weight.detach(), labels, temperature=temperature,
                                   chunk_size=chunk_size, backend=backend)
        shifted = gspo_old_logprobs(lp, old_logprobs, mask)
        seq_ratio = masked_mean(sequence_log_ratio(lp, old_logprobs, mask).exp(), mask.bool().any(-1))
    loss, stats, *rest = fused_ppo_loss(hidden, weight, labels, shifted, advantages, mask,
                                        temperature=temperature, chunk_size=chunk_size, backend=backend, **kwargs)
    stats = {**stats, "seq_ratio_mean": seq_ratio.float()}
    return (loss, stats, *rest)
