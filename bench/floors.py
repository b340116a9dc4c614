"""Floors of the performance model (DESIGN.md): the device's copy bandwidth and matmul rate, measured once
per session, and ``Floor``, the bytes or FLOPs a case cannot avoid. When measuring fails, ENV.md's H100
figures stand in (3.0 TB/s counting bytes read and written, ~790 TFLOP/s bf16).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

# ENV.md, measured on the H100 machine: used when the session cannot measure its own rates.
H100_BANDWIDTH_BPS = 3.0e12
H100_MATMUL_FLOPS = 790e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure_bandwidth(device: torch.device) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read and written (as ENV.md's 3.0 TB/s does)."""
    numel = (1 << 28) if device.type == "cuda" else (1 << 23)  # 512 MiB bf16 on GPU, 32 MiB fp32 on CPU
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    src = torch.empty(numel, dtype=dtype, device=device).fill_(1)
    dst = torch.empty_like(src)
    seconds = _best_seconds(lambda: dst.copy_(src), device, repeats=10)
    return 2 * numel * src.element_size() / seconds


def measure_matmul(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul rate in FLOP/s for ``dtype`` (8192^3 on GPU, 512^3 on CPU)."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = _best_seconds(lambda: a @ b, device, repeats=10 if device.type == "cuda" else 3)
    return 2 * n ** 3 / seconds


@dataclass
class Rates:
    """Copy bandwidth (bytes/s) and matmul rate per dtype (FLOP/s) of the session's device."""
    device: torch.device
    bandwidth_bps: float | None = None
    matmul_flops: dict[str, float] = field(default_factory=dict)
    source: str = "measured"

    def bandwidth(self) -> float:
        if self.bandwidth_bps is None:
            try:
                self.bandwidth_bps = measure_bandwidth(self.device)
            except RuntimeError:
                self.bandwidth_bps, self.source = H100_BANDWIDTH_BPS, "ENV.md H100 figures"
        return self.bandwidth_bps

    def matmul(self, dtype: torch.dtype) -> float:
        key = str(dtype).replace("torch.", "")
        if key not in self.matmul_flops:
            try:
                self.matmul_flops[key] = measure_matmul(self.device, dtype)
            except RuntimeError:
                self.matmul_flops[key], self.source = H100_MATMUL_FLOPS, "ENV.md H100 figures"
        return self.matmul_flops[key]

    def as_dict(self) -> dict:
        return {"bandwidth_gbps": None if self.bandwidth_bps is None else self.bandwidth_bps / 1e9,
                "matmul_tflops": {k: v / 1e12 for k, v in self.matmul_flops.items()}, "source": self.source}


@dataclass(frozen=True)
class Floor:
    """Work a case cannot avoid: ``bytes`` moved (bandwidth floor) or ``flops`` done (matmul floor)."""
    bytes: float | None = None
    flops: float | None = None

    def ms(self, rates: Rates, dtype: torch.dtype) -> tuple[float | None, str | None]:
        if self.flops is not None:
            return 1e3 * self.flops / rates.matmul(dtype), "matmul"
        if self.bytes is not None:
            return 1e3 * self.bytes / rates.bandwidth(), "bandwidth"
        return None, None
