"""fused_ppo_loss / fused_ppo_loss_from_logits, Triton path (interpreter on CPU): against the PyTorch path
run in float64 on the same (exactly upcast) inputs.

Tolerances: loss rtol 1e-5 + atol 1e-6; stats atol 1e-5 + rtol 1e-4 (they are the reference functions
on fp32 log-probs); grads relative to the largest |grad|: 2e-6 for fp32 logits, 2 ulp of bf16 / fp16 when
dlogits are stored in those dtypes. From hidden states the logits matmul itself rounds to the input dtype
(as ``hidden @ W.T`` does): HIDDEN_TOL below, about 3x the measured errors, which match those of the
PyTorch path at the same dtype.
"""
from __future__ import annotations

import pytest
import torch

from fastrlhf.kernels import fused_ppo_loss, fused_ppo_loss_from_logits, reference, token_logprobs

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
GRAD_REL = {torch.float32: 2e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}
# From hidden states: (grad rel, loss (rtol, atol), stats (rtol, atol)). Measured max errors, triton path
# (and the PyTorch path at the same dtype): fp16 grads 9e-4 (7e-4), loss 7e-5, stats 9e-5; bf16 grads
# 6.7e-3 (4.7e-3), loss 5e-5, stats 6e-4; fp32 grads 8e-7, loss 4e-8, stats 1.2e-7.
HIDDEN_TOL = {torch.float32: (2e-6, (1e-5, 1e-6), (1e-4, 1e-5)),
              torch.float16: (3e-3, (1e-3, 2e-4), (1e-3, 1e-3)),
              torch.bfloat16: (2e-2, (1e-3, 2e-4), (1e-2, 3e-3))}
UPSTREAM = 2.5  # d(outer)/d(loss): backward must scale the gradient computed in forward


def _ppo_batch(B, T, V, kind, make_mask, garbage, seed=0, logits=None, temperature=1.0):
    """Logits (given or random) and PPO inputs where the new policy is near the old one (ratios both sides
    of the clip range), garbage (NaN/inf, out-of-range labels) at masked positions, an empty last row."""
    g = torch.Generator().manual_seed(seed)
    mask = make_mask(B, T, kind, seed=seed)
    logits = torch.randn(B, T, V, generator=g) * 2 if logits is None else logits
    labels = torch.randint(0, V, (B, T), generator=g)
    lp = reference.token_logprobs(logits, labels, temperature=temperature)
    old = lp + 0.3 * torch.randn(B, T, generator=g)
    ref = lp + 0.5 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    return dict(logits=garbage(logits, mask), labels=garbage(labels, mask), old=garbage(old, mask),
                adv=garbage(adv, mask), ref=garbage(ref, mask), mask=mask)


def _run(fn, src, d, kw, double=False):
    """Loss, stats and the grads of UPSTREAM * loss w.r.t. the differentiable sources ``src``."""
    up = (lambda t: t.double()) if double else (lambda t: t)
    leaves = [up(s).detach().requires_grad_(True) for s in src]
    loss, stats = fn(*leaves, d["labels"], up(d["old"]), up(d["adv"]), d["mask"],
                     **{**kw, "ref_logprobs": up(d["ref"])})
    (UPSTREAM * loss).backward()
    return loss.detach(), stats, [x.grad for x in leaves]


def _check(got, want, grad_rel, loss_tol=(1e-5, 1e-6), stats_tol=(1e-4, 1e-5)):
    (loss, stats, grads), (loss0, stats0, grads0) = got, want
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), loss0, rtol=loss_tol[0], atol=loss_tol[1])
    assert set(stats) == set(stats0) == {"clipfrac", "approx_kl", "ratio_mean", "kl", "entropy"}
    for k in stats:
        assert stats[k].dtype == torch.float32 and not stats[k].requires_grad
        torch.testing.assert_close(stats[k].double(), stats0[k].double(), rtol=stats_tol[0],
                                   atol=stats_tol[1], msg=k)
    for gr, gr0 in zip(grads, grads0):
        assert torch.isfinite(gr).all()
        torch.testing.assert_close(gr.double(), gr0, atol=grad_rel * gr0.abs().max().item(), rtol=0)


@pytest.mark.parametrize("loss_agg", AGGS)
@pytest.mark.parametrize("kl_kind", ["k1", "k2", "k3", "abs"])
def test_from_logits_matches_float64(interpret, loss_agg, kl_kind, make_mask, garbage):
    """(3, 37, 1031) fp32, every loss_agg x KL estimator, clip-higher, dual clip, entropy bonus, T = 0.8."""
    d = _ppo_batch(3, 37, 1031, "ragged" if kl_kind in ("k1", "k3") else "left", make_mask, garbage,
                   temperature=0.8)
    kw = dict(kl_coef=0.1, kl_kind=kl_kind, entropy_coef=0.01, clip_low=0.2, clip_high=0.28, dual_clip=1.5,
              temperature=0.8, loss_agg=loss_agg)
    got = _run(fused_ppo_loss_from_logits, [d["logits"]], d, {**kw, "backend": "triton"})
    want = _run(reference.fused_ppo_loss_from_logits, [d["logits"]], d, kw, double=True)
    _check(got, want, GRAD_REL[torch.float32])
    # both clips bind on some tokens: the clip on a good share, the dual clip changes the loss
    assert want[1]["clipfrac"] > 0.1
    no_dual = _run(reference.fused_ppo_loss_from_logits, [d["logits"]], d, {**kw, "dual_clip": None}, True)
    assert abs(no_dual[0] - want[0]) > 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_from_logits_half_dtypes(interpret, dtype, make_mask, garbage):
    """bf16/fp16 logits: fp32 math inside, dlogits written in the logits dtype; no dual clip, no KL."""
    d = _ppo_batch(3, 37, 1031, "holes", make_mask, garbage, seed=1)
    d["logits"] = d["logits"].to(dtype)
    kw = dict(entropy_coef=0.05, clip_low=0.2, loss_agg="seq-mean-token-sum")
    got = _run(fused_ppo_loss_from_logits, [d["logits"]], d, {**kw, "backend": "triton"})
    want = _run(reference.fused_ppo_loss_from_logits, [d["logits"]], d, kw, double=True)
    assert got[2][0].dtype == dtype
    _check(got, want, GRAD_REL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [8, None])
def test_from_hidden_matches_float64(interpret, dtype, chunk_size, make_mask, garbage):
    """hidden (3, 37, 48), weight (1031, 48), grads for both; chunks of 8 tokens (a ragged last chunk) or
    the default (one chunk); NaN in masked hidden rows must not reach grad_weight."""
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(3, 37, 48, generator=g), torch.randn(1031, 48, generator=g) * 0.3
    d = _ppo_batch(3, 37, 1031, "left", make_mask, garbage, seed=2, logits=hidden @ weight.t(), temperature=1.1)
    hidden, weight = garbage(hidden, d["mask"]).to(dtype), weight.to(dtype)
    kw = dict(kl_coef=0.05, kl_kind="k3", entropy_coef=0.01, dual_clip=1.5, temperature=1.1,
              loss_agg="token-mean")
    got = _run(fused_ppo_loss, [hidden, weight], d, {**kw, "chunk_size": chunk_size, "backend": "triton"})
    want = _run(reference.fused_ppo_loss, [hidden, weight], d, kw, double=True)
    # matmul rounding in the input dtype (the float64 oracle has none): see the module docstring
    grad_rel, loss_tol, stats_tol = HIDDEN_TOL[dtype]
    assert got[2][0].dtype == got[2][1].dtype == dtype
    _check(got, want, grad_rel, loss_tol, stats_tol)
    assert 0.05 < want[1]["clipfrac"] < 0.95


def test_return_logprobs_no_grad_and_empty_mask(interpret, make_mask, garbage):
    d = _ppo_batch(2, 9, 257, "ragged", make_mask, garbage, seed=4)
    loss, stats, lp = fused_ppo_loss_from_logits(d["logits"], d["labels"], d["old"], d["adv"], d["mask"],
                                                 return_logprobs=True, backend="triton")
    assert not lp.requires_grad and not loss.requires_grad and lp.shape == (2, 9)
    want = reference.token_logprobs(d["logits"].double(), torch.where(d["mask"], d["labels"], -100))
    torch.testing.assert_close(lp.double(), want, atol=1e-5, rtol=1e-6)
    empty = torch.zeros_like(d["mask"])
    x = d["logits"].clone().requires_grad_(True)
    loss, stats = fused_ppo_loss_from_logits(x, d["labels"], d["old"], d["adv"], empty, ref_logprobs=d["ref"],
                                             kl_coef=0.1, entropy_coef=0.1, backend="triton")
    loss.backward()
    assert loss.item() == 0 and (x.grad == 0).all() and all(v.item() == 0 for v in stats.values())


def test_under_autocast_matches_torch_path(interpret, make_mask, garbage):
    """fused_ppo_loss inside torch.autocast(bf16), fp32 leaves: same as the PyTorch path there (bf16 tol)."""
    g = torch.Generator().manual_seed(7)
    hidden, weight = torch.randn(2, 9, 16, generator=g), torch.randn(120, 16, generator=g) * 0.5
    d = _ppo_batch(2, 9, 120, "ragged", make_mask, garbage, seed=7, logits=hidden @ weight.t())
    out = []
    for backend in ("triton", "torch"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out.append(_run(fused_ppo_loss, [hidden, weight], d, dict(entropy_coef=0.01, backend=backend)))
    assert [gr.dtype for gr in out[0][2]] == [torch.float32] * 2
    want = (out[1][0].double(), out[1][1], [gr.double() for gr in out[1][2]])
    _check(out[0], want, *HIDDEN_TOL[torch.bfloat16])


def test_backward_twice(interpret):
    """From hidden states the gradient is computed in forward and scaled in place by backward: a second
    backward through the same graph must raise, never return a doubly scaled gradient. From logits the
    gradient is computed in backward (from saved lse/entropy/coefficients): a second backward with
    retain_graph adds the same gradient again, as any autograd op does."""
    x = torch.randn(2, 5, 33, requires_grad=True)
    labels, mask = torch.randint(0, 33, (2, 5)), torch.ones(2, 5, dtype=torch.bool)
    old, adv = torch.randn(2, 5), torch.randn(2, 5)
    loss, _ = fused_ppo_loss_from_logits(x, labels, old, adv, mask, backend="triton")
    loss.backward(retain_graph=True)
    once = x.grad.clone()
    (2 * loss).backward()
    torch.testing.assert_close(x.grad, 3 * once, atol=1e-7, rtol=1e-6)
    h, w = torch.randn(2, 5, 4, requires_grad=True), torch.randn(33, 4, requires_grad=True)
    loss, _ = fused_ppo_loss(h, w, labels, old, adv, mask, backend="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_auto_backend_and_errors(interpret, monkeypatch):
    x = torch.randn(2, 5, 33, requires_grad=True)
    labels, mask = torch.randint(0, 33, (2, 5)), torch.ones(2, 5, dtype=torch.bool)
    old, adv = torch.randn(2, 5), torch.randn(2, 5)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    want, _ = fused_ppo_loss_from_logits(x, labels, old, adv, mask)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fused_ppo_loss_from_logits(x, labels, old, adv, mask, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    got, _ = fused_ppo_loss_from_logits(x, labels, old, adv, mask)
    assert got.grad_fn.name() == "FusedPPOFromLogitsFunctionBackward"
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match=r"labels\[0, 1\] = 33"):
        bad = torch.tensor([[0, 33, 0, 0, 0], [0] * 5])
        fused_ppo_loss_from_logits(x, bad, old, adv, mask, backend="triton")
    with pytest.raises(ValueError, match="kl_coef"):
        fused_ppo_loss_from_logits(x, labels, old, adv, mask, kl_coef=0.1, backend="triton")
    with pytest.raises(ValueError, match="loss_agg"):
        fused_ppo_loss_from_logits(x, labels, old, adv, mask, loss_agg="mean", backend="triton")
    with pytest.raises(ValueError, match="dual_clip"):
        fused_ppo_loss(torch.randn(2, 5, 4), torch.randn(33, 4), labels, old, adv, mask, dual_clip=0.5,
                       backend="triton")


def test_no_full_float32_logits(interpret, float_guard, make_mask, garbage):
    """bf16 logits: nothing of N x V elements in fp32. fp32 hidden: nothing bigger than one chunk of logits
    (chunk_size=4 of 18 tokens), the weight grad or the hidden grad."""
    d = _ppo_batch(2, 9, 700, "full", make_mask, garbage, seed=5)
    x = d["logits"].bfloat16().requires_grad_(True)
    with float_guard() as guard:
        loss, _ = fused_ppo_loss_from_logits(x, d["labels"], d["old"], d["adv"], d["mask"], backend="triton")
        loss.backward()
    assert guard.largest <= 18
    h, w = torch.randn(2, 9, 16, requires_grad=True), torch.randn(700, 16, requires_grad=True)
    with float_guard() as guard:
        loss, _ = fused_ppo_loss(h, w, d["labels"], d["old"], d["adv"], d["mask"], chunk_size=4,
                                 backend="triton")
        loss.backward()
    assert guard.largest <= max(4 * 700, w.numel())


def test_no_gradient_work_under_no_grad(interpret, monkeypatch, make_mask, garbage):
    """Inputs that require grad, called under torch.no_grad(): no dlogits pass, no grad matmuls."""
    import sys
    mod = sys.modules["fastrlhf.kernels.ppo_loss"]
    calls = []
    real = mod.logprobs_backward
    monkeypatch.setattr(mod, "logprobs_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    d = _ppo_batch(2, 9, 70, "full", make_mask, garbage, seed=6)
    x = d["logits"].requires_grad_(True)
    h, w = torch.randn(2, 9, 16, requires_grad=True), torch.randn(70, 16, requires_grad=True)
    with torch.no_grad():
        fused_ppo_loss_from_logits(x, d["labels"], d["old"], d["adv"], d["mask"], backend="triton")
        fused_ppo_loss(h, w, d["labels"], d["old"], d["adv"], d["mask"], backend="triton")
    assert calls == []
    loss, _ = fused_ppo_loss(h, w, d["labels"], d["old"], d["adv"], d["mask"], backend="triton")
    assert calls == [1] and loss.requires_grad


def test_token_kernel_compiles_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    import sys

    from fastrlhf.kernels._triton_utils import compile_for_cuda
    mod = sys.modules["fastrlhf.kernels.ppo_loss"]
    sig = {k: "*fp32" for k in ("lp_ptr", "ent_ptr", "old_ptr", "adv_ptr", "ref_ptr", "w_ptr", "loss_ptr",
                                "g_lp_ptr", "g_ent_ptr")}
    sig.update(mask_ptr="*u8", N="i32", clip_lo="fp32", clip_hi="fp32", dual_clip="fp32", kl_coef="fp32",
               entropy_coef="fp32", log_ratio_clip="fp32")
    for kl_kind in range(5):
        compile_for_cuda(mod._ppo_token_kernel, sig, {"HAS_DUAL": kl_kind % 2 == 0, "KL_KIND": kl_kind,
                                                      "BLOCK": 1024})


@pytest.mark.gpu
@pytest.mark.parametrize("V,H", [(151936, 896), (151936, 2048), (128256, 4096)])
def test_gpu_real_shapes_bf16(V, H):
    """Compiled kernels, bf16 hidden and lm_head at real sizes, 4096 tokens: against the PyTorch path."""
    g = torch.Generator(device="cuda").manual_seed(0)
    B, T = 8, 512
    hidden = (torch.randn(B, T, H, device="cuda", generator=g)).bfloat16()
    weight = (torch.randn(V, H, device="cuda", generator=g) / H ** 0.5).bfloat16()
    labels = torch.randint(0, V, (B, T), device="cuda", generator=g)
    mask = torch.arange(T, device="cuda")[None] < torch.randint(1, T + 1, (B, 1), device="cuda", generator=g)
    with torch.no_grad():
        lp = token_logprobs(hidden.float() @ weight.float().t(), labels, backend="torch")
    old = lp + 0.2 * torch.randn(B, T, device="cuda", generator=g)
    adv = torch.randn(B, T, device="cuda", generator=g)
    kw = dict(ref_logprobs=old, kl_coef=0.05, entropy_coef=0.01, loss_agg="seq-mean-token-mean")
    out = []
    for backend in ("triton", "torch"):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss, stats = fused_ppo_loss(h, w, labels, old, adv, mask, backend=backend, **kw)
        loss.backward()
        out.append((loss.detach(), stats, h.grad.float(), w.grad.float()))
    (l1, s1, gh1, gw1), (l0, s0, gh0, gw0) = out
    torch.testing.assert_close(l1, l0, rtol=2e-2, atol=1e-3)
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(gh1, gh0, atol=3e-2 * gh0.abs().max().item(), rtol=0)
    torch.testing.assert_close(gw1, gw0, atol=3e-2 * gw0.abs().max().item(), rtol=0)


def test_from_logits_keeps_no_vocab_sized_buffer_until_backward(interpret, make_mask, garbage):
    """Between forward and backward only the caller's logits (not a copy) and [N] vectors are saved; the
    gradient, computed in backward, equals round 1's (computed in forward) and the float64 reference."""
    from fastrlhf.kernels._triton_utils import ROUND1
    from fastrlhf.kernels.ppo_loss import _fused_ppo_loss_from_logits_triton
    d = _ppo_batch(2, 7, 301, "left", make_mask, garbage, seed=8)
    kw = dict(kl_coef=0.1, kl_kind="k3", entropy_coef=0.02, loss_agg="seq-mean-token-mean")
    x = d["logits"].clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss, _ = fused_ppo_loss_from_logits(x, d["labels"], d["old"], d["adv"], d["mask"],
                                             ref_logprobs=d["ref"], backend="triton", **kw)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert big and all(t.data_ptr() == x.data_ptr() for t in big)
    assert all(t.numel() <= 14 for t in saved if t.data_ptr() != x.data_ptr())
    (UPSTREAM * loss).backward()
    x1 = d["logits"].clone().requires_grad_(True)
    all_kw = dict(ref_logprobs=d["ref"], kl_coef=0.1, kl_kind="k3", entropy_coef=0.02, clip_low=0.2,
                  clip_high=None, dual_clip=None, temperature=1.0, loss_agg="seq-mean-token-mean",
                  return_logprobs=False)
    loss1, _ = _fused_ppo_loss_from_logits_triton(x1, d["labels"], d["old"], d["adv"], d["mask"], all_kw, ROUND1)
    (UPSTREAM * loss1).backward()
    torch.testing.assert_close(loss, loss1, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x.grad, x1.grad, atol=2e-6 * x1.grad.abs().max().item(), rtol=0)
    want = _run(fused_ppo_loss_from_logits, [d["logits"]], d, kw, double=True)
    torch.testing.assert_close(x.grad.double(), want[2][0], atol=GRAD_REL[torch.float32] * want[2][0].abs().max(),
                               rtol=0)
