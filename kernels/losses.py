"""Small per-token RL math on [B, T] tensors: KL estimators, masked statistics, PPO policy / value losses.

Elementwise work on log-probs that are already computed; PyTorch only (no Triton kernel needed).
"""
from __future__ import annotations

import torch


def kl_estimate(logprobs, ref_logprobs, kind="k1"):
    raise NotImplementedError


def masked_mean(x, mask, dim=None):
    raise NotImplementedError


def masked_var(x, mask, unbiased=True):
    raise NotImplementedError


def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    raise NotImplementedError


def aggregate(values, mask, loss_agg="token-mean"):
    """Reduce per-token ``values [B, T]`` over valid tokens by ``loss_agg`` (see API.md)."""
    raise NotImplementedError


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, dual_clip=None,
                    loss_agg="token-mean"):
    raise NotImplementedError


def ppo_value_loss(values, old_values, returns, mask, *, clip=0.2, loss_agg="token-mean"):
    raise NotImplementedError
