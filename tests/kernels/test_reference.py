"""PyTorch path of fastrlhf.kernels: token_logprobs, linear_token_logprobs, gae (reference.py).

Oracle: the same library function on float64 inputs (or, for linear_token_logprobs, the unchunked
composition ``token_logprobs(hidden @ W.T + b)`` in float64), plus torch's own log_softmax in float64
and small hand-computed cases. The fused PPO losses are tested in test_losses.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastrlhf.kernels import gae, linear_token_logprobs, reference, token_logprobs

# Tolerances against the float64 oracle on the *same* (already rounded) inputs. Forward math is fp32 for
# every input dtype, so forward tolerances are tight; gradients are rounded to the input dtype.
# Measured (2026-11, this CPU): fwd errors ~2e-6 for all dtypes; rel grad errors 5e-7 / 2.3e-3 / 2.7e-4.
FWD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
GRAD_TOL = {torch.float32: 5e-6, torch.bfloat16: 5e-3, torch.float16: 1e-3}  # relative to max |grad|
# linear: the logits matmul itself runs in the input dtype (as hidden @ W.T would).
# Measured: fwd 3e-6 / 0.04 / 5e-3 (bf16: logits rounded to bf16, ulp ~0.03 at |z| ~ 4), rel grad 1e-6 / 0.018 / 1.5e-3.
LIN_FWD_TOL = {torch.float32: 2e-5, torch.bfloat16: 0.1, torch.float16: 0.015}
LIN_GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 0.04, torch.float16: 5e-3}
SHAPE = (3, 37, 1031)


def _close(a, b, tol, what):
    a, b = a.double(), b.double()
    err = (a - b).abs().max().item()
    assert err <= tol, f"{what}: max abs err {err:.3g} > {tol:.3g}"


def _rel_close(a, b, tol, what):
    a, b = a.double(), b.double()
    err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
    assert err <= tol, f"{what}: max rel err {err:.3g} > {tol:.3g}"


def _labels(mask, vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, vocab, mask.shape, generator=g)
    return torch.where(mask, y, -100)


def _logits(shape, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g)).to(dtype).requires_grad_()


def _lp_ent_grads(x, y, g_lp, g_ent, **kw):
    # chunk_size is a keyword of the reference only (the public token_logprobs picks its own)
    lp, ent = reference.token_logprobs(x, y, return_entropy=True, **kw)
    (grad,) = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), x)
    return lp, ent, grad


# ------------------------------------------------------------------------------------------------ token_logprobs
def test_token_logprobs_hand_case_uniform_and_onehot():
    v = 5
    x = torch.zeros(2, v)
    x[1] = torch.tensor([0.0, -math.inf, -math.inf, -math.inf, -math.inf])
    lp, ent = token_logprobs(x, torch.tensor([3, 0]), return_entropy=True, backend="torch")
    torch.testing.assert_close(lp, torch.tensor([-math.log(v), 0.0]))
    torch.testing.assert_close(ent, torch.tensor([math.log(v), 0.0]))


def test_token_logprobs_matches_torch_log_softmax_float64():
    x = _logits((4, 9, 67), torch.float64)
    y = torch.randint(0, 67, (4, 9))
    y[0, :3] = -100
    lp, ent = token_logprobs(x, y, temperature=0.7, return_entropy=True, backend="torch")
    ls = torch.log_softmax(x / 0.7, -1)
    want_lp = ls.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1).masked_fill(y == -100, 0)
    want_ent = -(ls.exp() * ls).sum(-1).masked_fill(y == -100, 0)
    torch.testing.assert_close(lp, want_lp, rtol=0, atol=1e-12)
    torch.testing.assert_close(ent, want_ent, rtol=0, atol=1e-12)


def test_token_logprobs_gradcheck_float64():
    x = _logits((2, 3, 11), torch.float64)
    y = torch.tensor([[1, -100, 4], [10, 0, -100]])
    fn = lambda x: reference.token_logprobs(x, y, return_entropy=True, temperature=1.3, chunk_size=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["ragged", "left"])
def test_token_logprobs_vs_float64(dtype, kind, make_mask):
    mask = make_mask(SHAPE[0], SHAPE[1], kind)
    y = _labels(mask, SHAPE[-1])
    x = _logits(SHAPE, dtype)
    g_lp, g_ent = torch.randn(SHAPE[:2]), torch.randn(SHAPE[:2])
    lp, ent, grad = _lp_ent_grads(x, y, g_lp, g_ent, temperature=0.9)
    x64 = x.detach().double().requires_grad_()
    lp64, ent64, grad64 = _lp_ent_grads(x64, y, g_lp.double(), g_ent.double(), temperature=0.9)
    assert lp.dtype == ent.dtype == torch.float32 and grad.dtype == dtype
    _close(lp, lp64, FWD_TOL[dtype], "logprobs")
    _close(ent, ent64, FWD_TOL[dtype], "entropy")
    _rel_close(grad, grad64, GRAD_TOL[dtype], "grad")
    assert (lp[~mask] == 0).all() and (ent[~mask] == 0).all() and (grad[~mask] == 0).all()


def test_token_logprobs_garbage_in_ignored_rows(make_mask, garbage):
    mask = make_mask(4, 13, "left")
    y = _labels(mask, 97)
    x = _logits((4, 13, 97), torch.float32)
    dirty = garbage(x, mask)
    g_lp, g_ent = torch.randn(4, 13), torch.randn(4, 13)
    clean_out = _lp_ent_grads(x, y, g_lp, g_ent)
    dirty_out = _lp_ent_grads(dirty, y, g_lp, g_ent)
    for c, d in zip(clean_out, dirty_out):
        assert torch.isfinite(d).all()
        torch.testing.assert_close(d, c, rtol=0, atol=0)


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_token_logprobs_chunk_invariance(chunk):
    x = _logits((5, 11, 131), torch.float32)
    y = torch.randint(0, 131, (5, 11))
    y[2, 3:] = -100
    g_lp, g_ent = torch.randn(5, 11), torch.randn(5, 11)
    want = _lp_ent_grads(x, y, g_lp, g_ent, chunk_size=55)
    got = _lp_ent_grads(x, y, g_lp, g_ent, chunk_size=chunk)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_token_logprobs_extreme_logits():
    x = _logits((6, 257), torch.float32, scale=1e4)
    with torch.no_grad():
        x[:, 5:40] = -math.inf
    y = torch.randint(40, 257, (6,))
    lp, ent, grad = _lp_ent_grads(x, y, torch.randn(6), torch.randn(6))
    x64 = x.detach().double().requires_grad_()
    lp64, ent64, _ = _lp_ent_grads(x64, y, torch.randn(6).double(), torch.randn(6).double())
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(grad).all()
    _close(lp, lp64, 1e-3 * 1e4 * 1e-3, "logprobs at |x| ~ 1e4")  # fp32 ulp of 1e4 ~ 1e-3
    _close(ent, ent64, 1e-3, "entropy at |x| ~ 1e4")
    assert (grad[:, 5:40] == 0).all()


def test_token_logprobs_one_output_unused():
    """Grads when only one of (logprobs, entropy) feeds the loss (the other gets no upstream grad)."""
    x = _logits((4, 6, 53), torch.float64)
    y = torch.randint(0, 53, (4, 6))
    y[1, 2] = -100
    g = torch.randn(4, 6, dtype=torch.float64)
    for pick in (0, 1):
        out = reference.token_logprobs(x, y, return_entropy=True, chunk_size=5)
        (got,) = torch.autograd.grad((out[pick] * g).sum(), x)
        out = reference.token_logprobs(x, y, return_entropy=True)
        (want,) = torch.autograd.grad((out[pick] * g).sum() + 0 * out[1 - pick].sum(), x)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    (lp_only,) = torch.autograd.grad((reference.token_logprobs(x, y) * g).sum(), x)
    (want,) = torch.autograd.grad((reference.token_logprobs(x, y, return_entropy=True)[0] * g).sum(), x)
    torch.testing.assert_close(lp_only, want, rtol=1e-12, atol=1e-14)


def test_token_logprobs_no_full_float_copy(float_guard):
    n, v = 64, 1000
    x = _logits((n, v), torch.bfloat16)
    y = torch.randint(0, v, (n,))
    with float_guard() as guard:
        lp, ent = token_logprobs(x, y, return_entropy=True, backend="torch")
        (lp.sum() + ent.sum()).backward()
    # default chunking takes all 64 rows here; force chunks to see the bound
    assert guard.largest <= n * v
    with float_guard() as guard:
        lp, ent = reference.token_logprobs(x, y, return_entropy=True, chunk_size=8)
        (lp.sum() + ent.sum()).backward()
    assert guard.largest <= 8 * v


def test_token_logprobs_validation_errors():
    x = torch.randn(2, 3, 10)
    with pytest.raises(ValueError, match="labels must have shape"):
        token_logprobs(x, torch.zeros(2, 4, dtype=torch.long), backend="torch")
    with pytest.raises(TypeError, match="labels must be an integer"):
        token_logprobs(x, torch.zeros(2, 3), backend="torch")
    # uint8 would wrap ignore_index (-100 -> 156) and silently count ignored tokens as valid
    with pytest.raises(TypeError, match="cannot hold ignore_index"):
        token_logprobs(x, torch.zeros(2, 3, dtype=torch.uint8), backend="torch")
    with pytest.raises(ValueError, match=r"labels\[1, 2\] = 10"):
        token_logprobs(x, torch.tensor([[0, 1, 2], [3, 4, 10]]), backend="torch")
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(x, torch.zeros(2, 3, dtype=torch.long), temperature=0.0, backend="torch")
    with pytest.raises(TypeError, match="logits must be a floating"):
        token_logprobs(x.long(), torch.zeros(2, 3, dtype=torch.long), backend="torch")


# ----------------------------------------------------------------------------------------- linear_token_logprobs
def _linear_case(n_shape, h, v, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*n_shape, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / math.sqrt(h) * 2).to(dtype).requires_grad_()
    b = torch.randn(v, generator=g).to(dtype).requires_grad_() if bias else None
    return hidden, weight, b


def _linear_run(hidden, weight, b, y, g_lp, g_ent, fn, **kw):
    lp, ent = fn(hidden, weight, y, b, **kw)
    inputs = [t for t in (hidden, weight, b) if t is not None]
    grads = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), inputs)
    return (lp, ent, *grads)


def _chunked(hidden, weight, y, b, **kw):
    return linear_token_logprobs(hidden, weight, y, bias=b, return_entropy=True, backend="torch", **kw)


def _composed(hidden, weight, y, b, **kw):
    logits = hidden @ weight.T + (b if b is not None else 0)
    return token_logprobs(logits, y, return_entropy=True, backend="torch", **kw)


def test_linear_gradcheck_float64():
    hidden, weight, b = _linear_case((2, 3), 5, 13, torch.float64)
    y = torch.tensor([[1, -100, 4], [12, 0, 7]])
    fn = lambda h, w, b: reference.linear_token_logprobs(h, w, y, bias=b, return_entropy=True,  # noqa: E731
                                                          chunk_size=4, temperature=0.8)
    assert torch.autograd.gradcheck(fn, (hidden, weight, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_vs_float64_composition(dtype, make_mask):
    b_, t_, h, v = 3, 37, 48, 1031
    mask = make_mask(b_, t_, "ragged")
    y = _labels(mask, v)
    hidden, weight, b = _linear_case((b_, t_), h, v, dtype)
    g_lp, g_ent = torch.randn(b_, t_), torch.randn(b_, t_)
    got = _linear_run(hidden, weight, b, y, g_lp, g_ent, _chunked, temperature=1.1, chunk_size=16)
    ref_in = [t.detach().double().requires_grad_() for t in (hidden, weight, b)]
    want = _linear_run(*ref_in, y, g_lp.double(), g_ent.double(), _composed, temperature=1.1)
    assert got[0].dtype == got[1].dtype == torch.float32
    assert [g.dtype for g in got[2:]] == [dtype] * 3
    _close(got[0], want[0], LIN_FWD_TOL[dtype], "logprobs")
    _close(got[1], want[1], LIN_FWD_TOL[dtype], "entropy")
    for name, g, w in zip(("grad_hidden", "grad_weight", "grad_bias"), got[2:], want[2:]):
        _rel_close(g, w, LIN_GRAD_TOL[dtype], name)


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_linear_chunk_invariance_and_no_bias(chunk):
    hidden, weight, _ = _linear_case((4, 9), 16, 211, torch.float32, bias=False)
    y = torch.randint(0, 211, (4, 9))
    y[1, :4] = -100
    g_lp, g_ent = torch.randn(4, 9), torch.randn(4, 9)
    want = _linear_run(hidden, weight, None, y, g_lp, g_ent, _chunked, chunk_size=36)
    got = _linear_run(hidden, weight, None, y, g_lp, g_ent, _chunked, chunk_size=chunk)
    # grad_weight sums over chunks in another order: equal up to fp32 rounding, not bitwise
    for name, w, g in zip(("logprobs", "entropy", "grad_hidden", "grad_weight"), want, got):
        _rel_close(g, w, 2e-6, name)


def test_linear_garbage_hidden_does_not_reach_grad_weight(make_mask, garbage):
    mask = make_mask(4, 11, "holes")
    y = _labels(mask, 101)
    hidden, weight, b = _linear_case((4, 11), 24, 101, torch.float32)
    dirty = garbage(hidden, mask)
    g_lp, g_ent = torch.randn(4, 11), torch.randn(4, 11)
    clean = _linear_run(hidden, weight, b, y, g_lp, g_ent, _chunked, chunk_size=5)
    got = _linear_run(dirty, weight, b, y, g_lp, g_ent, _chunked, chunk_size=5)
    for c, d in zip(clean, got):
        assert torch.isfinite(d).all()
        torch.testing.assert_close(d, c, rtol=0, atol=0)
    assert (got[2][~mask] == 0).all()


def test_linear_memory_does_not_grow_with_tokens(float_guard):
    h, v, chunk = 8, 500, 16
    for n in (64, 256):
        hidden, weight, b = _linear_case((n,), h, v, torch.float32)
        y = torch.randint(0, v, (n,))
        with float_guard() as guard:
            lp, ent = linear_token_logprobs(hidden, weight, y, bias=b, return_entropy=True, chunk_size=chunk,
                                            backend="torch")
            (lp.sum() + ent.sum()).backward()
        assert guard.largest <= max(chunk * v, n * h, v * h), f"n={n}: a tensor of {guard.largest} floats"


def test_linear_under_autocast_casts_like_f_linear():
    hidden, weight, b = _linear_case((3, 7), 16, 97, torch.float32)
    y = torch.randint(0, 97, (3, 7))
    g_lp, g_ent = torch.randn(3, 7), torch.randn(3, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _linear_run(hidden, weight, b, y, g_lp, g_ent, _chunked, chunk_size=4)
    low = [t.detach().bfloat16().requires_grad_() for t in (hidden, weight, b)]
    want = _linear_run(*low, y, g_lp, g_ent, _chunked, chunk_size=4)
    assert [g.dtype for g in got[2:]] == [torch.float32] * 3  # grads reach the fp32 master tensors
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), rtol=0, atol=0)


def test_linear_validation_errors():
    hidden, weight, b = _linear_case((2, 3), 4, 10, torch.float32)
    y = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="hidden must be"):
        linear_token_logprobs(hidden, weight[:, :3], y, backend="torch")
    with pytest.raises(TypeError, match="same dtype"):
        linear_token_logprobs(hidden, weight.double(), y, backend="torch")
    with pytest.raises(ValueError, match="bias must be"):
        linear_token_logprobs(hidden, weight, y, bias=b[:5], backend="torch")
    with pytest.raises(ValueError, match="labels must have shape"):
        linear_token_logprobs(hidden, weight, y[:, :2], backend="torch")
    with pytest.raises(ValueError, match="chunk_size"):
        linear_token_logprobs(hidden, weight, y, chunk_size=0, backend="torch")


# ---------------------------------------------------------------------------------------------------------- gae
def test_gae_hand_case():
    r = torch.tensor([[1.0, 2.0]])
    v = torch.tensor([[0.5, 1.5]])
    gamma, lam = 0.9, 0.8
    adv, ret = gae(r, v, torch.ones(1, 2), gamma=gamma, lam=lam, backend="torch")
    d1 = 2.0 - 1.5
    d0 = 1.0 + gamma * 1.5 - 0.5
    torch.testing.assert_close(adv, torch.tensor([[d0 + gamma * lam * d1, d1]]))
    torch.testing.assert_close(ret, adv + v)


@pytest.mark.parametrize("kind", ["ragged", "left", "holes"])
def test_gae_gamma1_lam1_is_monte_carlo_return_minus_value(kind, make_mask):
    mask = make_mask(5, 23, kind)
    r, v = torch.randn(5, 23, dtype=torch.float64), torch.randn(5, 23, dtype=torch.float64)
    adv, ret = gae(r, v, mask, gamma=1.0, lam=1.0, backend="torch")
    r0 = torch.where(mask, r, 0)
    mc = r0.flip(-1).cumsum(-1).flip(-1)  # sum of rewards of valid tokens from t to the end
    torch.testing.assert_close(ret, torch.where(mask, mc, 0))
    torch.testing.assert_close(adv, torch.where(mask, mc - v, 0))


def test_gae_holes_equal_compacted_rows(make_mask, garbage):
    mask = make_mask(4, 19, "holes")
    r, v = torch.randn(4, 19), torch.randn(4, 19)
    adv, ret = gae(garbage(r, mask), garbage(v, mask), mask, gamma=0.97, lam=0.9, backend="torch")
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    for i in range(4):
        m = mask[i]
        k = int(m.sum())
        if k == 0:
            continue
        a_c, r_c = gae(r[i, m][None], v[i, m][None], torch.ones(1, k, dtype=torch.bool), gamma=0.97, lam=0.9,
                       backend="torch")
        torch.testing.assert_close(adv[i, m], a_c[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ret[i, m], r_c[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gae_vs_float64(dtype, make_mask):
    mask = make_mask(6, 41, "left")
    r, v = torch.randn(6, 41).to(dtype), torch.randn(6, 41).to(dtype)
    adv, ret = gae(r, v, mask.int(), gamma=0.99, lam=0.95, backend="torch")
    adv64, ret64 = gae(r.double(), v.double(), mask, gamma=0.99, lam=0.95, backend="torch")
    assert adv.dtype == ret.dtype == torch.float32
    _close(adv, adv64, 1e-5, "advantages")
    _close(ret, ret64, 1e-5, "returns")


def test_gae_empty_and_errors():
    adv, ret = gae(torch.randn(3, 4), torch.randn(3, 4), torch.zeros(3, 4), backend="torch")
    assert (adv == 0).all() and (ret == 0).all()
    with pytest.raises(ValueError, match="values must have the shape"):
        gae(torch.randn(3, 4), torch.randn(3, 5), torch.ones(3, 4), backend="torch")
    with pytest.raises(ValueError, match="mask must have the shape"):
        gae(torch.randn(3, 4), torch.randn(3, 4), torch.ones(3, 5), backend="torch")
