"""The generation interface every rollout backend implements (HF generate, vLLM).

Small on purpose: what PPO needs from an inference engine, and what a hybrid engine needs to
time-share the GPU with training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How responses are sampled. ``top_k=0`` and ``top_p=1.0`` mean no truncation.

    ``n`` samples per prompt. ``seed`` seeds the whole call (one stream per batch, not per request):
    the same prompts, weights and seed give the same samples.

    Log-prob semantics, the same in every backend: the log-prob of the sampled token under the
    distribution it was drawn from, i.e. ``softmax(logits / temperature)`` restricted to the top-k /
    top-p set and renormalised (vLLM's ``processed_logprobs``). Without truncation this is the policy's
    own log-prob; with it, the sampler is a different policy than the trainer's, and the gap shows up in
    ``logprob_mismatch_*`` and is what ``rollout_correction=tis`` corrects for.
    """

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None  # per-call seed for reproducible sampling
    n: int = 1


@dataclass
class Generation:
    """Ragged results, ``n`` entries per prompt, prompt-major (rows ``i*n .. i*n+n-1``: prompt ``i``).

    ``token_ids[i]``: response tokens of prompt i (ending with EOS when the model stopped);
    ``logprobs[i]``: the sampler's log-prob of each of them (same length), under ``temperature``.
    """

    token_ids: list[list[int]]
    logprobs: list[list[float]]


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Generation:
        """Sample ``params.n`` responses per prompt, prompt-major (prompts are unpadded token id lists)."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new policy weights (HF parameter names). Later generations must use them."""

    def sleep(self, level: int = 1) -> None:
        """Release accelerator memory (weights offloaded, KV cache freed) until ``wake``."""

    def wake(self) -> None:
        """Bring back what ``sleep`` released."""
