"""Pure-PyTorch path of every fastrlhf.kernels op.

One implementation, three jobs: the CPU fallback (``backend="torch"``), the oracle the Triton
kernels are tested against, and the "eager" baseline of the bench suite. The public functions in
``logprobs.py``, ``linear_logprobs.py``, ``ppo_loss.py`` and ``gae.py`` validate inputs and
dispatch here for ``backend="torch"``.
"""
from __future__ import annotations

import torch


def token_logprobs(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False):
    raise NotImplementedError


def linear_token_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100,
                          return_entropy=False, chunk_size=None):
    raise NotImplementedError


def gae(rewards, values, mask, *, gamma=1.0, lam=0.95):
    raise NotImplementedError


def fused_ppo_loss(hidden, weight, labels, old_logprobs, advantages, mask, **kwargs):
    raise NotImplementedError


def fused_ppo_loss_from_logits(logits, labels, old_logprobs, advantages, mask, **kwargs):
    raise NotImplementedError
