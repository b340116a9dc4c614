"""token_rewards: score at each row's last valid token, KL penalty on valid tokens, nothing from padding."""
import math

import pytest
import torch
from fastrlhf.kernels import kl_estimate

from fastrlhf.algo import last_valid_index, token_rewards

NAN, INF = float("nan"), float("inf")


def ragged_case():
    """4 rows, T = 5: left-padded, right-padded (shorter), a hole inside, and an empty row.
    Padding holds garbage (NaN, inf)."""
    mask = torch.tensor([[0, 0, 1, 1, 1],
                         [1, 1, 0, 0, 0],
                         [1, 0, 1, 1, 0],
                         [0, 0, 0, 0, 0]], dtype=torch.bool)
    lp = torch.tensor([[NAN, INF, -1.0, -2.0, -0.5],
                       [-0.2, -0.4, NAN, -INF, 7.0],
                       [-1.0, NAN, -3.0, -0.1, INF],
                       [NAN, NAN, INF, -INF, 1.0]])
    ref = torch.tensor([[1.0, NAN, -1.5, -1.0, -0.5],
                        [-0.7, -0.1, INF, 0.0, NAN],
                        [-2.0, -INF, -1.0, -0.6, 3.0],
                        [INF, 0.0, NAN, 2.0, -1.0]])
    scores = torch.tensor([2.0, -1.0, 0.5, NAN])  # an empty row's score is never used
    return scores, lp, ref, mask


def test_hand_computed_k1():
    scores, lp, ref, mask = ragged_case()
    rewards, kl = token_rewards(scores, lp, ref, mask, kl_coef=0.1)
    expected_kl = torch.tensor([[0, 0, 0.5, -1.0, 0.0],
                                [0.5, -0.3, 0, 0, 0],
                                [1.0, 0, -2.0, 0.5, 0],
                                [0, 0, 0, 0, 0]])
    expected_rewards = -0.1 * expected_kl
    expected_rewards[0, 4] += 2.0   # last valid of a left-padded row is column -1 ...
    expected_rewards[1, 1] += -1.0  # ... but not for a shorter right-padded row
    expected_rewards[2, 3] += 0.5   # a hole does not end the row
    torch.testing.assert_close(kl, expected_kl)
    torch.testing.assert_close(rewards, expected_rewards)
    assert rewards.dtype == kl.dtype == torch.float32
    assert torch.isfinite(rewards).all() and torch.isfinite(kl).all()


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "abs"])
def test_kinds_match_library_estimator_float64(kind):
    g = torch.Generator().manual_seed(1)
    B, T = 5, 13
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    lengths = torch.tensor([13, 1, 0, 7, 4])
    starts = torch.tensor([0, 12, 0, 3, 9])  # row 0 full, row 1 last column only, row 4 ends at column 12
    cols = torch.arange(T)
    mask = (cols >= starts[:, None]) & (cols < (starts + lengths)[:, None])
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    rewards, kl = token_rewards(scores, lp, ref, mask, kl_coef=0.05, kl_kind=kind)
    oracle_kl = torch.where(mask, kl_estimate(lp, ref, kind=kind), 0.0)
    torch.testing.assert_close(kl, oracle_kl.float())
    end = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        if lengths[b]:
            end[b, starts[b] + lengths[b] - 1] = scores[b]
    torch.testing.assert_close(rewards, (-0.05 * oracle_kl + end).float())


def test_no_nan_gradient_from_padding():
    scores, lp, ref, mask = ragged_case()
    lp = lp.clone().requires_grad_(True)
    scores = scores.clone().requires_grad_(True)
    rewards, _ = token_rewards(scores, lp, ref, mask, kl_coef=0.3, kl_kind="k3")
    upstream = torch.arange(20, dtype=torch.float32).reshape(4, 5) + 1.0
    rewards.backward(upstream)
    assert torch.isfinite(lp.grad).all() and torch.isfinite(scores.grad).all()
    assert (lp.grad[~mask] == 0).all()
    torch.testing.assert_close(scores.grad, torch.tensor([5.0, 7.0, 14.0, 0.0]))
    # k3: d/dlp [-c * (exp(-d) + d - 1)] = -c * (1 - exp(-d)), d = lp - ref
    d = 0.5  # row 0, column 2
    assert lp.grad[0, 2].item() == pytest.approx(3.0 * -0.3 * (1 - math.exp(-d)), rel=1e-5)


def test_last_valid_index_and_bf16_inputs():
    _, lp, ref, mask = ragged_case()
    idx, has_any = last_valid_index(mask.int())
    assert idx.tolist() == [4, 1, 3, 0] and has_any.tolist() == [True, True, True, False]
    lp16 = torch.where(mask, lp, 0.0).bfloat16()
    rewards, kl = token_rewards(torch.ones(4, dtype=torch.bfloat16), lp16, ref.bfloat16(), mask.float(),
                                kl_coef=0.0)
    assert rewards.dtype == kl.dtype == torch.float32
    assert rewards.sum().item() == 3.0  # kl_coef 0: only the three scores


def test_shape_errors():
    scores, lp, ref, mask = ragged_case()
    with pytest.raises(ValueError, match="scores"):
        token_rewards(scores[:3], lp, ref, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        token_rewards(scores, lp, ref[:, :4], mask, kl_coef=0.1)
