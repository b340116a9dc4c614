"""Padding skip of the linear ops (issue 11, item 2): ``linear_token_logprobs`` and ``fused_ppo_loss`` run
their GEMMs over the valid rows only, and scatter the results back.

Checked on both backends (Triton under the interpreter) against a float64 oracle over the full logits
(``token_logprobs``'s PyTorch path on ``h @ W.T + b``, the public loss functions): ragged / left-padded /
holed masks with a fully padded row, NaN / inf in every padded input, non-unit upstream gradients, an
all-padding batch, and a count of the rows that reach a matmul (a dispatch mode recording every mm / addmm).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastrlhf.kernels import (aggregate, fused_ppo_loss, kl_estimate, linear_token_logprobs, ppo_policy_loss,
                              token_logprobs)

B, T, H, V = 3, 11, 24, 40  # N = 33; chunk 7: token counts per matmul never equal H or V
CHUNK = 7
IGNORE = -100
MASKS = ("ragged", "left", "holes")


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    if request.param == "triton":
        request.getfixturevalue("interpret")
    return request.param


def _inputs(mask, garbage, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = (torch.randn(V, H, generator=g) * H ** -0.5)
    bias = torch.randn(V, generator=g) * 0.1
    labels = torch.randint(0, V, (B, T), generator=g)
    hidden = garbage(hidden, mask)  # NaN / inf / 3e4 in every padded hidden row
    return hidden, weight, bias, labels, g


def _oracle_lp_ent(hidden, weight, bias, labels, mask):
    """float64 oracle over the full ``[B, T, V]`` logits (no compaction anywhere): the library's PyTorch
    ``token_logprobs`` on ``h @ W.T + b`` with padded hidden rows zeroed; (lp, ent), 0 at padded positions."""
    h = torch.where(mask[..., None], hidden, torch.zeros((), dtype=hidden.dtype))
    z = h @ weight.t() + (0 if bias is None else bias)
    return token_logprobs(z, torch.where(mask, labels, IGNORE), return_entropy=True, backend="torch")


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


@pytest.mark.parametrize("chunk_size", [None, CHUNK])
@pytest.mark.parametrize("kind", MASKS)
def test_linear_logprobs_skips_padding_matches_float64(backend, kind, chunk_size, make_mask, garbage):
    mask = make_mask(B, T, kind)  # the last row fully padded
    hidden, weight, bias, labels, g = _inputs(mask, garbage)
    labels = torch.where(mask, labels, IGNORE)
    g_lp, g_ent = torch.randn(B, T, generator=g) * 1.7, torch.randn(B, T, generator=g) * 0.6
    h, w, b = _leaves(hidden, weight, bias)
    lp, ent = linear_token_logprobs(h, w, labels, bias=b, return_entropy=True, chunk_size=chunk_size,
                                    backend=backend)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    h64, w64, b64 = _leaves(hidden.double(), weight.double(), bias.double())
    lp64, ent64 = _oracle_lp_ent(h64, w64, b64, labels, mask)
    ((lp64 * g_lp.double()).sum() + (ent64 * g_ent.double()).sum()).backward()
    assert lp.shape == ent.shape == (B, T) and lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), lp64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ent64, rtol=1e-5, atol=1e-5)
    assert not lp[~mask].any() and not ent[~mask].any()  # exactly 0 at padded positions
    assert torch.equal(h.grad[~mask], torch.zeros_like(h.grad[~mask]))  # padded hidden rows: exactly 0
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-4, atol=1e-5)


LOSS = dict(kl_coef=0.05, kl_kind="k3", entropy_coef=0.01, clip_low=0.2, clip_high=0.28)


def _ppo_inputs(mask, garbage, g):
    old = torch.randn(B, T, generator=g) * 0.3 - 3.7
    adv = torch.randn(B, T, generator=g)
    ref = old + 0.1 * torch.randn(B, T, generator=g)
    return garbage(old, mask), garbage(adv, mask), garbage(ref, mask)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("chunk_size", [None, CHUNK])
@pytest.mark.parametrize("kind", MASKS)
def test_fused_ppo_loss_skips_padding_matches_float64(backend, kind, chunk_size, loss_agg, make_mask,
                                                       garbage):
    mask = make_mask(B, T, kind)
    hidden, weight, _, labels, g = _inputs(mask, garbage)
    labels = garbage(labels, mask)  # out-of-range junk at masked labels
    old, adv, ref = _ppo_inputs(mask, garbage, g)
    h, w = _leaves(hidden, weight)
    loss, stats, lp = fused_ppo_loss(h, w, labels, old, adv, mask, ref_logprobs=ref, loss_agg=loss_agg,
                                     chunk_size=chunk_size, return_logprobs=True, backend=backend, **LOSS)
    (loss * 2.5).backward()  # non-unit upstream gradient
    h64, w64 = _leaves(hidden.double(), weight.double())
    lp64, ent64 = _oracle_lp_ent(h64, w64, None, torch.where(mask, labels, 0), mask)
    zero = torch.zeros((), dtype=torch.float64)
    old64, adv64 = (torch.where(mask, x.double(), zero) for x in (old, adv))
    pol, _ = ppo_policy_loss(lp64, old64, adv64, mask, clip_low=0.2, clip_high=0.28, loss_agg=loss_agg)
    kl = torch.where(mask, kl_estimate(lp64, torch.where(mask, ref.double(), zero), "k3"), zero)
    loss64 = pol + 0.05 * aggregate(kl, mask, loss_agg) - 0.01 * aggregate(ent64, mask, loss_agg)
    (loss64 * 2.5).backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp.double(), lp64, rtol=1e-5, atol=1e-5)
    assert not lp[~mask].any()
    assert torch.equal(h.grad[~mask], torch.zeros_like(h.grad[~mask]))
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)
    ent_mean = (ent64 * mask).sum() / mask.sum()
    torch.testing.assert_close(stats["entropy"].double(), ent_mean, rtol=1e-5, atol=1e-6)


def test_all_padding_batch(backend, garbage):
    """No valid token: zeros everywhere (outputs, loss, every gradient), no NaN from the garbage."""
    mask = torch.zeros(B, T, dtype=torch.bool)
    hidden, weight, bias, labels, g = _inputs(mask, garbage)
    h, w, b = _leaves(hidden, weight, bias)
    lp, ent = linear_token_logprobs(h, w, torch.full((B, T), IGNORE), bias=b, return_entropy=True,
                                    backend=backend)
    (lp.sum() * 3 + ent.sum()).backward()
    for t in (lp, ent, h.grad, w.grad, b.grad):
        assert torch.equal(t, torch.zeros_like(t))
    assert lp.shape == (B, T)
    old, adv, ref = _ppo_inputs(mask, garbage, g)
    h, w = _leaves(hidden, weight)
    loss, _, lp = fused_ppo_loss(h, w, garbage(labels, mask), old, adv, mask, ref_logprobs=ref,
                                 return_logprobs=True, backend=backend, **LOSS)
    (loss * 2).backward()
    for t in (loss, lp, h.grad, w.grad):
        assert torch.equal(t, torch.zeros_like(t))


class MatmulRows(TorchDispatchMode):
    """Records, for every mm / addmm, the sizes of its operands' dimensions that are neither H nor V: the
    token rows of that matmul (logits = h W^T, grad_h = dz W, grad_W = dz^T h, and the vocab slabs')."""

    def __init__(self):
        super().__init__()
        self.rows: list[int] = []
        self.dims: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            a, b = args[:2] if func.overloadpacket is torch.ops.aten.mm else args[1:3]
            dims = [*a.shape, *b.shape]
            self.dims.update(dims)
            self.rows.append(sum(d for d in {*dims} - {H, V}))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op", ["linear", "ppo"])
def test_padded_rows_never_reach_a_matmul(backend, op, make_mask, garbage):
    """A padded batch runs exactly the matmuls of the same valid tokens packed into one row without
    padding, and no matmul ever sees the padded token count (N = 33, valid < 33)."""
    mask = make_mask(B, T, "left")
    n_valid = int(mask.sum())
    hidden, weight, _, labels, g = _inputs(mask, garbage)
    old, adv, ref = _ppo_inputs(mask, garbage, g)

    def run(m, hid, lab, o, a, r):
        h, w = _leaves(hid, weight)
        with MatmulRows() as rec:
            if op == "linear":
                lp, ent = linear_token_logprobs(h, w, torch.where(m, lab, IGNORE), return_entropy=True,
                                                chunk_size=CHUNK, backend=backend)
                (lp.sum() + ent.sum()).backward()
            else:
                loss, _ = fused_ppo_loss(h, w, lab, o, a, m, ref_logprobs=r, chunk_size=CHUNK,
                                         backend=backend, **LOSS)
                loss.backward()
        return rec

    padded = run(mask, hidden, labels, old, adv, ref)
    packed = run(torch.ones(1, n_valid, dtype=torch.bool),
                 *(t[mask][None] for t in (hidden, labels, old, adv, ref)))
    assert padded.rows and sorted(padded.rows) == sorted(packed.rows)
    assert sum(padded.rows) % n_valid == 0 and max(padded.rows) <= CHUNK
    assert B * T not in padded.dims
    with MatmulRows() as fwd:  # forward only: each valid row multiplied once
        with torch.no_grad():
            linear_token_logprobs(hidden, weight, torch.where(mask, labels, IGNORE), chunk_size=CHUNK,
                                  backend=backend)
    assert sum(fwd.rows) == n_valid
