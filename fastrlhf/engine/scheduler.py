"""Phase scheduling around one PPO iteration: GENERATE -> SCORE -> TRAIN -> SYNC.

This first version only times phases and records peak accelerator memory; the hybrid engine
(memory plan, offload / onload, vLLM sleep / wake) builds on the same ``phase`` context manager,
so trainers written against it need no change.
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch

PHASES = ("generate", "score", "train", "sync")


class PhaseScheduler:
    """``with sched.phase("generate"): ...``; ``sched.pop_stats()`` -> {"time/generate_s": ..., ...}."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._stats: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; phases are {PHASES}")
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
                self._stats[f"mem/{name}_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            self._stats[f"time/{name}_s"] = self._stats.get(f"time/{name}_s", 0.0) + time.perf_counter() - start

    def pop_stats(self) -> dict[str, float]:
        stats, self._stats = self._stats, {}
        return stats
