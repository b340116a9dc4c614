"""Small per-token RL math on [B, T] tensors: KL estimators, masked statistics, PPO policy / value losses.

Elementwise work on log-probs that are already computed; PyTorch only (no Triton kernel needed).

Conventions (shared with the Triton kernels, which must match them):
- Computation and outputs in float32 (float64 when an input is float64: that is the test oracle).
- Padding never leaks: masked positions are replaced with ``torch.where`` *before* any arithmetic,
  so NaN/inf there changes neither results nor gradients (``0 * nan`` would be ``nan``).
- An empty selection (no valid token) reduces to 0, not NaN, without a host sync.
- PPO stats are detached 0-dim tensors; nothing here calls ``.item()``.
"""
from __future__ import annotations

import torch

from ._backend import check_clip, check_kl_kind, check_loss_agg, check_mask, check_same_shape, check_tensor


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 if any input is float64 (so the library itself serves as a float64 oracle)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _masked(x: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` upcast, with 0 at masked-out positions (selected, not multiplied: NaN-safe)."""
    x = x.to(dtype or _compute_dtype(x))
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


# ---------------------------------------------------------------------------------------------- KL estimators
def _kl_k1(d):
    return d


def _kl_k2(d):
    return 0.5 * d * d


def _kl_k3(d):
    # exp(-d) + d - 1 written with expm1: exact near d = 0, where the estimator is small.
    return torch.expm1(-d) + d


def _kl_abs(d):
    return d.abs()


KL_ESTIMATORS = {"k1": _kl_k1, "k2": _kl_k2, "k3": _kl_k3, "abs": _kl_abs}


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi (Schulman, "Approximating KL
    divergence", 2020). ``d = logprobs - ref_logprobs``; k1: d, k2: d^2/2, k3: exp(-d) + d - 1, abs: |d|.

    Shapes: any, equal (no broadcasting). Output float32 (float64 for float64 input), elementwise: mask it yourself.
    """
    check_kl_kind(kind)
    check_tensor("logprobs", logprobs, floating=True)
    check_tensor("ref_logprobs", ref_logprobs, floating=True)
    check_same_shape(logprobs.shape, "logprobs", ref_logprobs=ref_logprobs)  # no silent broadcasting
    dtype = _compute_dtype(logprobs)  # fp64 only for an fp64 oracle
    d = logprobs.to(dtype) - ref_logprobs.to(dtype)
    return KL_ESTIMATORS[kind](d)


# ---------------------------------------------------------------------------------------- masked statistics
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is true (over all dims, or along ``dim``).

    ``x`` and ``mask`` have one shape. Where there is no valid position the mean is 0 (not NaN).
    """
    mask = check_mask(mask, x.shape, "x")
    xs = _masked(x, mask)
    count = mask.sum(dim=dim).to(xs.dtype) if dim is not None else mask.sum().to(xs.dtype)
    total = xs.sum(dim=dim) if dim is not None else xs.sum()
    return total / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over valid positions, 0-dim. Unbiased divides by ``n - 1`` (Bessel).

    When ``n - ddof <= 0`` (no valid value, or one with ``unbiased=True``) the result is 0, not NaN
    (no host sync to raise): whitening such a set yields 0, what a trainer wants from a one-token batch.
    """
    mask = check_mask(mask, x.shape, "x")
    mean = masked_mean(x, mask)
    centered = torch.where(mask, x.to(mean.dtype) - mean, torch.zeros((), dtype=mean.dtype, device=x.device))
    n = mask.sum().to(mean.dtype)
    denom = n - 1 if unbiased else n
    return (centered * centered).sum() / denom.clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, *,
                  group=None) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over valid positions (unbiased var); mean added back when
    ``shift_mean=False``. 0 at masked-out positions. Same shape as ``x``, float32.

    ``group``: a ``torch.distributed`` process group (or ``torch.distributed.group.WORLD``): mean and
    variance are taken over the valid positions of every rank's ``x`` (two all-reduces: count and sum,
    then the sum of squared deviations), so each rank gets its part of the global whitening."""
    mask = check_mask(mask, x.shape, "x")
    if group is not None:
        mean, var = _global_mean_var(x, mask, group)
    else:
        mean = masked_mean(x, mask)
        var = masked_var(x, mask, unbiased=True)
    xs = _masked(x, mask)
    white = (xs - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return torch.where(mask, white, torch.zeros((), dtype=white.dtype, device=white.device))


def _global_mean_var(x: torch.Tensor, mask: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance of the valid positions of ``x`` over all ranks of ``group``."""
    import torch.distributed as dist
    xs = _masked(x, mask)
    stats = torch.stack([mask.sum().to(xs.dtype), xs.sum()])
    dist.all_reduce(stats, group=group)
    n, total = stats[0], stats[1]
    mean = total / n.clamp(min=1)
    centered = torch.where(mask, xs - mean, torch.zeros((), dtype=xs.dtype, device=x.device))
    sq = (centered * centered).sum()
    dist.all_reduce(sq, group=group)
    return mean, sq / (n - 1).clamp(min=1)


# ------------------------------------------------------------------------------------------------ aggregation
def aggregate(values: torch.Tensor, mask: torch.Tensor, loss_agg: str = "token-mean") -> torch.Tensor:
    """Reduce per-token ``values [B, T]`` over valid tokens to a 0-dim loss.

    - "token-mean": sum over all valid tokens / their count.
    - "seq-mean-token-mean": each row's mean over its valid tokens, then the mean over rows with any.
    - "seq-mean-token-sum": each row's sum over its valid tokens, then the mean over rows with any.
    Leading dims beyond 2 are flattened into rows. No valid token at all gives 0 (and zero gradients).
    """
    check_loss_agg(loss_agg)
    mask = check_mask(mask, values.shape, "values")
    xs = _masked(values, mask)
    if loss_agg == "token-mean":
        return xs.sum() / mask.sum().to(xs.dtype).clamp(min=1)
    if xs.dim() == 0:
        raise ValueError(f"loss_agg={loss_agg!r} needs values of shape [B, T], got a 0-dim tensor")
    t = xs.shape[-1]
    xs, mask = xs.reshape(-1, t), mask.reshape(-1, t)
    row_sum = xs.sum(dim=-1)
    row_count = mask.sum(dim=-1).to(xs.dtype)
    row_val = row_sum / row_count.clamp(min=1) if loss_agg == "seq-mean-token-mean" else row_sum
    has_any = row_count > 0
    return torch.where(has_any, row_val, 0).sum() / has_any.sum().to(xs.dtype).clamp(min=1)


# --------------------------------------------------------------------------------------------------- PPO losses
def _check_tokens(ref_name: str, ref: torch.Tensor, mask, **others: torch.Tensor) -> torch.Tensor:
    check_tensor(ref_name, ref, floating=True)
    for k, v in others.items():
        check_tensor(k, v, floating=True)
    check_same_shape(ref.shape, ref_name, **others)
    return check_mask(mask, ref.shape, ref_name)


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float | None = None,
                    dual_clip: float | None = None, loss_agg: str = "token-mean",
                    log_ratio_clip: float | None = 20.0):
    """Clipped PPO surrogate (Schulman et al., 2017), clip-higher (DAPO, Yu et al., 2025) and dual clip
    (Ye et al., 2020). All ``[B, T]``; returns ``(loss 0-dim fp32, stats)``.

    ratio = exp(lp - old); l = max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high));
    dual clip c: where A < 0, l = min(l, -A c). ``log_ratio_clip``: lp - old clamped to +-that before exp
    (veRL's 20: one token far off would give an inf ratio and a NaN gradient; no gradient past it).
    Gradient flows through ratio only where the chosen branch is the unclipped one (ties go to the unclipped branch). stats: clipfrac, approx_kl
    (masked mean of (lp - old)^2 / 2), ratio_mean.
    """
    mask = _check_tokens("logprobs", logprobs, mask, old_logprobs=old_logprobs, advantages=advantages)
    clip_high = check_clip(clip_low, clip_high, dual_clip)
    dtype = _compute_dtype(logprobs)  # as the Triton path: fp32 unless logprobs are fp64
    log_ratio = _masked(logprobs, mask, dtype) - _masked(old_logprobs, mask, dtype)
    adv = _masked(advantages, mask, dtype)
    if log_ratio_clip is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clip, log_ratio_clip)
    ratio = torch.exp(log_ratio)
    surr = -adv * ratio
    surr_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    clipped = surr_clipped > surr
    per_token = torch.where(clipped, surr_clipped, surr)
    if dual_clip is not None:
        floor = -adv * dual_clip
        per_token = torch.where((adv < 0) & (floor < per_token), floor, per_token)
    loss = aggregate(per_token, mask, loss_agg)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean(clipped, mask).float(),
            "approx_kl": masked_mean(0.5 * log_ratio * log_ratio, mask).float(),
            "ratio_mean": masked_mean(ratio, mask).float(),
        }
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
                   clip: float | None = 0.2, loss_agg: str = "token-mean"):
    """Clipped value loss (Schulman et al., 2017, as in OpenAI baselines). All ``[B, T]``.

    l = 0.5 max((v - R)^2, (clip(v, old - clip, old + clip) - R)^2); ``clip=None``: 0.5 (v - R)^2.
    Returns ``(loss, {"vf_clipfrac"})``: the share of valid tokens where the clipped error is the larger.
    """
    mask = _check_tokens("values", values, mask, old_values=old_values, returns=returns)
    if clip is not None and not clip >= 0:
        raise ValueError(f"clip must be >= 0 or None, got {clip!r}")
    dtype = _compute_dtype(values)
    v, ret = _masked(values, mask, dtype), _masked(returns, mask, dtype)
    err = (v - ret).square()
    if clip is None:
        per_token, clipped = 0.5 * err, torch.zeros_like(mask)
    else:
        old = _masked(old_values, mask, dtype)
        err_clipped = (old + (v - old).clamp(-clip, clip) - ret).square()
        clipped = err_clipped > err
        per_token = 0.5 * torch.where(clipped, err_clipped, err)
    loss = aggregate(per_token, mask, loss_agg)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean(clipped, mask).float()}
    return loss, stats
