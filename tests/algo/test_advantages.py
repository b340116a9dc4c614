"""Advantage estimators: hand-computed small cases (groups of 4, ragged and left-padded masks, a group of
identical scores, garbage in padding), the published formulas, and the registry."""
from __future__ import annotations

import math

import pytest
import torch

from fastrlhf.algo import (adv_estimator_names, compute_advantages, discounted_returns, filter_groups,
                           get_adv_estimator, grpo_advantages, needs_critic, register_adv_est,
                           reinforce_pp_advantages, reinforce_pp_baseline_advantages, rloo_advantages,
                           token_rewards)
from fastrlhf.kernels import gae

NAN = float("nan")
# 8 rows = 2 groups of 4; row 1 left-padded, row 2 ragged, row 6 holes, row 7 has no valid token
MASK = torch.tensor([[1, 1, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0],
                     [1, 1, 1], [0, 0, 1], [1, 0, 1], [0, 0, 0]], dtype=torch.bool)
SCORES = torch.tensor([1.0, 2.0, 3.0, 4.0, 2.0, 2.0, 2.0, 2.0])  # second group: identical scores


def _per_row(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The value each row carries on its valid tokens (checking it is constant there and 0 elsewhere)."""
    assert torch.all(adv[~mask] == 0)
    out = torch.zeros(adv.shape[0])
    for i in range(adv.shape[0]):
        vals = adv[i][mask[i]]
        if vals.numel():
            assert torch.all(vals == vals[0])
            out[i] = vals[0]
    return out


def test_grpo_hand_computed():
    adv = grpo_advantages(SCORES, MASK, 4)
    assert adv.shape == MASK.shape and adv.dtype == torch.float32
    std = math.sqrt(5 / 3)  # unbiased std of 1, 2, 3, 4
    want = torch.tensor([-1.5, -0.5, 0.5, 1.5, 0, 0, 0, 0]) / torch.tensor([std + 1e-6] * 4 + [1.0] * 4)
    want[7] = 0.0  # no valid token
    torch.testing.assert_close(_per_row(adv, MASK), want, rtol=1e-6, atol=1e-7)


def test_dr_grpo_hand_computed():
    adv = grpo_advantages(SCORES, MASK, 4, norm_std=False)
    torch.testing.assert_close(_per_row(adv, MASK), torch.tensor([-1.5, -0.5, 0.5, 1.5, 0, 0, 0, 0]))


def test_grpo_published_formula_random():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(12, generator=g)
    mask = torch.rand(12, 7, generator=g) < 0.7
    grouped = scores.view(3, 4)
    want = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-6)).reshape(-1)
    torch.testing.assert_close(grpo_advantages(scores, mask, 4), want[:, None] * mask)


def test_rloo_hand_computed():
    adv = rloo_advantages(SCORES, MASK, 4)
    # baseline of row i = mean of the other three: 1 - 3, 2 - 8/3, 3 - 7/3, 4 - 2
    want = torch.tensor([-2.0, -2 / 3, 2 / 3, 2.0, 0, 0, 0, 0])
    torch.testing.assert_close(_per_row(adv, MASK), want)
    # the published identity: k / (k - 1) * (s - mean)
    g = torch.Generator().manual_seed(1)
    s = torch.randn(8, generator=g)
    full = torch.ones(8, 2, dtype=torch.bool)
    ident = (4 / 3) * (s.view(2, 4) - s.view(2, 4).mean(1, keepdim=True)).reshape(-1)
    torch.testing.assert_close(rloo_advantages(s, full, 4)[:, 0], ident)


def test_group_errors():
    with pytest.raises(ValueError, match="whole groups of 4"):
        grpo_advantages(torch.zeros(6), torch.ones(6, 2, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        rloo_advantages(torch.zeros(4), torch.ones(4, 2, dtype=torch.bool), 1)


def test_discounted_returns_hand_computed():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [NAN, 1.0, 2.0], [1.0, NAN, 3.0]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1], [1, 0, 1]], dtype=torch.bool)
    got = discounted_returns(rewards, mask, gamma=1.0, backend="torch")
    torch.testing.assert_close(got, torch.tensor([[6.0, 5.0, 3.0], [0.0, 3.0, 2.0], [4.0, 0.0, 3.0]]))
    got = discounted_returns(rewards, mask, gamma=0.5, backend="torch")
    torch.testing.assert_close(got, torch.tensor([[2.75, 3.5, 3.0], [0.0, 2.0, 2.0], [2.5, 0.0, 3.0]]))


def test_reinforce_pp_hand_computed():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [NAN, 1.0, 2.0]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    adv = reinforce_pp_advantages(rewards, mask, backend="torch")
    # returns 6, 5, 3 | 3, 2: mean 3.8, unbiased variance 10.8 / 4 = 2.7
    want = (torch.tensor([[6.0, 5.0, 3.0], [3.8, 3.0, 2.0]]) - 3.8) / math.sqrt(2.7 + 1e-8)
    torch.testing.assert_close(adv, want)
    assert adv[1, 0] == 0


def test_reinforce_pp_baseline_is_group_centred_scores():
    g = torch.Generator().manual_seed(2)
    B, T = 8, 5
    mask = MASK.new_zeros(B, T)
    mask[:, :3] = MASK
    mask[0, 3:] = True
    lp, ref = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    scores = torch.randn(B, generator=g)
    rewards, _ = token_rewards(scores, lp, ref, mask, kl_coef=0.05)
    centred = scores - scores.view(2, 4).mean(1).repeat_interleave(4)
    want_rewards, _ = token_rewards(centred, lp, ref, mask, kl_coef=0.05)
    want = reinforce_pp_advantages(want_rewards, mask, backend="torch")
    got = reinforce_pp_baseline_advantages(rewards, scores, mask, 4, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.all(got[~mask] == 0)


def test_registry():
    assert set(adv_estimator_names()) >= {"gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"}
    assert needs_critic("gae") and not any(needs_critic(n) for n in ("grpo", "rloo", "reinforce_pp"))
    with pytest.raises(ValueError, match="advantage_estimator must be one of"):
        get_adv_estimator("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_adv_est("grpo")(lambda **_: None)
    g = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    adv, ret = compute_advantages("gae", rewards=rewards, values=values, mask=MASK, scores=SCORES, group_size=4,
                                  gamma=0.9, lam=0.8, backend="torch")
    want_adv, want_ret = gae(rewards, values, MASK, gamma=0.9, lam=0.8, backend="torch")
    torch.testing.assert_close(adv, want_adv)
    torch.testing.assert_close(ret, want_ret)
    adv, _ = compute_advantages("grpo", rewards=rewards, values=None, mask=MASK, scores=SCORES, group_size=4,
                                norm_std=False)
    torch.testing.assert_close(adv, grpo_advantages(SCORES, MASK, 4, norm_std=False))
    # rloo ranks by the sequence reward including the KL part (sum of the token rewards on valid tokens)
    adv, _ = compute_advantages("rloo", rewards=rewards, mask=MASK, scores=SCORES, group_size=4)
    torch.testing.assert_close(adv, rloo_advantages((rewards * MASK).sum(-1), MASK, 4))


def test_filter_groups():
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    assert filter_groups(scores, 4).tolist() == [False] * 4 + [True] * 4
    with pytest.raises(ValueError, match="whole groups"):
        filter_groups(scores[:6], 4)
