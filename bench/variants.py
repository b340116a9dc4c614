"""Round-1 variants of our kernels as bench providers (``fastrlhf_r1``), so one GPU call times old and new
side by side. They call the ops' private Triton entry points with ``Variant`` ROUND1: the per-block
forward row kernel, grad_W read-modify-written in the weight dtype once per chunk, ~256 MB token chunks,
and ``fused_ppo_loss_from_logits`` holding an [N, V] gradient from forward to backward. And
``fastrlhf_chunks``: round 2's ``linear_token_logprobs`` with the token-chunk backward (fp32 grad_W
accumulator) in place of the vocabulary split.
"""
from __future__ import annotations

import importlib

import torch

from fastrlhf.kernels._triton_utils import CURRENT, ROUND1

PROVIDER = "fastrlhf_r1"
# linear_token_logprobs with round 2's token-chunk backward (fp32 grad_W accumulator) instead of the
# vocabulary split that "auto" picks for N <= V: the two backwards of issue 14, timed side by side
CHUNKS = "fastrlhf_chunks"
_PPO_DEFAULTS = dict(ref_logprobs=None, kl_coef=0.0, kl_kind="k3", entropy_coef=0.0, clip_low=0.2,
                     clip_high=None, dual_clip=None, temperature=1.0, loss_agg="token-mean",
                     return_logprobs=False, log_ratio_clip=20.0)


def _mod(name: str):
    # by module: fastrlhf.kernels re-exports functions under their modules' names
    return importlib.import_module(f"fastrlhf.kernels.{name}")


def reason(device: torch.device) -> str | None:
    """The round-1 variants are Triton kernels: timed on CUDA only (the quick CPU mode runs no Triton)."""
    return None if device.type == "cuda" else "round-1 Triton variant: timed on CUDA only"


def token_logprobs(logits, labels):
    return _mod("logprobs")._token_logprobs_triton(logits, labels, 1.0, -100, False, ROUND1)


def linear_token_logprobs(hidden, weight, labels):
    return _mod("linear_logprobs")._linear_token_logprobs_triton(hidden, weight, labels, None, 1.0, -100,
                                                                 False, None, ROUND1)


def linear_token_logprobs_chunks(hidden, weight, labels):
    return _mod("linear_logprobs")._linear_token_logprobs_triton(hidden, weight, labels, None, 1.0, -100,
                                                                 False, None, CURRENT._replace(grad_w="fp32"))


def fused_ppo_loss(hidden, weight, labels, old_logprobs, advantages, mask, ref_logprobs, **loss):
    kw = {**_PPO_DEFAULTS, **loss, "ref_logprobs": ref_logprobs}
    return _mod("ppo_loss")._fused_ppo_loss_triton(hidden, weight, labels, old_logprobs, advantages, mask,
                                                   None, kw, ROUND1)[0]


def fused_ppo_loss_from_logits(logits, labels, old_logprobs, advantages, mask, ref_logprobs, **loss):
    kw = {**_PPO_DEFAULTS, **loss, "ref_logprobs": ref_logprobs}
    return _mod("ppo_loss")._fused_ppo_loss_from_logits_triton(logits, labels, old_logprobs, advantages, mask,
                                                               kw, ROUND1)[0]
