"""Direct preference optimization losses on sequence log-probabilities (the offline family).

``dpo_loss`` is a pure function: ``[B]`` sums of response-token log-probs under the policy and the frozen
reference for the chosen and the rejected response of each pair in, ``(loss, stats)`` out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSSES = ("sigmoid", "ipo", "simpo")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None, *,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
             simpo_gamma: float = 0.5) -> tuple[torch.Tensor, dict]:
    """Mean over the batch of, with ``z = (pc - rc) - (pr - rr)``:

    - ``sigmoid`` (DPO, Rafailov et al. 2023, eq. 7; cDPO label smoothing e, Mitchell 2023):
      ``-(1 - e) logsigmoid(beta z) - e logsigmoid(-beta z)``;
    - ``ipo`` (Azar et al. 2023, eq. 17): ``(z - 1 / (2 beta))^2`` (no label smoothing);
    - ``simpo`` (Meng et al. 2024, eq. 6): no reference (``ref_*`` ignored, may be None), length-normalized
      log-probs ``pc / |y_c|``, ``pr / |y_r|`` (``chosen_lengths`` / ``rejected_lengths`` ``[B]``; without them
      the log-probs are taken as already normalized), ``z' = pc/|y_c| - pr/|y_r| - simpo_gamma / beta``,
      loss as ``sigmoid`` on ``z'`` (label smoothing included).

    stats (0-dim float32, detached): ``rewards_chosen`` / ``rewards_rejected`` (mean implicit rewards,
    ``beta (pc - rc)``; for simpo ``beta pc/|y_c|``), ``reward_margin``, ``reward_accuracy`` (share of pairs
    with the chosen reward above the rejected one), ``logps_chosen``, ``logps_rejected``.
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"loss_type must be one of {DPO_LOSSES}, got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("label_smoothing applies to the sigmoid and simpo losses, not ipo")
    dtype = torch.float64 if policy_chosen_logps.dtype == torch.float64 else torch.float32
    pc, pr = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    if pc.dim() != 1 or pc.shape != pr.shape:
        raise ValueError(f"policy log-probs must both be [B]; got {tuple(pc.shape)} and {tuple(pr.shape)}")
    if loss_type == "simpo":
        if chosen_lengths is not None:
            pc = pc / chosen_lengths.to(dtype).clamp(min=1)
        if rejected_lengths is not None:
            pr = pr / rejected_lengths.to(dtype).clamp(min=1)
        chosen_rewards, rejected_rewards = beta * pc, beta * pr
        z = pc - pr - simpo_gamma / beta
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"loss_type={loss_type!r} needs the reference log-probs")
        rc, rr = ref_chosen_logps.to(dtype).detach(), ref_rejected_logps.to(dtype).detach()
        if rc.shape != pc.shape or rr.shape != pc.shape:
            raise ValueError(f"reference log-probs must be [B] = {tuple(pc.shape)}; got {tuple(rc.shape)}, "
                             f"{tuple(rr.shape)}")
        chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
        z = (pc - rc) - (pr - rr)
    if loss_type == "ipo":
        losses = (z - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * z) - label_smoothing * F.logsigmoid(-beta * z)
    with torch.no_grad():
        cr, rj = chosen_rewards.detach(), rejected_rewards.detach()
        stats = {
            "rewards_chosen": cr.mean().float(),
            "rewards_rejected": rj.mean().float(),
            "reward_margin": (cr - rj).mean().float(),
            "reward_accuracy": (cr > rj).float().mean(),
            "logps_chosen": policy_chosen_logps.detach().float().mean(),
            "logps_rejected": policy_rejected_logps.detach().float().mean(),
        }
    return losses.mean(), stats
