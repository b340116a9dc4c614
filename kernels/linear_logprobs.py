"""linear_token_logprobs: token log-probs (and entropy) from hidden states and an lm_head, no [N, V] logits."""
from __future__ import annotations

import torch

from . import reference
from ._backend import resolve_backend


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0, ignore_index: int = -100,
                          return_entropy: bool = False, chunk_size: int | None = None, backend: str = "auto"):
    """``hidden [..., H]``, ``weight [V, H]``, ``labels [...]`` -> same as
    ``token_logprobs(hidden @ weight.T + bias, labels)``, holding logits for at most ``chunk_size`` tokens."""
    if resolve_backend(backend, hidden) == "torch":
        return reference.linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                               ignore_index=ignore_index, return_entropy=return_entropy,
                                               chunk_size=chunk_size)
    raise NotImplementedError("linear_token_logprobs: the Triton backend is not built yet; use backend='torch'")
