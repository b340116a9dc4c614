"""PPO's guards: the config a run must resume under, rows dropped for non-finite values, the critic's
start on the reward model's normalized scale, and metrics reduced over ranks (max as max, pooled std)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fastrlhf.trainers import common

# PPOConfig keys that may differ between a run and its resumption (they do not change the math)
PPO_BOOKKEEPING = frozenset({"output_dir", "progress", "checkpoint_every", "keep_checkpoints", "tensorboard",
                             "wandb", "num_threads", "eval_every", "eval_samples", "eval_data"})


def check_ppo_config(cfg, output_dir: str | Path) -> None:
    """``output_dir/ppo_config.json`` (written when a run starts) must match ``cfg``: a run never resumes
    another experiment's checkpoint (the same check as sft / rm, ``common.check_same_config``)."""
    mine = common.config_snapshot(cfg, PPO_BOOKKEEPING)
    common.check_same_config(Path(output_dir) / "ppo_config.json", mine, stage="ppo",
                             hint="use another output_dir (or delete this one)")


def drop_non_finite_rows(mask: torch.Tensor, scores: torch.Tensor, *per_token: torch.Tensor) -> torch.Tensor:
    """``keep [B]`` bool: rows whose score ``[B]`` and every ``per_token [B, R]`` value on the valid
    tokens of ``mask [B, R]`` are finite. One bad reward-model score drops its row, not the rollout."""
    keep = torch.isfinite(scores)
    for t in per_token:
        if t is not None:
            keep &= ~(mask & ~torch.isfinite(t)).any(-1)
    return keep


SUMMED_METRICS = ("dropped_rows",)


def reduce_metrics(metrics: dict, device: torch.device) -> dict[str, float]:
    """This rank's metrics -> global values, the same on every rank (one process: unchanged).

    Keys ending in ``_max``: max over ranks. ``dropped_rows``: summed. ``rm_score`` / ``rm_score_std``:
    mean and unbiased std of the pooled scores, from each rank's ``rm_score_n`` rows, ``rm_score``
    (mean) and ``rm_score_sq`` (mean square); those two helper keys are not returned. Everything else:
    mean over ranks (per-rank means of equal-size shards).
    """
    import torch.distributed as dist

    metrics = dict(metrics)
    n = metrics.pop("rm_score_n", None)
    sq = metrics.pop("rm_score_sq", None)
    if n is not None:  # pooled sums: n, sum, sum of squares
        metrics["_pool_n"], metrics["_pool_s"] = n, metrics["rm_score"] * n
        metrics["_pool_ss"] = sq * n
    names = sorted(metrics)
    # (FSDP2 grad norms are DTensors: _full gathers them, a collective made in the same order on every rank)
    values = torch.stack([torch.as_tensor(_full(metrics[k]) if isinstance(metrics[k], torch.Tensor) else metrics[k],
                                          dtype=torch.float32).reshape(()).cpu() for k in names])
    values = values.double().to(device)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world > 1:
        is_max = torch.tensor([k.endswith("_max") for k in names], device=device)
        is_sum = torch.tensor([k in SUMMED_METRICS or k.startswith("_pool") for k in names], device=device)
        summed = torch.where(is_max, torch.zeros_like(values), values)
        dist.all_reduce(summed)
        peak = torch.where(is_max, values, torch.full_like(values, -math.inf))
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        values = torch.where(is_max, peak, torch.where(is_sum, summed, summed / world))
    row = dict(zip(names, values.cpu().tolist(), strict=True))
    if n is not None:
        pn, ps, pss = row.pop("_pool_n"), row.pop("_pool_s"), row.pop("_pool_ss")
        mean = ps / max(pn, 1.0)
        row["rm_score"] = mean
        row["rm_score_std"] = math.sqrt(max(pss - pn * mean * mean, 0.0) / (pn - 1)) if pn > 1 else 0.0
    return row


@torch.no_grad()
def init_critic_head(critic, reward_model) -> bool:
    """PPO scores with the reward model's saved mean/std (``RewardModel.normalize``); a critic initialised
    from that reward model (head weights equal to the RM's) would predict raw scores, so its head is
    divided by ``reward_std`` to start on the normalized scale. (The head has no bias to take the mean
    shift; the RM's normalized scores have mean 0 on its eval pairs.) Returns whether it rescaled."""
    std = getattr(reward_model, "reward_std", None)
    c_head, r_head = getattr(critic, "head", None), getattr(reward_model, "head", None)
    if not std or c_head is None or r_head is None or c_head.weight.shape != r_head.weight.shape:
        return False
    if not torch.equal(c_head.weight, r_head.weight.to(c_head.weight)):
        return False
    c_head.weight.div_(max(float(std), 1e-8))
    return True


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's global grad norm) as a plain tensor; other tensors unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
