"""Bench: ``fused_ppo_loss`` (and ``fused_ppo_loss_from_logits``) against the eager composition.

The PPO objective benched: clip 0.2 / 0.28 (clip-higher), k3 KL to the reference with coefficient 0.05,
entropy bonus 0.01, token-mean; right-padded ragged rows (3/4 to all of T valid). Advantages are one value
per sequence (as GRPO and outcome-reward PPO give them), so Liger's fused GRPO loss (``loss_type="bnpo"``,
k3 KL, no entropy term) computes the same objective with the entropy bonus left out: it is checked
against eager with ``entropy_coef=0`` and timed on the same inputs.

Rows from hidden states carry ``pad`` (percent of padded tokens) in their ids, ``pad_fraction`` (measured)
and ``us_per_valid_token`` (median time / valid tokens): our op and the torch path multiply valid rows only
(issue 11), eager and Liger multiply every row.

Floors (valid tokens n): from hidden states, matmul: fwd 2 n H V, bwd 4 n H V, full 6 n H V FLOPs.
From logits, bandwidth: the loss is a scalar, so the gradient can be written during the forward read:
fwd N V e, full 2 N V e bytes. Our op computes the gradient in its forward, so its ``fwd`` row
includes the backward work and its ``bwd`` row is a scaling.
Target (issue 3): full >= 1.5x eager, <= 1/4 of its peak memory (H100/H200, bf16).
"""
from __future__ import annotations

import functools

import pytest
import torch

from bench import eager, peers, variants
from bench.harness import Case, Floor, auto_backend, bench_profile, params, require, run_case
from fastrlhf.kernels import fused_ppo_loss, fused_ppo_loss_from_logits, linear_token_logprobs

# ``pad``: percent of padded tokens (right padding, ragged rows; see ``row_lengths``), in the case ids.
SHAPES = {
    "quick": [dict(B=4, T=32, H=64, V=2048, pad=12), dict(B=4, T=32, H=64, V=2048, pad=50)],
    "gpu": [dict(B=8, T=1024, H=896, V=151936, pad=12), dict(B=16, T=1024, H=2048, V=128256, pad=12),
            dict(B=8, T=2048, H=4096, V=128256, pad=12), dict(B=8, T=2048, H=4096, V=128256, pad=50)],
}[bench_profile()]
LOGIT_SHAPES = {"quick": [dict(B=4, T=32, V=2048)],
                "gpu": [dict(B=8, T=1024, V=151936), dict(B=16, T=1024, V=128256)]}[bench_profile()]
DTYPE = torch.float32 if bench_profile() == "quick" else torch.bfloat16
LOSS = dict(kl_coef=0.05, kl_kind="k3", entropy_coef=0.01, clip_low=0.2, clip_high=0.28,
            loss_agg="token-mean")


def row_lengths(b: int, t: int, pad: int = 12) -> torch.Tensor:
    """Row lengths uniform in [t (1 - 2 pad / 100), t]: about ``pad`` percent padding (12: 3/4 t to t, the
    round-2 shapes; 50: 1 to t)."""
    gen = torch.Generator().manual_seed(1)
    return torch.randint(max(1, round(t * (1 - 2 * pad / 100))), t + 1, (b,), generator=gen)


def valid_tokens(shape: dict) -> int:
    return int(row_lengths(shape["B"], shape["T"], shape.get("pad", 12)).sum())


def make_inputs(shape: dict, dtype: torch.dtype, device: torch.device, *, from_logits: bool = False,
                next_position: bool = False) -> dict:
    """Leaves that need grad (hidden, weight or logits) plus old / ref log-probs near the current ones.

    ``next_position``: logits ``[B, T+1, V]`` (the layout Liger's Triton GRPO loss reads), the first T
    positions equal to the ``[B, T, V]`` logits of the other providers.
    """
    gen = torch.Generator(device=device).manual_seed(0)
    b, t, v = shape["B"], shape["T"], shape["V"]
    labels = torch.randint(0, v, (b, t), generator=gen, device=device)
    mask = torch.arange(t, device=device) < row_lengths(b, t, shape.get("pad", 12)).to(device)[:, None]
    if from_logits:
        logits = torch.randn(b, t + next_position, v, generator=gen, device=device, dtype=dtype).mul_(2)
        with torch.no_grad():
            lp = eager.token_logprobs(logits[:, :t], labels)
        src = {"logits": logits.requires_grad_(True)}
    else:
        h = shape["H"]
        hidden = torch.randn(b, t, h, generator=gen, device=device, dtype=dtype)
        weight = torch.randn(v, h, generator=gen, device=device, dtype=dtype).mul_(h ** -0.5)
        with torch.no_grad():  # the chunked PyTorch path: no [N, V] float32 copy while building inputs
            lp = linear_token_logprobs(hidden, weight, labels, backend="torch")
        src = {"hidden": hidden.requires_grad_(True), "weight": weight.requires_grad_(True)}
    noise = lambda: 0.1 * torch.randn(b, t, generator=gen, device=device)  # noqa: E731
    seq_adv = torch.randn(b, generator=gen, device=device)
    return {**src, "labels": labels, "old_logprobs": lp + noise(), "mask": mask,
            "advantages": seq_adv[:, None].expand(b, t), "ref_logprobs": lp + noise()}


def provider_fn(provider: str, device: torch.device):
    """(forward(hidden, weight, labels, old_logprobs, advantages, mask, ref_logprobs) -> loss, reason)."""
    def ours(backend):
        return lambda hidden, weight, labels, old_logprobs, advantages, mask, ref_logprobs: fused_ppo_loss(
            hidden, weight, labels, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs,
            backend=backend, **LOSS)[0]
    eager_fn = functools.partial(eager.ppo_loss, **LOSS)
    if provider == "liger":
        reason = peers.liger_reason(device, triton=False)
        if reason:
            return None, reason
        grpo = peers.liger_grpo_loss_fn(device, kl_coef=LOSS["kl_coef"], clip_low=LOSS["clip_low"],
                                        clip_high=LOSS["clip_high"])
        return (lambda hidden, weight, labels, old_logprobs, advantages, mask, ref_logprobs: grpo(
            hidden, weight, labels, old_logprobs, advantages[:, 0], mask, ref_logprobs)), None
    return {"fastrlhf": (ours("auto"), None), "torch": (ours("torch"), None), "eager": (eager_fn, None),
            "fastrlhf_r1": (functools.partial(variants.fused_ppo_loss, **LOSS), variants.reason(device)),
            "compile": (lambda *a, **k: peers.compiled(eager.ppo_loss)(*a, **k, **LOSS),
                        peers.compile_reason(device))}[provider]


def floors_hidden(shape: dict) -> dict:
    nhv = valid_tokens(shape) * shape["H"] * shape["V"]
    return {"fwd": Floor(flops=2 * nhv), "bwd": Floor(flops=4 * nhv), "full": Floor(flops=6 * nhv)}


@pytest.mark.parametrize("shape, provider, mode",
                         params(SHAPES, ("fastrlhf", "fastrlhf_r1", "torch", "eager", "compile", "liger"),
                                first_shapes_only={"compile": 1}))
def test_bench_fused_ppo_loss(benchmark, bench_session, shape, provider, mode):
    name, device = "fused_ppo_loss", bench_session.device
    forward, reason = provider_fn(provider, device)
    require(bench_session, name, provider, reason)
    same = {**LOSS, "entropy_coef": 0.0} if provider == "liger" else LOSS
    n_valid = valid_tokens(shape)
    # us_per_valid_token (harness): the time per valid token, the unit that padding cannot inflate
    extra = {"loss": LOSS, "valid_tokens": n_valid, "pad": shape["pad"],
             "pad_fraction": 1 - n_valid / (shape["B"] * shape["T"])}
    if provider == "fastrlhf":
        extra["backend"] = auto_backend(device)
    if provider == "liger":
        extra["note"] = "Liger fused GRPO (bnpo): same objective without the entropy bonus"
    run_case(benchmark, bench_session, Case(name, provider, mode, shape, DTYPE, floors_hidden(shape)),
             make_inputs=lambda: make_inputs(shape, DTYPE, device), forward=forward,
             reference=functools.partial(eager.ppo_loss, **same), extra=extra)


def logits_provider_fn(provider: str, device: torch.device):
    if provider == "liger":
        reason = peers.liger_reason(device)
        if reason:
            return None, reason
        grpo = peers.liger_grpo_from_logits_fn(kl_coef=LOSS["kl_coef"], clip_low=LOSS["clip_low"],
                                               clip_high=LOSS["clip_high"])
        return (lambda logits, labels, old_logprobs, advantages, mask, ref_logprobs: grpo(
            logits, labels, old_logprobs, advantages[:, 0].contiguous(), mask, ref_logprobs)), None

    def ours(backend):
        def fn(logits, labels, old_logprobs, advantages, mask, ref_logprobs):
            return fused_ppo_loss_from_logits(logits, labels, old_logprobs, advantages, mask,
                                              ref_logprobs=ref_logprobs, backend=backend, **LOSS)[0]
        return fn
    return {"fastrlhf": (ours("auto"), None), "torch": (ours("torch"), None),
            "fastrlhf_r1": (functools.partial(variants.fused_ppo_loss_from_logits, **LOSS),
                            variants.reason(device)),
            "eager": (functools.partial(eager.ppo_loss_from_logits, **LOSS), None),
            "compile": (lambda *a, **k: peers.compiled(eager.ppo_loss_from_logits)(*a, **k, **LOSS),
                        peers.compile_reason(device))}[provider]


@pytest.mark.parametrize("shape, provider, mode",
                         params(LOGIT_SHAPES, ("fastrlhf", "fastrlhf_r1", "torch", "eager", "compile", "liger"),
                                first_shapes_only={"compile": 1}))
def test_bench_fused_ppo_loss_from_logits(benchmark, bench_session, shape, provider, mode):
    name, device = "fused_ppo_loss_from_logits", bench_session.device
    forward, reason = logits_provider_fn(provider, device)
    require(bench_session, name, provider, reason)
    nve = shape["B"] * shape["T"] * shape["V"] * torch.finfo(DTYPE).bits / 8
    floors = {"fwd": Floor(bytes=nve), "bwd": Floor(bytes=nve), "full": Floor(bytes=2 * nve)}
    extra, same, liger = {"loss": LOSS}, LOSS, provider == "liger"
    if provider == "fastrlhf":
        extra["backend"] = auto_backend(device)
    if liger:
        same = {**LOSS, "entropy_coef": 0.0}
        extra["note"] = "Liger triton_grpo_loss (bnpo) on [B, T+1, V] logits: our objective without entropy"

    def reference(logits, **kw):
        return eager.ppo_loss_from_logits(logits[:, :shape["T"]], **kw, **same)
    run_case(benchmark, bench_session, Case(name, provider, mode, shape, DTYPE, floors),
             make_inputs=lambda: make_inputs(shape, DTYPE, device, from_logits=True, next_position=liger),
             forward=forward, reference=reference, extra=extra)
