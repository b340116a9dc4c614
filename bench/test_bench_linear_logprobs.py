"""Bench: ``linear_token_logprobs`` (log-probs from hidden states and an lm_head, no [N, V] logits).

Floor (matmul): forward 2 N H V FLOPs (the logits), backward 4 N H V (grad hidden and grad weight);
full = 6 N H V. Peers: eager (materialized logits), compile, Liger's fused linear cross entropy
(reduction="none", negated), TRL's one-sequence-at-a-time logits.
Target (issue 3): full no slower than eager, faster than Liger, <= 1/4 of eager's peak memory.
"""
from __future__ import annotations

import pytest
import torch

from bench import eager, peers, variants
from bench.harness import Case, Floor, auto_backend, bench_profile, params, require, run_case
from fastrlhf.kernels import linear_token_logprobs

NAME = "linear_token_logprobs"
SHAPES = {
    "quick": [dict(B=4, T=32, H=64, V=2048)],
    "gpu": [dict(B=4, T=1024, H=896, V=151936), dict(B=8, T=2048, H=896, V=151936),
            dict(B=8, T=2048, H=2048, V=128256), dict(B=4, T=2048, H=4096, V=128256),
            dict(B=16, T=2048, H=4096, V=128256)],
}[bench_profile()]
DTYPE = torch.float32 if bench_profile() == "quick" else torch.bfloat16
PROVIDERS = ("fastrlhf", "fastrlhf_r1", "fastrlhf_chunks", "torch", "eager", "compile", "liger", "trl")


def floors(shape: dict) -> dict:
    nhv = shape["B"] * shape["T"] * shape["H"] * shape["V"]
    return {"fwd": Floor(flops=2 * nhv), "bwd": Floor(flops=4 * nhv), "full": Floor(flops=6 * nhv)}


def make_inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    b, t, h, v = shape["B"], shape["T"], shape["H"], shape["V"]
    hidden = torch.randn(b, t, h, generator=gen, device=device, dtype=dtype).requires_grad_(True)
    weight = torch.randn(v, h, generator=gen, device=device, dtype=dtype).mul_(h ** -0.5).requires_grad_(True)
    labels = torch.randint(0, v, (b, t), generator=gen, device=device)
    return {"hidden": hidden, "weight": weight, "labels": labels}


def provider_fn(provider: str, device: torch.device):
    """(forward, reason it cannot run or None)."""
    return {
        "fastrlhf": (lambda hidden, weight, labels: linear_token_logprobs(hidden, weight, labels), None),
        "fastrlhf_r1": (variants.linear_token_logprobs, variants.reason(device)),
        "fastrlhf_chunks": (variants.linear_token_logprobs_chunks, variants.reason(device)),
        "torch": (lambda hidden, weight, labels: linear_token_logprobs(hidden, weight, labels,
                                                                       backend="torch"), None),
        "eager": (eager.linear_token_logprobs, None),
        "compile": (lambda hidden, weight, labels: peers.compiled(eager.linear_token_logprobs)(hidden, weight,
                                                                                              labels),
                    peers.compile_reason(device)),
        "liger": (peers.liger_linear_token_logprobs, peers.liger_reason(device)),
        "trl": (peers.trl_linear_token_logprobs, None),
    }[provider]


@pytest.mark.parametrize("shape, provider, mode", params(SHAPES, PROVIDERS, first_shapes_only={"compile": 1}))
def test_bench_linear_token_logprobs(benchmark, bench_session, shape, provider, mode):
    device = bench_session.device
    forward, reason = provider_fn(provider, device)
    require(bench_session, NAME, provider, reason)
    case = Case(NAME, provider, mode, shape, DTYPE, floors(shape))
    extra = {"backend": auto_backend(device)} if provider == "fastrlhf" else {}
    run_case(benchmark, bench_session, case, make_inputs=lambda: make_inputs(shape, DTYPE, device),
             forward=forward, reference=eager.linear_token_logprobs, extra=extra)
