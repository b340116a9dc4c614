"""Bench: ``token_logprobs`` (log p(label) from logits) against eager, compile, Liger, TRL's idea.

Floor (bandwidth): the logits are read once forward; backward reads them again and writes their
gradient. fwd = N V e, bwd = 2 N V e, full = 3 N V e bytes (e = bytes per logit).
Target (issue 3): full >= 2x eager and within 1.25x of the floor on H100/H200, bf16.
"""
from __future__ import annotations

import pytest
import torch

from bench import eager, peers, variants
from bench.harness import Case, Floor, auto_backend, bench_profile, params, require, run_case
from fastrlhf.kernels import token_logprobs

NAME = "token_logprobs"
SHAPES = {
    "quick": [dict(B=4, T=32, V=2048)],
    "gpu": [dict(B=4, T=1024, V=151936), dict(B=8, T=2048, V=151936), dict(B=8, T=2048, V=128256),
            dict(B=16, T=2048, V=151936)],
}[bench_profile()]
DTYPE = torch.float32 if bench_profile() == "quick" else torch.bfloat16
PROVIDERS = ("fastrlhf", "fastrlhf_r1", "torch", "eager", "compile", "liger", "trl")


def floors(shape: dict, dtype: torch.dtype) -> dict:
    nve = shape["B"] * shape["T"] * shape["V"] * torch.finfo(dtype).bits / 8
    return {"fwd": Floor(bytes=nve), "bwd": Floor(bytes=2 * nve), "full": Floor(bytes=3 * nve)}


def make_inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    b, t, v = shape["B"], shape["T"], shape["V"]
    logits = torch.randn(b, t, v, generator=gen, device=device, dtype=dtype).mul_(2).requires_grad_(True)
    labels = torch.randint(0, v, (b, t), generator=gen, device=device)
    return {"logits": logits, "labels": labels}


def provider_fn(provider: str, device: torch.device):
    """(forward, reason it cannot run or None)."""
    return {
        "fastrlhf": (lambda logits, labels: token_logprobs(logits, labels), None),
        "fastrlhf_r1": (variants.token_logprobs, variants.reason(device)),
        "torch": (lambda logits, labels: token_logprobs(logits, labels, backend="torch"), None),
        "eager": (eager.token_logprobs, None),
        "compile": (lambda logits, labels: peers.compiled(eager.token_logprobs)(logits, labels),
                    peers.compile_reason(device)),
        "liger": (peers.liger_token_logprobs, peers.liger_reason(device)),
        "trl": (peers.trl_token_logprobs, None),
    }[provider]


@pytest.mark.parametrize("shape, provider, mode", params(SHAPES, PROVIDERS, first_shapes_only={"compile": 1}))
def test_bench_token_logprobs(benchmark, bench_session, shape, provider, mode):
    device = bench_session.device
    forward, reason = provider_fn(provider, device)
    require(bench_session, NAME, provider, reason)
    case = Case(NAME, provider, mode, shape, DTYPE, floors(shape, DTYPE))
    extra = {"backend": auto_backend(device)} if provider == "fastrlhf" else {}
    run_case(benchmark, bench_session, case, make_inputs=lambda: make_inputs(shape, DTYPE, device),
             forward=forward, reference=eager.token_logprobs, extra=extra)
