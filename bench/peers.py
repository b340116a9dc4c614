"""Providers other than ours: torch.compile of the eager composition, Liger-Kernel, and TRL's idea.

Each ``*_reason(device)`` returns None when the provider can run here, else the reason it cannot (the
harness lists it under ``not_run`` in the JSON). What is compared, and how it differs from our op:

- ``compile``: ``torch.compile`` of the functions in ``bench/eager.py`` (same math).
- ``liger`` (Liger-Kernel 0.8.5, when importable):
  token_logprobs <- ``-liger_cross_entropy(logits, labels, reduction="none")`` (Triton; computes the
  gradient in the forward and writes it over the input logits, so the harness checks it before timing);
  linear_token_logprobs <- ``-liger_fused_linear_cross_entropy(..., reduction="none")`` (Triton);
  fused_ppo_loss <- ``LigerFusedLinearGRPOLoss`` (chunked PyTorch, ``loss_type="bnpo"`` = token-mean,
  k3 KL to the reference) and fused_ppo_loss_from_logits <- ``triton_grpo_loss`` (Triton, same loss
  type): GRPO losses, which take one advantage per sequence and have no entropy term; with per-sequence
  advantages they compute our objective without the entropy bonus (checked against eager so).
- ``trl``: TRL is not installed and not copied; its documented idea is reproduced here: log-softmax one
  sequence at a time ("selective log-softmax", bounding the forward's float32 copy to one row), and for
  log-probs from hidden states the logits of one sequence at a time (the model's micro-batch loop).
  Autograd still saves every row's tensors for the backward, as it does in TRL.
- veRL's fused linear-entropy kernel: not installed and not a pip package on its own; listed as not run.
"""
from __future__ import annotations

import os

import torch

VERL_REASON = "veRL's fused kernel ships inside the verl package (not installed; no standalone wheel)"


def compile_reason(device: torch.device) -> str | None:
    if device.type == "cuda" or os.environ.get("FASTRLHF_BENCH_COMPILE") == "1":
        return None
    return ("torch.compile (inductor) on CPU costs tens of seconds per shape: over the quick-mode budget; "
            "FASTRLHF_BENCH_COMPILE=1 runs it")


_COMPILED: dict = {}


def compiled(fn):
    """One ``torch.compile`` wrapper per function for the whole session (recompiles per shape)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn)
    return _COMPILED[fn]


def liger_reason(device: torch.device, *, triton: bool = True) -> str | None:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return "liger-kernel is not installed (on the GPU machine carry its wheel: bench/README.md)"
    try:  # the modules used below; an incompatible torch / triton shows up here, not as a failed case
        import liger_kernel.chunked_loss  # noqa: F401
        import liger_kernel.transformers.functional  # noqa: F401
    except Exception as err:  # noqa: BLE001  (any import-time failure means: cannot compare here)
        return f"liger-kernel does not import here: {type(err).__name__}: {err}"
    if triton and device.type != "cuda":
        return "Liger's Triton kernels need a GPU (the Triton interpreter is too slow for the bench)"
    return None


def liger_token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_cross_entropy
    v = logits.shape[-1]
    nll = liger_cross_entropy(logits.reshape(-1, v), labels.reshape(-1), reduction="none")
    return -nll.reshape(labels.shape)


def liger_linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor,
                                labels: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    h = hidden.shape[-1]
    nll = liger_fused_linear_cross_entropy(hidden.reshape(-1, h), weight, labels.reshape(-1),
                                           reduction="none")
    return -nll.reshape(labels.shape)


def liger_grpo_loss_fn(device: torch.device, *, kl_coef: float, clip_low: float, clip_high: float):
    """``fn(hidden, weight, labels, old_logprobs, seq_advantages, mask, ref_logprobs) -> loss``."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    module = LigerFusedLinearGRPOLoss(beta=kl_coef, compiled=device.type == "cuda", use_ref_model=True,
                                      epsilon_low=clip_low, epsilon_high=clip_high, loss_type="bnpo")

    def fn(hidden, weight, labels, old_logprobs, seq_advantages, mask, ref_logprobs):
        loss, _metrics = module(hidden, weight, labels, mask.to(hidden.dtype), seq_advantages,
                                ref_per_token_logps=ref_logprobs, old_per_token_logps=old_logprobs)
        return loss

    return fn


def liger_grpo_from_logits_fn(*, kl_coef: float, clip_low: float, clip_high: float):
    """``fn(logits [B, T+1, V], labels, old_logprobs, seq_advantages, mask, ref_logprobs) -> loss``:
    Liger's Triton GRPO loss (``triton_grpo_loss``, ``loss_type="bnpo"``, temperature 1), which reads the
    logits of positions ``0..T-1`` of a ``T+1``-long sequence, as a causal LM's output is laid out."""
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    def fn(logits, labels, old_logprobs, seq_advantages, mask, ref_logprobs):
        loss, _metrics = triton_grpo_loss(logits, old_logprobs, ref_logprobs, labels, seq_advantages,
                                          mask.int(), temperature=1.0, beta=kl_coef, eps_low=clip_low,
                                          eps_high=clip_high, loss_type="bnpo", reduce=True)
        return loss

    return fn


def trl_token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``logits [B, T, V]``: float32 log-softmax of one sequence at a time, then gather."""
    rows = []
    for row_logits, row_labels in zip(logits, labels):
        logp = torch.log_softmax(row_logits.float(), dim=-1)
        rows.append(logp.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)


def trl_linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor,
                              labels: torch.Tensor) -> torch.Tensor:
    """``hidden [B, T, H]``: the logits of one sequence at a time, each through ``trl_token_logprobs``."""
    rows = [trl_token_logprobs((h @ weight.T).unsqueeze(0), y.unsqueeze(0))[0]
            for h, y in zip(hidden, labels)]
    return torch.stack(rows)
