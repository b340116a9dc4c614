"""dpo_loss against hand-computed values for sigmoid (with and without label smoothing), ipo and simpo."""
from __future__ import annotations

import math

import pytest
import torch

from fastrlhf.algo import dpo_loss


def _softplus(x):  # -logsigmoid(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


PC, PR, RC, RR = (torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0]), torch.tensor([-1.5, -2.0]),
                  torch.tensor([-1.5, -2.0]))
# z = (pc - rc) - (pr - rr): row 0: 0.5 - (-0.5) = 1.0; row 1: -1.0 - 1.0 = -2.0


def test_sigmoid_hand_computed():
    loss, stats = dpo_loss(PC, PR, RC, RR, beta=0.1)
    want = (_softplus(-0.1) + _softplus(0.2)) / 2
    assert loss.dtype == torch.float32 and abs(float(loss) - want) < 1e-6
    torch.testing.assert_close(stats["rewards_chosen"], torch.tensor((0.05 - 0.1) / 2))
    torch.testing.assert_close(stats["rewards_rejected"], torch.tensor((-0.05 + 0.1) / 2))
    torch.testing.assert_close(stats["reward_margin"], torch.tensor((0.1 - 0.2) / 2))
    assert float(stats["reward_accuracy"]) == 0.5


def test_sigmoid_label_smoothing_hand_computed():
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)
    want = (0.9 * _softplus(-0.1) + 0.1 * _softplus(0.1) + 0.9 * _softplus(0.2) + 0.1 * _softplus(-0.2)) / 2
    assert abs(float(loss) - want) < 1e-6


def test_ipo_hand_computed():
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo")
    # (z - 1 / (2 beta))^2 = (1 - 5)^2, (-2 - 5)^2
    assert abs(float(loss) - (16.0 + 49.0) / 2) < 1e-5
    with pytest.raises(ValueError, match="not ipo"):
        dpo_loss(PC, PR, RC, RR, loss_type="ipo", label_smoothing=0.1)


def test_simpo_hand_computed_ignores_reference():
    pc, pr = torch.tensor([-4.0]), torch.tensor([-6.0])
    loss, stats = dpo_loss(pc, pr, None, None, beta=2.0, loss_type="simpo", chosen_lengths=torch.tensor([4]),
                           rejected_lengths=torch.tensor([3]), simpo_gamma=0.5)
    # normalized -1 and -2: z' = 1 - 0.5 / 2 = 0.75; loss = -logsigmoid(2 * 0.75)
    assert abs(float(loss) - _softplus(-1.5)) < 1e-6
    torch.testing.assert_close(stats["rewards_chosen"], torch.tensor(-2.0))
    again, _ = dpo_loss(pc, pr, torch.tensor([5.0]), torch.tensor([-9.0]), beta=2.0, loss_type="simpo",
                        chosen_lengths=torch.tensor([4]), rejected_lengths=torch.tensor([3]))
    assert torch.equal(loss, again)


def test_gradient_and_errors():
    pc = PC.clone().requires_grad_(True)
    loss, _ = dpo_loss(pc, PR, RC, RR, beta=0.1)
    loss.backward()
    # d/dpc of mean softplus(-beta z) = -beta * sigmoid(-beta z) / B
    want = torch.tensor([-0.1 * torch.sigmoid(torch.tensor(-0.1)) / 2, -0.1 * torch.sigmoid(torch.tensor(0.2)) / 2])
    torch.testing.assert_close(pc.grad, want)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        dpo_loss(PC, PR, RC, RR, loss_type="kto")
    with pytest.raises(ValueError, match="needs the reference"):
        dpo_loss(PC, PR, None, None)
