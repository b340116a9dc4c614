"""Bradley-Terry loss and ECE: hand-computed cases."""
import math

import pytest
import torch

from fastrlhf.algo import bradley_terry_loss, calibration_bins, expected_calibration_error


def softplus(x):
    return math.log1p(math.exp(x))


def test_bt_loss_hand_computed_with_tie():
    chosen = torch.tensor([1.0, 0.0, 2.0])
    rejected = torch.tensor([0.0, 0.0, 3.0])  # diffs 1, 0 (tie), -1
    loss, acc, margin = bradley_terry_loss(chosen, rejected)
    expected = (softplus(-1.0) + softplus(0.0) + softplus(1.0)) / 3  # -logsigmoid(d) = softplus(-d)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert acc.item() == pytest.approx(1 / 3)  # the tie counts as wrong
    assert margin.item() == pytest.approx(0.0)
    for t in (loss, acc, margin):
        assert t.dtype == torch.float32 and t.dim() == 0
    assert not acc.requires_grad and not margin.requires_grad


def test_bt_loss_float_and_tensor_margin():
    chosen = torch.tensor([1.0, 0.0, 2.0])
    rejected = torch.tensor([0.0, 0.0, 3.0])
    loss, _, margin = bradley_terry_loss(chosen, rejected, margin=0.5)
    expected = (softplus(-0.5) + softplus(0.5) + softplus(1.5)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert margin.item() == pytest.approx(0.0)  # reward_margin does not include the margin

    m = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    loss, acc, _ = bradley_terry_loss(chosen, rejected, margin=m)
    expected = (softplus(-1.0) + softplus(1.0) + softplus(-1.0)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert acc.item() == pytest.approx(1 / 3)  # accuracy ignores the margin

    with pytest.raises(ValueError, match="margin"):
        bradley_terry_loss(chosen, rejected, margin=torch.zeros(4))


def test_bt_loss_gradient_and_stability():
    chosen = torch.tensor([-1000.0, 3.0, 0.25, 40.0], requires_grad=True)
    rejected = torch.tensor([0.0, -1.0, 0.25, -50.0], requires_grad=True)
    loss, _, _ = bradley_terry_loss(chosen, rejected)
    assert torch.isfinite(loss)
    expected = (1000.0 + softplus(-4.0) + math.log(2.0) + softplus(-90.0)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    upstream = torch.tensor(2.5)
    loss.backward(upstream)
    d = (chosen - rejected).detach()
    expected = -upstream * torch.sigmoid(-d) / 4  # d/dd softplus(-d) = -sigmoid(-d)
    torch.testing.assert_close(chosen.grad, expected)
    torch.testing.assert_close(rejected.grad, -expected)


def test_bt_loss_low_precision_inputs_give_float32():
    chosen = torch.tensor([0.5, 1.5], dtype=torch.bfloat16)
    rejected = torch.tensor([1.0, 0.0], dtype=torch.bfloat16)
    loss, acc, margin = bradley_terry_loss(chosen, rejected)
    assert loss.dtype == acc.dtype == margin.dtype == torch.float32
    assert loss.item() == pytest.approx((softplus(0.5) + softplus(-1.5)) / 2, rel=1e-6)


@pytest.mark.parametrize("c,r", [(torch.zeros(3), torch.zeros(4)), (torch.zeros(2, 3), torch.zeros(2, 3)),
                                 (torch.zeros(0), torch.zeros(0))])
def test_bt_loss_rejects_bad_shapes(c, r):
    with pytest.raises(ValueError):
        bradley_terry_loss(c, r)


def logit(p):
    return math.log(p / (1 - p))


def test_ece_perfectly_calibrated_is_zero():
    # p = 0.75 on four pairs, right on three of them (a reversed pair has diff -logit(0.75));
    # p = 0.35 (i.e. 0.65 for the other ordering) right on 13 of 20 -> calibrated too.
    diffs = [logit(0.75)] * 3 + [-logit(0.75)] + [-logit(0.35)] * 13 + [logit(0.35)] * 7
    chosen = torch.tensor(diffs)
    rejected = torch.zeros_like(chosen)
    assert expected_calibration_error(chosen, rejected).item() == pytest.approx(0.0, abs=1e-6)
    # always sure and always right: calibrated
    sure = torch.full((5,), 40.0)
    assert expected_calibration_error(sure, torch.zeros(5)).item() == pytest.approx(0.0, abs=1e-6)


def test_ece_miscalibrated_hand_computed():
    # p = 0.85 on every pair but right on only half: the 0.85 bin has accuracy 0.5 and so has the 0.15 bin.
    d = logit(0.85)
    chosen = torch.tensor([d, d, -d, -d])
    ece = expected_calibration_error(chosen, torch.zeros(4))
    assert ece.item() == pytest.approx(0.35, abs=1e-6)
    assert ece.dtype == torch.float32
    # always sure and always wrong: ECE 1
    wrong = expected_calibration_error(torch.full((3,), -40.0), torch.zeros(3))
    assert wrong.item() == pytest.approx(1.0, abs=1e-6)
    # two groups in different bins, equal weights: p=0.95 right 3/4 (|0.75-0.95| = 0.2), p=0.65 right 1/2
    a, b = logit(0.95), logit(0.65)
    chosen = torch.tensor([a, a, a, -a, b, -b, b, -b])
    expected = 0.5 * 0.2 + 0.5 * 0.15
    assert expected_calibration_error(chosen, torch.zeros(8)).item() == pytest.approx(expected, abs=1e-6)


def test_calibration_bins_counts_both_orderings():
    chosen = torch.tensor([0.0, logit(0.95)])  # p = 0.5 (bin 5 twice) and 0.95 (bin 9) / 0.05 (bin 0)
    conf, acc, count = calibration_bins(chosen, torch.zeros(2), n_bins=10)
    assert count.tolist() == [1, 0, 0, 0, 0, 2, 0, 0, 0, 1]
    assert acc[5].item() == pytest.approx(0.5) and acc[9].item() == 1.0 and acc[0].item() == 0.0
    assert conf[9].item() == pytest.approx(0.95) and conf[5].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="n_bins"):
        calibration_bins(chosen, torch.zeros(2), n_bins=0)
    with pytest.raises(ValueError, match="NaN"):
        expected_calibration_error(torch.tensor([1.0, float("nan")]), torch.zeros(2))
