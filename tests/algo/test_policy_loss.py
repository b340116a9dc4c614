"""Policy-loss variants: GSPO (sequence-level ratio) on the torch path and through the fused kernel (torch and
Triton-interpreter backends) against a float64 reference written from the paper's formula; the registry."""
from __future__ import annotations

import pytest
import torch

from fastrlhf.algo import get_policy_loss, gspo_loss, gspo_policy_loss, policy_loss_names, register_policy_loss
from fastrlhf.kernels import fused_ppo_loss, token_logprobs

B, T, H, V = 5, 6, 16, 37
CLIP_LOW, CLIP_HIGH = 0.03, 0.05



def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.3
    labels = torch.randint(0, V, (B, T), generator=g)
    # row 1 left-padded, row 2 ragged, row 3 with a hole, row 4 empty
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :2] = False
    mask[2, 4:] = False
    mask[3, 2] = False
    mask[4] = False
    with torch.no_grad():
        lp = token_logprobs(hidden @ weight.T, labels, backend="torch")
    # per-row shifts so that some sequence ratios fall outside [1 - 0.03, 1 + 0.05] and some inside
    old = lp + torch.tensor([0.1, -0.1, 0.01, -0.02, 0.0])[:, None] + 0.05 * torch.randn(B, T, generator=g)
    adv_row = torch.tensor([1.0, -0.7, 0.5, -1.2, 2.0])
    adv = adv_row[:, None].expand(B, T).clone()
    # garbage at padding
    old[~mask], adv[~mask], labels[~mask] = float("nan"), float("inf"), 0
    return hidden, weight, labels, old, adv, mask


def _gspo_float64(hidden, weight, labels, old, adv, mask):
    """GSPO, Zheng et al. 2025 eq. 5-7, in float64: s_i = exp(mean_t (lp - old)),
    J = mean_i min(s_i A_i, clip(s_i) A_i) over rows with a valid token; the loss is -J."""
    logits = hidden.double() @ weight.double().T
    lp = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    rows = mask.any(-1)
    d = torch.where(mask, lp - torch.where(mask, old.double(), 0.0), 0.0)
    s = torch.exp(d.sum(-1) / mask.sum(-1).clamp(min=1))
    a = torch.where(mask, adv.double(), 0.0).sum(-1) / mask.sum(-1).clamp(min=1)  # the row's advantage
    j = torch.minimum(s * a, s.clamp(1 - CLIP_LOW, 1 + CLIP_HIGH) * a)
    return -(j[rows]).mean(), s


def _grads(fn, hidden, weight, *args):
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = fn(h, w, *args)
    loss = out[0]
    (2.5 * loss).backward()
    return loss.detach(), out[1] if len(out) > 1 else None, h.grad, w.grad


def test_reference_has_clipped_and_unclipped_sequences():
    _, s = _gspo_float64(*_inputs())
    inside = (s > 1 - CLIP_LOW) & (s < 1 + CLIP_HIGH)
    assert inside[:4].any() and (~inside[:4]).any()


def test_gspo_logprob_level_matches_float64():
    hidden, weight, labels, old, adv, mask = _inputs()

    def ours(h, w, *rest):
        lp = token_logprobs(h @ w.T, labels, backend="torch")
        return gspo_policy_loss(lp, old, adv, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH)

    def ref(h, w, *rest):
        return _gspo_float64(h, w, labels, old, adv, mask)

    loss, _, gh, gw = _grads(ours, hidden, weight)
    loss0, _, gh0, gw0 = _grads(ref, hidden.double(), weight.double())
    torch.testing.assert_close(loss.double(), loss0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh.double(), gh0, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw.double(), gw0, rtol=1e-4, atol=1e-6)
    assert gh.abs().sum() > 0


def _check_fused(backend):
    hidden, weight, labels, old, adv, mask = _inputs()

    def ours(h, w):
        return gspo_loss(h, w, labels, old, adv, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                         loss_agg="seq-mean-token-mean", backend=backend)

    loss, stats, gh, gw = _grads(ours, hidden, weight)
    loss0, _, gh0, gw0 = _grads(lambda h, w: _gspo_float64(h, w, labels, old, adv, mask),
                                hidden.double(), weight.double())
    torch.testing.assert_close(loss.double(), loss0, rtol=1e-5, atol=1e-6)
    scale = gh0.abs().max()
    torch.testing.assert_close(gh.double() / scale, gh0 / scale, rtol=0, atol=2e-5)
    scale = gw0.abs().max()
    torch.testing.assert_close(gw.double() / scale, gw0 / scale, rtol=0, atol=2e-5)
    _, s = _gspo_float64(hidden, weight, labels, old, adv, mask)
    torch.testing.assert_close(stats["seq_ratio_mean"].double(), s[:4].mean(), rtol=1e-5, atol=1e-6)
    assert {"clipfrac", "approx_kl", "ratio_mean", "kl", "entropy", "seq_ratio_mean"} <= set(stats)


def test_gspo_fused_torch_backend_matches_float64():
    _check_fused("torch")


def test_gspo_fused_triton_backend_matches_float64(interpret):
    _check_fused("triton")


def test_gspo_differs_from_token_level_ppo():
    """Same inputs, same clip: GSPO's sequence ratio is not PPO's per-token ratio (the test can fail)."""
    hidden, weight, labels, old, adv, mask = _inputs()
    kw = dict(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, loss_agg="seq-mean-token-mean", backend="torch")
    a, _ = gspo_loss(hidden, weight, labels, old, adv, mask, **kw)
    b, _ = fused_ppo_loss(hidden, weight, labels, old, adv, mask, **kw)
    assert abs(float(a) - float(b)) > 1e-3


def test_registry():
    assert set(policy_loss_names()) >= {"ppo", "gspo"}
    hidden, weight, labels, old, adv, mask = _inputs()
    a, _ = get_policy_loss("ppo")(hidden, weight, labels, old, adv, mask, backend="torch")
    b, _ = fused_ppo_loss(hidden, weight, labels, old, adv, mask, backend="torch")
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="policy_loss must be one of"):
        get_policy_loss("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_policy_loss("gspo")(lambda *a, **k: None)
