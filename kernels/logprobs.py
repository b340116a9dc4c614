"""token_logprobs: log-probability (and entropy) of labels under softmax(logits / T).

Triton path: one pass with an online logsumexp over vocabulary blocks; backward writes dlogits directly.
"""
from __future__ import annotations

import torch

from . import reference
from ._backend import resolve_backend


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                   ignore_index: int = -100, return_entropy: bool = False, backend: str = "auto"):
    """``logits [..., V]``, ``labels [...]`` int64 -> ``logprobs [...]`` fp32 (and ``entropy [...]``).

    logprob = x[label]/T - logsumexp(x/T); entropy = logsumexp(x/T) - sum_v p_v x_v/T.
    0.0 where ``labels == ignore_index``.
    """
    if resolve_backend(backend, logits) == "torch":
        return reference.token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index,
                                        return_entropy=return_entropy)
    raise NotImplementedError("token_logprobs: the Triton backend is not built yet; use backend='torch'")
