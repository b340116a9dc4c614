"""Per-token RL math of fastrlhf.kernels (losses.py) and the PyTorch path of the fused PPO losses.

Hand-computed small cases for the formulas; the fused losses against their float64 composition
(``linear_token_logprobs`` -> ``ppo_policy_loss`` + KL - entropy, all library functions).
"""
from __future__ import annotations

import math

import pytest
import torch

from fastrlhf.kernels import (aggregate, fused_ppo_loss, fused_ppo_loss_from_logits, gae, kl_estimate,
                              linear_token_logprobs, masked_mean, masked_var, masked_whiten, ppo_policy_loss,
                              ppo_value_loss, reference)

NAN, INF, E = float("nan"), float("inf"), math.e
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


# --------------------------------------------------------------------------------------------------- kl_estimate
def test_kl_estimate_hand_values_and_grads():
    d = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    ref = torch.tensor([0.3, -0.1, -5.0], dtype=torch.float64)
    want = {"k1": [1.0, -2.0, 0.0], "k2": [0.5, 2.0, 0.0], "k3": [math.exp(-1), math.exp(2) - 3, 0.0],
            "abs": [1.0, 2.0, 0.0]}
    want_grad = {"k1": [1.0, 1.0, 1.0], "k2": [1.0, -2.0, 0.0], "k3": [1 - math.exp(-1), 1 - math.exp(2), 0.0]}
    for kind, values in want.items():
        lp = (ref + d).requires_grad_()
        kl = kl_estimate(lp, ref, kind)
        torch.testing.assert_close(kl, torch.tensor(values, dtype=torch.float64))
        if kind in want_grad:
            (g,) = torch.autograd.grad(kl.sum(), lp)
            torch.testing.assert_close(g, torch.tensor(want_grad[kind], dtype=torch.float64))


def test_kl_estimate_dtype_and_bad_kind():
    kl = kl_estimate(torch.zeros(2, 3, dtype=torch.bfloat16), torch.ones(2, 3, dtype=torch.bfloat16), "k3")
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, torch.full((2, 3), math.e - 2))
    with pytest.raises(ValueError, match="kl_kind must be one of"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "k4")


# --------------------------------------------------------------------------------------------- masked statistics
def test_masked_mean_hand_case_dims_and_empty():
    x = torch.tensor([[1.0, 2.0, NAN], [INF, 4.0, 8.0], [NAN, NAN, NAN]])
    m = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 0]])
    torch.testing.assert_close(masked_mean(x, m), torch.tensor(15.0 / 4))
    torch.testing.assert_close(masked_mean(x, m, dim=1), torch.tensor([1.5, 6.0, 0.0]))
    torch.testing.assert_close(masked_mean(x, m.bool(), dim=0), torch.tensor([1.0, 3.0, 8.0]))
    torch.testing.assert_close(masked_mean(x, torch.zeros_like(m)), torch.tensor(0.0))


def test_masked_var_matches_torch_var(make_mask, garbage):
    mask = make_mask(5, 17, "holes")
    x = torch.randn(5, 17, dtype=torch.float64)
    dirty = garbage(x, mask)
    torch.testing.assert_close(masked_var(dirty, mask), x[mask].var())
    torch.testing.assert_close(masked_var(dirty, mask, unbiased=False), x[mask].var(unbiased=False))
    one = torch.zeros(5, 17, dtype=torch.bool)
    one[2, 3] = True
    assert masked_var(dirty, one).item() == 0.0  # n - 1 = 0: defined as 0, not NaN


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_ignores_padding(shift_mean, make_mask, garbage):
    mask = make_mask(4, 23, "left")
    x = 3.0 + 2.0 * torch.randn(4, 23)
    w = masked_whiten(garbage(x, mask), mask, shift_mean=shift_mean)
    sel = x[mask].double()
    want = (sel - sel.mean()) / torch.sqrt(sel.var() + 1e-8) + (0 if shift_mean else sel.mean())
    assert (w[~mask] == 0).all() and w.dtype == torch.float32
    torch.testing.assert_close(w[mask].double(), want, rtol=1e-5, atol=1e-5)
    w_clean = masked_whiten(x, mask, shift_mean=shift_mean)
    torch.testing.assert_close(w, w_clean, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------- aggregate
def test_aggregate_hand_cases_with_empty_row():
    v = torch.tensor([[1.0, 2.0, NAN], [INF, 5.0, 6.0], [NAN, 8.0, 9.0]], requires_grad=True)
    m = torch.tensor([[1, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)
    want = {"token-mean": 9.0 / 3, "seq-mean-token-mean": (1.5 + 6.0) / 2, "seq-mean-token-sum": (3.0 + 6.0) / 2}
    want_grad = {"token-mean": [[1 / 3, 1 / 3, 0], [0, 0, 1 / 3], [0, 0, 0]],
                 "seq-mean-token-mean": [[0.25, 0.25, 0], [0, 0, 0.5], [0, 0, 0]],
                 "seq-mean-token-sum": [[0.5, 0.5, 0], [0, 0, 0.5], [0, 0, 0]]}
    for agg in LOSS_AGGS:
        out = aggregate(v, m, agg)
        torch.testing.assert_close(out, torch.tensor(want[agg]))
        (g,) = torch.autograd.grad(out, v)
        torch.testing.assert_close(g, torch.tensor(want_grad[agg]))


@pytest.mark.parametrize("agg", LOSS_AGGS)
def test_aggregate_all_empty_is_zero_not_nan(agg):
    v = torch.full((3, 4), NAN, requires_grad=True)
    out = aggregate(v, torch.zeros(3, 4, dtype=torch.bool), agg)
    (g,) = torch.autograd.grad(out, v)
    assert out.item() == 0.0 and (g == 0).all()


def test_aggregate_bad_mode():
    with pytest.raises(ValueError, match="loss_agg must be one of"):
        aggregate(torch.zeros(2, 2), torch.ones(2, 2), "seq-sum")


# ---------------------------------------------------------------------------------------------- ppo_policy_loss
def _policy_case():
    """Five tokens in one row (+ one masked NaN token). log ratios and advantages:
    0: ratio e, A=+1 -> clipped at 1.2: l = -1.2, no grad           (clip active)
    1: ratio e, A=-1 -> l = e, grad dl/dlp = e                       (unclipped)
    2: ratio 1.1, A=+2 -> inside the range: l = -2.2, grad -2.2      (unclipped)
    3: ratio 0.5, A=-1 -> clipped at 0.8: l = 0.8, no grad           (clip active)
    4: ratio 0.5, A=+1 -> l = -0.5, grad -0.5                        (unclipped, low side)
    """
    log_ratio = torch.tensor([[1.0, 1.0, math.log(1.1), math.log(0.5), math.log(0.5), NAN]], dtype=torch.float64)
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -0.2, NAN]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, 2.0, -1.0, 1.0, INF]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    lp = (old + log_ratio).requires_grad_()
    return lp, old, adv, mask


def test_ppo_policy_loss_hand_case():
    lp, old, adv, mask = _policy_case()
    loss, stats = ppo_policy_loss(lp, old, adv, mask)
    per_token = [-1.2, E, -2.2, 0.8, -0.5]
    torch.testing.assert_close(loss, torch.tensor(sum(per_token) / 5, dtype=torch.float64))
    (g,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(g, torch.tensor([[0.0, E, -2.2, 0.0, -0.5, 0.0]], dtype=torch.float64) / 5)
    log_r = [1.0, 1.0, math.log(1.1), math.log(0.5), math.log(0.5)]
    want = {"clipfrac": 2 / 5, "approx_kl": sum(0.5 * d * d for d in log_r) / 5,
            "ratio_mean": (2 * E + 1.1 + 0.5 + 0.5) / 5}
    for k, v in want.items():
        assert stats[k].dtype == torch.float32 and stats[k].dim() == 0 and not stats[k].requires_grad
        torch.testing.assert_close(stats[k], torch.tensor(v, dtype=torch.float32), msg=k)


def test_ppo_policy_loss_clip_high_and_dual_clip():
    lp, old, adv, mask = _policy_case()
    # clip_high 2.0 lets token 0 (ratio e < 3) through unclipped; the low side still clips token 3
    loss, stats = ppo_policy_loss(lp, old, adv, mask, clip_high=2.0)
    torch.testing.assert_close(loss, torch.tensor((-E + E - 2.2 + 0.8 - 0.5) / 5, dtype=torch.float64))
    torch.testing.assert_close(stats["clipfrac"], torch.tensor(1 / 5))
    # dual clip c=2 caps token 1 (A<0, l=e > 2) at -A*c = 2 (no grad); c=3 leaves it at e
    loss2, _ = ppo_policy_loss(lp, old, adv, mask, dual_clip=2.0)
    torch.testing.assert_close(loss2, torch.tensor((-1.2 + 2.0 - 2.2 + 0.8 - 0.5) / 5, dtype=torch.float64))
    (g,) = torch.autograd.grad(loss2, lp)
    assert g[0, 1] == 0
    loss3, _ = ppo_policy_loss(lp, old, adv, mask, dual_clip=3.0)
    torch.testing.assert_close(loss3, torch.tensor((-1.2 + E - 2.2 + 0.8 - 0.5) / 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        ppo_policy_loss(lp, old, adv, mask, dual_clip=1.0)


@pytest.mark.parametrize("agg", LOSS_AGGS)
def test_ppo_policy_loss_garbage_and_float64(agg, make_mask, garbage):
    mask = make_mask(4, 29, "ragged")
    lp = (-torch.rand(4, 29) * 3).requires_grad_()
    old, adv = lp.detach() + 0.3 * torch.randn(4, 29), torch.randn(4, 29)
    loss, stats = ppo_policy_loss(lp, old, adv, mask, loss_agg=agg, clip_high=0.28, dual_clip=3.0)
    (g,) = torch.autograd.grad(loss, lp)
    dirty = garbage(lp, mask)
    loss_d, stats_d = ppo_policy_loss(dirty, garbage(old, mask), garbage(adv, mask), mask, loss_agg=agg,
                                      clip_high=0.28, dual_clip=3.0)
    (g_d,) = torch.autograd.grad(loss_d, dirty)
    torch.testing.assert_close(loss_d, loss, rtol=0, atol=0)
    torch.testing.assert_close(g_d, g, rtol=0, atol=0)
    assert (g[~mask] == 0).all()
    for k in stats:
        torch.testing.assert_close(stats_d[k], stats[k], rtol=0, atol=0)
    lp64 = lp.detach().double().requires_grad_()
    loss64, _ = ppo_policy_loss(lp64, old.double(), adv.double(), mask, loss_agg=agg, clip_high=0.28,
                                dual_clip=3.0)
    (g64,) = torch.autograd.grad(loss64, lp64)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), g64, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------- ppo_value_loss
def test_ppo_value_loss_hand_case():
    v = torch.tensor([[1.5, 1.1, 3.0, NAN]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 1.0, INF]], dtype=torch.float64)
    ret = torch.tensor([[2.0, 2.0, 2.0, NAN]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    # 0: err 0.25 < clipped (1.2 - 2)^2 = 0.64 -> clipped, no grad; 1: inside range: 0.81;
    # 2: err 1.0 > clipped 0.64 -> unclipped, grad (v - R) = 1
    loss, stats = ppo_value_loss(v, old, ret, mask, clip=0.2)
    torch.testing.assert_close(loss, torch.tensor(0.5 * (0.64 + 0.81 + 1.0) / 3, dtype=torch.float64))
    (g,) = torch.autograd.grad(loss, v)
    torch.testing.assert_close(g, torch.tensor([[0.0, -0.9, 1.0, 0.0]], dtype=torch.float64) / 3)
    torch.testing.assert_close(stats["vf_clipfrac"], torch.tensor(1 / 3))
    assert not stats["vf_clipfrac"].requires_grad and stats["vf_clipfrac"].dtype == torch.float32
    loss_nc, stats_nc = ppo_value_loss(v, old, ret, mask, clip=None, loss_agg="seq-mean-token-sum")
    torch.testing.assert_close(loss_nc, torch.tensor(0.5 * (0.25 + 0.81 + 1.0), dtype=torch.float64))
    assert stats_nc["vf_clipfrac"].item() == 0.0


def test_loss_validation_errors():
    x, m = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="ref_logprobs must have the shape of logprobs"):
        kl_estimate(x, torch.zeros(2), "k1")
    with pytest.raises(ValueError, match="advantages must have the shape of logprobs"):
        ppo_policy_loss(x, x, torch.zeros(3, 2), m)
    with pytest.raises(ValueError, match="mask must have the shape of values"):
        ppo_value_loss(x, x, x, m[:1])
    with pytest.raises(TypeError, match="old_logprobs must be a floating"):
        ppo_policy_loss(x, x.long(), x, m)
    with pytest.raises(ValueError, match="clip_low must be in"):
        ppo_policy_loss(x, x, x, m, clip_low=1.5)
    with pytest.raises(ValueError, match="mask must have the shape of x"):
        masked_mean(x, m.T)


# ------------------------------------------------------------------------------------------------ fused losses
B, T, H, V = 3, 37, 24, 1031
PPO_KW = dict(kl_coef=0.05, entropy_coef=0.01, clip_low=0.2, clip_high=0.28, temperature=0.9)


def _ppo_case(dtype, mask, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / math.sqrt(H) * 2).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    with torch.no_grad():  # old / ref log-probs near the current ones: realistic ratios, some tokens clipped
        lp = linear_token_logprobs(hidden.double(), weight.double(), labels, temperature=0.9, backend="torch")
    old = (lp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(B, T, generator=g)
    ref = (lp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    return hidden, weight, labels, old, adv, ref, mask


def _rel_err_below(got, want, tol):
    """max |got - want| relative to max |want| (elementwise rtol is meaningless for grads near 0)."""
    err = ((got.double() - want).abs().max() / want.abs().max()).item()
    assert err <= tol, f"max rel err {err:.3g} > {tol:.3g}"


def _composition(hidden, weight, labels, old, adv, ref, mask, *, kl_coef, entropy_coef, clip_low, clip_high,
                 temperature, kl_kind, loss_agg):
    """The definition of fused_ppo_loss in API.md, from the library's own unfused functions."""
    lp, ent = linear_token_logprobs(hidden, weight, torch.where(mask, labels, -100), temperature=temperature,
                                    return_entropy=True, backend="torch")
    loss, _ = ppo_policy_loss(lp, old, adv, mask, clip_low=clip_low, clip_high=clip_high, loss_agg=loss_agg)
    kl = kl_estimate(lp, torch.where(mask, ref.to(lp.dtype), 0), kl_kind)
    return loss + kl_coef * aggregate(kl, mask, loss_agg) - entropy_coef * aggregate(ent, mask, loss_agg)


@pytest.mark.parametrize("agg,kl_kind,kind", [("token-mean", "k3", "ragged"), ("seq-mean-token-mean", "k1", "left"),
                                              ("seq-mean-token-sum", "k2", "holes"), ("token-mean", "abs", "left")])
def test_fused_ppo_loss_vs_float64_composition(agg, kl_kind, kind, make_mask):
    case = _ppo_case(torch.float32, make_mask(B, T, kind))
    loss, stats = fused_ppo_loss(*case[:5], case[6], ref_logprobs=case[5], kl_kind=kl_kind, loss_agg=agg,
                                 chunk_size=13, backend="torch", **PPO_KW)
    grads = torch.autograd.grad(loss, case[:2])
    c64 = [t.detach().double().requires_grad_() if t.is_floating_point() else t for t in case]
    c64[:2] = [t.requires_grad_() for t in c64[:2]]
    want = _composition(*c64, kl_kind=kl_kind, loss_agg=agg, **PPO_KW)
    want_grads = torch.autograd.grad(want, c64[:2])
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    for got, w in zip(grads, want_grads):
        _rel_err_below(got, w, 1e-5)
    assert set(stats) == {"clipfrac", "approx_kl", "ratio_mean", "kl", "entropy"}
    assert all(s.dtype == torch.float32 and s.dim() == 0 and not s.requires_grad for s in stats.values())


def test_fused_ppo_loss_bf16_inputs(make_mask):
    case = _ppo_case(torch.bfloat16, make_mask(B, T, "left"))
    loss, stats, lp = fused_ppo_loss(*case[:5], case[6], ref_logprobs=case[5], chunk_size=32, return_logprobs=True,
                                     backend="torch", **PPO_KW)
    grads = torch.autograd.grad(loss, case[:2])
    c64 = [t.detach().double().requires_grad_() if t.is_floating_point() else t for t in case]
    want = _composition(*c64, kl_kind="k3", loss_agg="token-mean", **PPO_KW)
    want_grads = torch.autograd.grad(want, c64[:2])
    assert loss.dtype == lp.dtype == torch.float32 and not lp.requires_grad
    # logits are rounded to bf16 inside (matmul in the input dtype); measured: loss err 4.3e-4, rel grad 8.6e-3
    torch.testing.assert_close(loss.double(), want, rtol=0, atol=3e-3)
    for got, w in zip(grads, want_grads):
        _rel_err_below(got, w, 2e-2)


def test_fused_ppo_loss_under_autocast(make_mask):
    hidden, weight, labels, old, adv, ref, mask = _ppo_case(torch.float32, make_mask(B, T, "ragged"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = fused_ppo_loss(hidden, weight, labels, old, adv, mask, ref_logprobs=ref, backend="torch", **PPO_KW)
    g_got = torch.autograd.grad(got, (hidden, weight))
    low = [t.detach().bfloat16().requires_grad_() for t in (hidden, weight)]
    want, _ = fused_ppo_loss(*low, labels, old, adv, mask, ref_logprobs=ref, backend="torch", **PPO_KW)
    g_want = torch.autograd.grad(want, low)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g, w in zip(g_got, g_want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w.float(), rtol=0, atol=0)


def test_fused_ppo_loss_garbage_chunks_and_logprobs(make_mask, garbage):
    mask = make_mask(B, T, "holes")
    hidden, weight, labels, old, adv, ref, _ = _ppo_case(torch.float32, mask)
    outs = []
    for chunk, dirty in ((1, False), (7, True), (None, True)):
        h = garbage(hidden, mask) if dirty else hidden
        args = [garbage(t, mask) if dirty else t for t in (labels, old, adv, ref)]
        loss, stats, lp = fused_ppo_loss(h, weight, args[0], args[1], args[2], mask, ref_logprobs=args[3],
                                         chunk_size=chunk, return_logprobs=True, backend="torch", **PPO_KW)
        outs.append((loss, *torch.autograd.grad(loss, (h, weight)), lp, *stats.values()))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.isfinite(b).all()
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    lp_direct = linear_token_logprobs(hidden, weight, torch.where(mask, labels, -100), temperature=0.9,
                                      backend="torch")
    torch.testing.assert_close(outs[0][3], lp_direct.detach())
    assert (outs[0][1][~mask] == 0).all()


@pytest.mark.parametrize("agg", LOSS_AGGS)
def test_fused_ppo_loss_from_logits_matches_hidden_version(agg, make_mask, garbage):
    mask = make_mask(B, T, "ragged")
    hidden, weight, labels, old, adv, ref, _ = _ppo_case(torch.float64, mask)
    kw = dict(ref_logprobs=ref, loss_agg=agg, dual_clip=3.0, **PPO_KW)
    want, want_stats = fused_ppo_loss(hidden, weight, labels, old, adv, mask, backend="torch", **kw)
    (want_g,) = torch.autograd.grad(want, hidden)
    logits = garbage(hidden @ weight.T, mask).requires_grad_()
    got, got_stats = fused_ppo_loss_from_logits(logits, labels, old, adv, mask, backend="torch", **kw)
    (g_logits,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_logits @ weight.detach(), want_g)
    for k in want_stats:
        torch.testing.assert_close(got_stats[k], want_stats[k])
    small, _ = reference.fused_ppo_loss_from_logits(logits, labels, old, adv, mask, chunk_size=5, **kw)
    torch.testing.assert_close(small, got)


def test_fused_ppo_loss_all_masked_and_no_ref():
    case = _ppo_case(torch.float32, torch.zeros(B, T, dtype=torch.bool))
    loss, stats = fused_ppo_loss(*case[:5], case[6], entropy_coef=0.1, backend="torch")
    grads = torch.autograd.grad(loss, case[:2])
    assert loss.item() == 0.0 and all((g == 0).all() for g in grads)
    assert all(s.item() == 0.0 for s in stats.values())


def test_fused_ppo_loss_validation_errors(make_mask):
    hidden, weight, labels, old, adv, ref, mask = _ppo_case(torch.float32, make_mask(B, T, "ragged"))
    with pytest.raises(ValueError, match="kl_coef=0.1 needs ref_logprobs"):
        fused_ppo_loss(hidden, weight, labels, old, adv, mask, kl_coef=0.1, backend="torch")
    with pytest.raises(ValueError, match="advantages must have the shape of labels"):
        fused_ppo_loss(hidden, weight, labels, old, adv[:, :5], mask, backend="torch")
    with pytest.raises(ValueError, match="mask must have the shape of labels"):
        fused_ppo_loss(hidden, weight, labels, old, adv, mask[:2], backend="torch")
    bad = labels.clone()
    bad[0, 0] = V
    with pytest.raises(ValueError, match=r"labels must be in \[0, 1031\)"):
        fused_ppo_loss(hidden, weight, bad, old, adv, torch.ones_like(mask), backend="torch")
    with pytest.raises(ValueError, match="kl_kind must be one of"):
        fused_ppo_loss(hidden, weight, labels, old, adv, mask, ref_logprobs=ref, kl_kind="kl", backend="torch")
    with pytest.raises(ValueError, match="loss_agg must be one of"):
        fused_ppo_loss(hidden, weight, labels, old, adv, mask, loss_agg="mean", backend="torch")


def test_policy_loss_dtype_follows_logprobs_only():
    """fp32 log-probs with fp64 old log-probs / advantages give an fp32 loss, as on the Triton path."""
    lp = torch.randn(2, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    loss, _ = ppo_policy_loss(lp, lp.double() + 0.1, torch.randn(2, 5, dtype=torch.float64), mask)
    assert loss.dtype == torch.float32


def test_gae_is_detached_on_every_path():
    values = torch.randn(2, 4, requires_grad=True)
    adv, ret = gae(torch.randn(2, 4), values, torch.ones(2, 4, dtype=torch.bool), backend="torch")
    assert not adv.requires_grad and not ret.requires_grad
