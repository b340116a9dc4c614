"""Pairwise preference math for the reward model: the Bradley-Terry loss and its calibration."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _pair(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """``chosen - rejected`` in float32 after checking the two score vectors match."""
    if not (torch.is_tensor(chosen) and torch.is_tensor(rejected)):
        raise TypeError("chosen and rejected must be tensors")
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(f"chosen and rejected must both be [B]; got {tuple(chosen.shape)} and "
                         f"{tuple(rejected.shape)}")
    if chosen.numel() == 0:
        raise ValueError("chosen and rejected are empty (B = 0)")
    return chosen.float() - rejected.float()


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                       margin: float | torch.Tensor | None = None):
    """Bradley-Terry pairwise loss of reward-model scores.

    ``chosen, rejected``: ``[B]`` scores of the preferred and the other response (any float dtype).
    ``margin``: ``None``, a float, or a ``[B]`` tensor (e.g. a labeller's preference strength, as in
    Llama 2's margin loss, Touvron et al. 2023, eq. 2).

    ``loss = -mean(logsigmoid(chosen - rejected - margin))`` (Bradley & Terry 1952; Ouyang et al. 2022,
    eq. 1), computed with ``F.logsigmoid`` so large negative differences do not overflow.
    ``accuracy = mean(chosen > rejected)`` (a tie counts as wrong) and ``reward_margin =
    mean(chosen - rejected)`` are detached. All three are float32 0-dim tensors; the loss is
    differentiable w.r.t. ``chosen`` and ``rejected``.
    """
    diff = _pair(chosen, rejected)
    logits = diff
    if margin is not None:
        if torch.is_tensor(margin):
            if margin.shape not in (diff.shape, torch.Size([])):
                raise ValueError(f"margin must be a float or a [B] = {tuple(diff.shape)} tensor, "
                                 f"got shape {tuple(margin.shape)}")
            margin = margin.to(device=diff.device, dtype=torch.float32)
        logits = diff - margin
    loss = -F.logsigmoid(logits).mean()
    accuracy = (diff > 0).float().mean().detach()
    reward_margin = diff.mean().detach()
    return loss, accuracy, reward_margin


def calibration_bins(chosen: torch.Tensor, rejected: torch.Tensor, n_bins: int = 10):
    """Reliability-diagram bins of the Bradley-Terry probability ``p = sigmoid(chosen - rejected)``.

    Every pair is counted in both orderings — ``(p, label 1)``: "chosen beats rejected" happened, and
    ``(1 - p, label 0)``: "rejected beats chosen" did not — so the 2B predictions span [0, 1] and a
    model that is always sure and always right is perfectly calibrated, while one whose p = 0.75 pairs
    are right only half the time is not. Predictions go to ``n_bins`` equal-width bins of [0, 1]
    (the last bin closed). Returns float64 ``(confidence, accuracy, count)``, each ``[n_bins]``: mean
    predicted probability, observed frequency of label 1, and number of predictions per bin (empty bins
    have count 0 and 0 in the other two).
    """
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    diff = _pair(chosen, rejected).double()
    if not torch.isfinite(diff).all():  # NaN would land in an arbitrary bin; an eval metric may sync here
        raise ValueError("chosen - rejected has NaN or inf; cannot bin it for calibration")
    p = torch.sigmoid(diff)
    q = torch.cat([p, 1.0 - p])
    label = torch.cat([torch.ones_like(p), torch.zeros_like(p)])
    index = (q * n_bins).long().clamp_(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64, device=q.device).index_add_(0, index, torch.ones_like(q))
    sum_q = torch.zeros_like(count).index_add_(0, index, q)
    sum_y = torch.zeros_like(count).index_add_(0, index, label)
    safe = count.clamp(min=1.0)
    return sum_q / safe, sum_y / safe, count


def expected_calibration_error(chosen: torch.Tensor, rejected: torch.Tensor,
                               n_bins: int = 10) -> torch.Tensor:
    """ECE of ``sigmoid(chosen - rejected)`` as the probability that chosen is preferred.

    Definition (Guo et al. 2017, "On Calibration of Modern Neural Networks", eq. 3, with the binary
    predictions of :func:`calibration_bins`): ``ECE = sum_b (n_b / N) * |acc_b - conf_b|`` over
    ``n_bins`` equal-width probability bins, N = 2B predictions (each pair in both orderings; the two
    orderings mirror each other, so this equals the same sum over the pairs' own ``p`` folded to
    [0.5, 1]). 0 is perfect calibration; the maximum is 1. Returns a detached float32 0-dim tensor.
    """
    conf, acc, count = calibration_bins(chosen.detach(), rejected.detach(), n_bins)
    ece = ((count / count.sum()) * (acc - conf).abs()).sum()
    return ece.float()
