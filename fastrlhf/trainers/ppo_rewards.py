"""The rewards of a PPO config: its ``reward_model`` (weight 1) plus the ``rewards`` entries (reward models or
ensembles of them, and Python reward functions), each with its weight.

Errors name the key (``rewards[2].function``) and are ``ConfigError``s, so ``fastrlhf ppo`` prints one line.
"""
from __future__ import annotations

from fastrlhf.algo import RewardFunctions, WeightedRewardModels, load_reward_function
from fastrlhf.config import ConfigError


def kept_rows(rows, texts: list[str]) -> list[dict]:
    """The rows whose prompts are ``texts`` (the prompts kept, in order, after over-long ones were dropped)."""
    kept, j = [], 0
    for r in rows:
        if j < len(texts) and r["prompt"] == texts[j]:
            kept.append(r)
            j += 1
    return kept


def build_rewards(cfg, *, dtype=None, source: str = "config"):
    """``(reward_model or None, reward_fns or None)`` for ``PPOTrainer`` from ``cfg`` (a ``PPOConfig``)."""
    from fastrlhf.models import RewardEnsemble, RewardModel

    terms = []
    for i, spec in enumerate(cfg.rewards):
        if spec.function:
            try:
                fn = load_reward_function(spec.function, where=f"{source}: rewards[{i}].function")
            except ValueError as err:
                raise ConfigError(str(err)) from None
            terms.append((spec.function, fn, spec.weight))
    models, weights = [], []
    if cfg.reward_model:
        models.append(RewardModel.from_pretrained(cfg.reward_model, dtype=dtype))
        weights.append(1.0)
    for spec in cfg.rewards:
        if spec.reward_model:
            members = [RewardModel.from_pretrained(d, dtype=dtype) for d in spec.reward_model]
            model = members[0] if len(members) == 1 and spec.reduce == "mean" else RewardEnsemble(
                members, spec.reduce, spec.k)
            models.append(model)
            weights.append(spec.weight)
    if not models and not terms:
        raise ConfigError(f"{source}: `reward_model` or `rewards` is required for `fastrlhf ppo`")
    if len(models) == 1 and weights[0] == 1.0:
        reward_model = models[0]
    else:
        reward_model = WeightedRewardModels(models, weights) if models else None
    return reward_model, (RewardFunctions(terms) if terms else None)
