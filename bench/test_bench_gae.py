"""Bench: ``gae`` against the Python loop over T (the library's reference, vectorised over B).

Rows are right-padded and ragged (half to all of T valid), with a hole every 97th column.
Floor (bandwidth): read rewards, values (fp32) and mask (bool), write advantages and returns (fp32):
B T (4 + 4 + 1 + 4 + 4) bytes. Forward only (GAE runs under no_grad in PPO).
Target (issue 3): >= 20x the Python loop at B=256, T=2048.
"""
from __future__ import annotations

import pytest
import torch

from bench import eager
from bench.harness import Case, Floor, auto_backend, bench_profile, params, require, run_case
from fastrlhf.kernels import gae

NAME = "gae"
SHAPES = {"quick": [dict(B=16, T=128)], "gpu": [dict(B=256, T=2048), dict(B=64, T=512)]}[bench_profile()]
GAMMA, LAM = 0.99, 0.95


def make_inputs(shape: dict, device: torch.device) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    b, t = shape["B"], shape["T"]
    lengths = torch.randint(max(1, t // 2), t + 1, (b, 1), generator=gen, device=device)
    cols = torch.arange(t, device=device)
    mask = (cols < lengths) & (cols % 97 != 96)
    return {"rewards": torch.randn(b, t, generator=gen, device=device),
            "values": torch.randn(b, t, generator=gen, device=device), "mask": mask}


def provider_fn(provider: str):
    return {
        "fastrlhf": lambda rewards, values, mask: gae(rewards, values, mask, gamma=GAMMA, lam=LAM),
        "eager": lambda rewards, values, mask: eager.gae_loop(rewards, values, mask, gamma=GAMMA, lam=LAM),
    }[provider]


@pytest.mark.parametrize("shape, provider, mode", params(SHAPES, ("fastrlhf", "eager", "torch"), ("fwd",)))
def test_bench_gae(benchmark, bench_session, shape, provider, mode):
    device = bench_session.device
    require(bench_session, NAME, provider,
            "the torch path of gae is the eager Python loop over T (kernels/reference.py): see 'eager'"
            if provider == "torch" else None)
    floors = {"fwd": Floor(bytes=shape["B"] * shape["T"] * 17)}
    extra = {"backend": auto_backend(device)} if provider == "fastrlhf" else {}
    run_case(benchmark, bench_session, Case(NAME, provider, mode, shape, torch.float32, floors),
             make_inputs=lambda: make_inputs(shape, device), forward=provider_fn(provider),
             reference=provider_fn("eager"), extra=extra)
