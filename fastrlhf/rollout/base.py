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
    """How responses are sampled. ``top_k=0`` and ``top_p=1.0`` mean no truncation."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None  # per-call seed for reproducible sampling


@dataclass
class Generation:
    """Ragged results, one entry per prompt, in prompt order.

    ``token_ids[i]``: response tokens of prompt i (ending with EOS when the model stopped);
    ``logprobs[i]``: the sampler's log-prob of each of them (same length), under ``temperature``.
    """

    token_ids: list[list[int]]
    logprobs: list[list[float]]


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Generation:
        """Sample one response per prompt (prompts are unpadded token id lists)."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new policy weights (HF parameter names). Later generations must use them."""

    def sleep(self, level: int = 1) -> None:
        """Release accelerator memory (weights offloaded, KV cache freed) until ``wake``."""

    def wake(self) -> None:
        """Bring back what ``sleep`` released."""
