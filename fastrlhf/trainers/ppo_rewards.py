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


def build_reward_functions(cfg, *, source: str = "config") -> RewardFunctions | None:
    """The ``rewards`` entries that are Python functions, imported (before any model loads: a bad
    ``module:name`` is one line naming ``rewards[i].function``), weighted; None when there are none."""
    terms = []
    for i, spec in enumerate(cfg.rewards):
        if spec.function:
            try:
                fn = load_reward_function(spec.function, where=f"{source}: rewards[{i}].function")
            except ValueError as err:
                raise ConfigError(str(err)) from None
            terms.append((spec.function, fn, spec.weight))
    return RewardFunctions(terms) if terms else None


def combine_reward_models(cfg, main_model=None, *, dtype=None, source: str = "config"):
    """One reward model for ``PPOTrainer`` (or None): ``main_model`` (the config's ``reward_model``, loaded by
    the caller: sharded under torchrun) with weight 1, plus every ``rewards`` entry naming reward-model
    folders (an ensemble reduced by mean / min / mean - k*std), each with its weight."""
    from fastrlhf.models import RewardEnsemble, RewardModel

    models, weights = ([main_model], [1.0]) if main_model is not None else ([], [])
    for spec in cfg.rewards:
        if spec.reward_model:
            members = [RewardModel.from_pretrained(d, dtype=dtype) for d in spec.reward_model]
            model = members[0] if len(members) == 1 and spec.reduce == "mean" else RewardEnsemble(
                members, spec.reduce, spec.k)
            models.append(model)
            weights.append(spec.weight)
    if not models and not any(spec.function for spec in cfg.rewards):
        raise ConfigError(f"{source}: `reward_model` or `rewards` is required for `fastrlhf ppo`")
    if len(models) == 1 and weights[0] == 1.0:
        return models[0]
    return WeightedRewardModels(models, weights) if models else None


def build_rewards(cfg, *, dtype=None, source: str = "config"):
    """``(reward_model or None, reward_fns or None)`` for ``PPOTrainer`` from ``cfg`` (a ``PPOConfig``), every
    model loaded whole in this process (the Python API; ``fastrlhf ppo`` loads ``reward_model`` sharded)."""
    from fastrlhf.models import RewardModel

    fns = build_reward_functions(cfg, source=source)
    main = RewardModel.from_pretrained(cfg.reward_model, dtype=dtype) if cfg.reward_model else None
    return combine_reward_models(cfg, main, dtype=dtype, source=source), fns
