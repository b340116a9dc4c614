"""fastrlhf.kernels: fused per-token RL math, reusable by any trainer. Imports only torch and triton
(triton is optional: without it, e.g. on macOS, every op runs its PyTorch path).

Every op with a Triton kernel takes ``backend="auto" | "triton" | "torch"``; the PyTorch path
(``reference.py``) is the CPU fallback and the test oracle. See ../shared/API.md for exact semantics.
"""
from .gae import gae
from .linear_logprobs import linear_token_logprobs
from .logprobs import token_logprobs
from .losses import (aggregate, kl_estimate, masked_mean, masked_var, masked_whiten, ppo_policy_loss,
                     ppo_value_loss)
from .ppo_loss import fused_ppo_loss, fused_ppo_loss_from_logits

__all__ = [
    "token_logprobs", "linear_token_logprobs", "kl_estimate", "masked_mean", "masked_var", "masked_whiten",
    "aggregate", "gae", "ppo_policy_loss", "ppo_value_loss", "fused_ppo_loss", "fused_ppo_loss_from_logits",
]
